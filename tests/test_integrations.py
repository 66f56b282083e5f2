"""Where users train: ``memopt run`` on unchanged scripts (a plain loop, a Hugging Face Trainer), the Trainer and
Lightning callbacks, an accelerate loop inside ``memopt.track()``; each against the analytic state bytes and
``memopt profile`` of the same config, batch and precision."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from memopt.spec import load_spec

from .helpers import CONFIGS, ROOT, run

LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 500, "max_position_embeddings": 128}
LLAMA_PARAMS = 156_480  # embedding 500 x 64 (tied head: no), 2 layers, norms; from LlamaForCausalLM itself
LLAMA_TENSORS = 21      # parameter tensors: AdamW keeps a 4-byte step per tensor
PLAIN = """
import sys, torch
print("args:", sys.argv[1:])
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
for step in range(int(sys.argv[1])):
    model(torch.randn(64, 256)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
"""
PLAIN_PARAMS = 256 * 1024 + 1024 + 1024 * 256 + 256
TRAINER = """
import sys, torch, transformers
from transformers import Trainer, TrainingArguments
cfg = transformers.LlamaConfig(**{config})
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(cfg)
g = torch.Generator().manual_seed(0)
rows = [{{"input_ids": ids, "labels": ids}} for ids in torch.randint(500, (64, 32), generator=g)]
args = TrainingArguments(output_dir=sys.argv[1], per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3,
                         report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
                         gradient_accumulation_steps={accumulation}, bf16={bf16}, dataloader_num_workers=0,
                         gradient_checkpointing={checkpointing})
callbacks = []
if "--callback" in sys.argv:
    from memopt.integrations.transformers import MemoptCallback
    callbacks.append(MemoptCallback(json_out=sys.argv[1] + "/callback.json", report=False))
trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks)
trainer.train()
if callbacks:
    logged = [h for h in trainer.state.log_history if "memopt/step_peak_bytes" in h]
    print("LOGGED", len(logged), logged[-1]["memopt/optimizer_bytes"] if logged else None, file=sys.stderr)
"""


def _memopt_run(*args: str, cwd=ROOT, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memopt", "run", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def _states_are_analytic(run: dict, params: int, tensors: int) -> None:
    assert run["state_bytes"] == {"params": params * 4, "buffers": run["state_bytes"]["buffers"],
                                  "grads": params * 4, "optimizer": 2 * params * 4 + 4 * tensors}


def test_a_plain_loop_unchanged(tmp_path):
    (tmp_path / "train.py").write_text(PLAIN)
    done = _memopt_run("--json", str(tmp_path / "train.py"), "5")
    assert done.returncode == 0, done.stderr
    assert "args: ['5']" in done.stderr  # the script's own output: on stderr, stdout holds the JSON
    doc = json.loads(done.stdout)
    (result,) = doc["runs"]
    _states_are_analytic(result, PLAIN_PARAMS, 4)
    assert result["params"] == {"total": PLAIN_PARAMS, "trainable": PLAIN_PARAMS}
    assert doc["spec"]["train"]["steps"] == 5 and len(doc["spec"]["train"]["step_peak_bytes"]) == 5
    assert result["peak_bytes"] == max(doc["spec"]["train"]["step_peak_bytes"][1:])  # the warm-up left out


def test_steps_ends_the_script_cleanly(tmp_path):
    (tmp_path / "train.py").write_text(PLAIN)
    done = _memopt_run("--json", "--steps", "2", str(tmp_path / "train.py"), "1000")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["spec"]["train"]["steps"] == 3  # the warm-up and 2 measured


@pytest.mark.parametrize("case,args,code,says", [
    ("missing", [], 1, "no such file"),
    ("raises", [], 1, "the script failed (ValueError: boom)"),
    ("no_step", [], 0, "no optimizer step was seen"),
    ("exit3", [], 3, "the script failed (it exited with 3)"),
    ("steps0", ["--steps", "0"], 1, "--steps: expected a number of measured steps >= 1, got 0"),
    ("folder", [], 1, "is not a regular file"),
])
def test_bad_input_is_one_clear_message_and_the_scripts_own_exit_code(tmp_path, case, args, code, says):
    scripts = {
        "raises": "import torch\nm = torch.nn.Linear(4, 4)\nm(torch.ones(1, 4))\nraise ValueError('boom')\n",
        "no_step": "import torch\nm = torch.nn.Linear(4, 4)\nm(torch.ones(1, 4)).sum().backward()\n",
        "exit3": "import sys\nsys.exit(3)\n",
        "steps0": PLAIN,
    }
    target = tmp_path / "script.py"
    if case in scripts:
        target.write_text(scripts[case])
    if case == "folder":
        target.mkdir()
    done = _memopt_run(*args, str(target), "2", cwd=tmp_path, timeout=120)
    assert done.returncode == code, done.stderr
    assert says in done.stderr, done.stderr
    if case == "raises":
        assert "Traceback" in done.stderr and "Peak tensor memory" in done.stdout  # the script's traceback, the report
    if code == 1 and case != "raises":
        assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == (["script.py"] if case != "missing" else [])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    folder = tmp_path_factory.mktemp("llama")
    (folder / "config.json").write_text(json.dumps(LLAMA))
    return folder


def _profiled(llama, batch: int, strategies: list[str] | None = None) -> int:
    spec = load_spec(CONFIGS / "tiny.yaml", {"hf": str(llama / "config.json"), "batch_size": batch, "seq_len": 32,
                                             "steps": 1}, strategies)
    memory = run(spec).memory
    assert memory is not None
    return memory.peak_bytes


@pytest.mark.parametrize("accumulation,bf16,checkpointing,profile_as,within", [
    (1, False, False, (2, None), 0.01),
    (2, False, False, (4, ["accum:micro_batches=2"]), 0.01),
    (1, True, False, (2, ["amp:dtype=bf16"]), 0.01),
    (1, False, True, (2, ["ckpt"]), 0.03),  # HF's own checkpointing against memopt's ckpt: -2.4%, see the README
], ids=["fp32", "accumulation2", "bf16", "gradient_checkpointing"])
def test_a_hugging_face_trainer_under_memopt_run(llama, tmp_path, accumulation, bf16, checkpointing, profile_as,
                                                 within):
    """The Trainer's steady-state step is memopt profile's of the same config, batch and precision within 1%: the
    Trainer computes its loss its own way (labels shifted inside the model, averaged over the batch's tokens)."""
    script = tmp_path / "train.py"
    script.write_text(TRAINER.format(config=LLAMA, accumulation=accumulation, bf16=bf16, checkpointing=checkpointing))
    done = _memopt_run("--json", str(script), str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)["runs"]
    _states_are_analytic(result, LLAMA_PARAMS, LLAMA_TENSORS)
    profiled = _profiled(llama, *profile_as)
    assert abs(result["peak_bytes"] - profiled) <= within * profiled, (result["peak_bytes"], profiled)


def test_the_trainer_callback(llama, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAINER.format(config=LLAMA, accumulation=1, bf16=False, checkpointing=False))
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), "--callback"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    optimizer_bytes = 2 * LLAMA_PARAMS * 4 + 4 * LLAMA_TENSORS
    assert f"LOGGED 4 {optimizer_bytes}" in done.stderr  # in the Trainer's log history: 3 steps, the summary
    (result,) = json.loads((tmp_path / "out" / "callback.json").read_text())["runs"]
    _states_are_analytic(result, LLAMA_PARAMS, LLAMA_TENSORS)
    profiled = _profiled(llama, 2)
    assert abs(result["peak_bytes"] - profiled) <= 0.01 * profiled, (result["peak_bytes"], profiled)


def test_an_accelerate_loop_inside_memopt_track(llama):
    """accelerate wraps the optimizer (AcceleratedOptimizer): the global hooks find the one inside."""
    import torch
    import transformers
    from accelerate import Accelerator

    import memopt

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**LLAMA))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.utils.data.DataLoader(torch.randint(500, (8, 32), generator=torch.Generator().manual_seed(0)),
                                       batch_size=2)
    accelerator = Accelerator(cpu=True)
    model, optimizer, data = accelerator.prepare(model, optimizer, data)
    with memopt.track() as t:
        for ids in data:
            accelerator.backward(model(input_ids=ids, labels=ids).loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert t.steps == 4 and t.result.memory is not None
    state = t.result.memory.state_bytes
    assert (state["params"], state["grads"]) == (LLAMA_PARAMS * 4, LLAMA_PARAMS * 4)
    assert state["optimizer"] == 2 * LLAMA_PARAMS * 4 + 4 * LLAMA_TENSORS
    # optimizer state created by the block's first step counts as optimizer state at the peak
    assert t.result.memory.peak_breakdown["optimizer"] == state["optimizer"]


LIGHTNING = """
import sys, json, warnings, torch, transformers, pytorch_lightning as pl
warnings.filterwarnings("ignore")
from memopt.integrations.lightning import MemoptCallback

class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{config}))
    def training_step(self, batch, index):
        return self.model(input_ids=batch, labels=batch).loss
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

data = torch.utils.data.DataLoader(torch.randint(500, (64, 32), generator=torch.Generator().manual_seed(0)),
                                   batch_size=2)
callback = MemoptCallback(json_out=sys.argv[1], report=False)
pl.Trainer(max_steps=3, accelerator="cpu", callbacks=[callback], logger=False, enable_checkpointing=False,
           enable_progress_bar=False, enable_model_summary=False).fit(Module(), data)
"""


def test_a_lightning_module_with_the_callback(llama, tmp_path):
    """Lightning zeroes the gradients inside its closure, after the next step's forward: the previous step's
    gradients are alive through that forward, so its peak is memopt profile's plus what they add there."""
    pytest.importorskip("pytorch_lightning")
    script = tmp_path / "fit.py"
    script.write_text(LIGHTNING.format(config=LLAMA))
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "mem.json")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    doc = json.loads((tmp_path / "mem.json").read_text())
    (result,) = doc["runs"]
    _states_are_analytic(result, LLAMA_PARAMS, LLAMA_TENSORS)
    assert doc["spec"]["train"]["steps"] == 3
    assert result["peak_breakdown"]["grads"] == LLAMA_PARAMS * 4  # the previous step's, alive at the peak
    profiled = _profiled(llama, 2)
    assert profiled < result["peak_bytes"] <= profiled + LLAMA_PARAMS * 4


def test_memopt_run_takes_a_module(tmp_path):
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "train.py").write_text(textwrap.dedent(PLAIN))
    done = _memopt_run("--json", "-m", "mypkg.train", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["spec"]["train"]["steps"] == 3
    missing = _memopt_run("-m", "nosuchpkg.train", cwd=tmp_path, timeout=120)
    assert missing.returncode == 1 and "no such module" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("targets,saved", [(["q_proj", "v_proj"], ["lm_head"]), ("all-linear", None),
                                           (["mlp.down_proj", "o_proj"], None)])
@pytest.mark.parametrize("backend", ["memopt", "peft"])
def test_a_peft_adapter_config_trains_what_get_peft_model_trains(llama, tmp_path, targets, saved, backend):
    """r, lora_alpha, target_modules (peft's suffix matching) and modules_to_save read from adapter_config.json: the
    trainable parameters are get_peft_model's, counted by peft itself."""
    peft = pytest.importorskip("peft")
    import torch
    import transformers

    config = {"r": 4, "lora_alpha": 8, "target_modules": targets, "modules_to_save": saved, "peft_type": "LORA"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**LLAMA))
    reference = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                           modules_to_save=saved))
    trainable, _ = reference.get_nb_trainable_parameters()
    spec = load_spec(CONFIGS / "tiny.yaml", {"hf": str(llama / "config.json"), "batch_size": 2, "seq_len": 16,
                                             "steps": 1}, [f"lora:peft_config={tmp_path},backend={backend}"])
    result = run(spec, fake=True)
    assert result.params_trainable == trainable
    assert result.memory is not None and result.memory.state_bytes["grads"] == trainable * 4


def test_a_peft_config_that_cannot_be_used_is_one_clear_message(llama, tmp_path):
    from memopt.core.errors import StrategyError

    def refused(options: str, says: str) -> None:
        spec = load_spec(CONFIGS / "tiny.yaml", {"hf": str(llama / "config.json")}, [f"lora:{options}"])
        with pytest.raises(StrategyError, match=says):
            run(spec, fake=True)

    refused(f"peft_config={tmp_path}", "adapter_config.json: cannot read: No such file")
    (tmp_path / "adapter_config.json").write_text('{"r": 0, "target_modules": ["q_proj"]}')
    refused(f"peft_config={tmp_path}", "r must be a whole number >= 1")
    (tmp_path / "adapter_config.json").write_text('{"r": 4, "target_modules": ".*proj"}')
    refused(f"peft_config={tmp_path}", "regular expression is not supported")
    (tmp_path / "adapter_config.json").write_text('{"r": 4, "target_modules": ["q_proj"]}')
    refused(f"peft_config={tmp_path},rank=8", "drop rank")


ACCELERATE = """
import torch, transformers
from accelerate import Accelerator
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{config}))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
data = torch.utils.data.DataLoader(torch.randint(500, (8, 32), generator=torch.Generator().manual_seed(0)),
                                   batch_size=2)
accelerator = Accelerator(cpu=True)
model, optimizer, data = accelerator.prepare(model, optimizer, data)
for ids in data:
    accelerator.backward(model(input_ids=ids, labels=ids).loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
"""


def test_an_accelerate_script_under_memopt_run(llama, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(ACCELERATE.format(config=LLAMA))
    done = _memopt_run("--json", str(script), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    (result,) = doc["runs"]
    assert doc["spec"]["train"]["steps"] == 4
    _states_are_analytic(result, LLAMA_PARAMS, LLAMA_TENSORS)
    profiled = _profiled(llama, 2)
    assert abs(result["peak_bytes"] - profiled) <= 0.01 * profiled, (result["peak_bytes"], profiled)
