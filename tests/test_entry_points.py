"""A user's own nn.Module from ``pkg.module:factory`` entry points (issue 13): ``model: {python: ..., kwargs: ...,
batch: ..., loss: ...}`` and ``--model``. The tests write the user's module into a temporary folder on the import
path: a tiny LM (an nn.Embedding, an nn.ModuleList of identical blocks, a Linear head)."""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from memopt.adapters.build import build_adapter, parameter_total, vocab_size
from memopt.analysis.estimate import estimate
from memopt.engine.step import make_batch, prepare
from memopt.spec import Spec, spec_from_data

from .helpers import invoke, run

MODULE = "memopt_test_user_model"
USER_MODULE = '''
"""A user's model, its batches and its loss."""
import types

import torch
import torch.nn.functional as F
from torch import nn

CALLS = {"factory": [], "forward": 0, "loss": [], "batch": []}


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class TinyLm(nn.Module):
    def __init__(self, vocab=300, d=32, layers=3, returns="logits"):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)
        self.returns = returns

    def forward(self, ids, labels=None):
        CALLS["forward"] += 1
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        logits = self.head(x)
        if self.returns == "logits":
            return logits
        own = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())  # its own objective
        if self.returns == "scalar":
            return own
        return types.SimpleNamespace(loss=own, logits=logits)


def make(**kwargs):
    CALLS["factory"].append(kwargs)
    return TinyLm(**kwargs)


def make_batch(batch_size, seq_len, device):
    CALLS["batch"].append((batch_size, seq_len, device))
    ids = torch.randint(50, (batch_size, seq_len + 1), device=device)
    return {"ids": ids[:, :-1], "labels": ids[:, 1:]}


def loss(output, batch):
    CALLS["loss"].append(sorted(batch))
    return F.cross_entropy(output.flatten(0, 1), batch["labels"].flatten())


def boom():
    raise RuntimeError("no weights here;\\nsee the docs")


def not_a_module():
    return 42


def returns_none():
    return None


NOT_CALLABLE = 3
'''


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The user's module, importable as MODULE (and the folder it is in); removed from sys.modules after."""
    folder = tmp_path_factory.mktemp("user-code")
    (folder / f"{MODULE}.py").write_text(USER_MODULE)
    (folder / "memopt_test_broken_import.py").write_text("import memopt_test_not_installed_dependency\n")
    (folder / "memopt_test_raises_on_import.py").write_text("raise ValueError('bad config:\\nline 2; and more')\n")
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    module = importlib.import_module(MODULE)
    yield module
    sys.path.remove(str(folder))
    for name in (MODULE, "memopt_test_broken_import", "memopt_test_raises_on_import"):
        sys.modules.pop(name, None)


def user_spec(strategies: list[str] | None = None, **model: Any) -> Spec:
    return spec_from_data({"model": {"python": f"{MODULE}:make", **model},
                           "train": {"batch_size": 2, "seq_len": 16, "steps": 1}, "run": {"device": "cpu"}},
                          strategies=strategies or [])


def tiny_lm_parameters(vocab: int, d: int, layers: int) -> int:
    block = 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return vocab * d + layers * block + d * vocab + vocab


def test_defaults_random_ids_and_cross_entropy_of_the_logits(user):
    kwargs = {"vocab": 257, "d": 16, "layers": 2}
    spec = user_spec(kwargs=kwargs)
    assert vocab_size(spec.model) == 257  # from the nn.Embedding the factory built with these kwargs
    assert user.CALLS["factory"][-1] == kwargs
    assert parameter_total(spec.model) == tiny_lm_parameters(257, 16, 2)
    torch.manual_seed(0)
    adapter = build_adapter(spec, "cpu")
    ids, targets = make_batch(spec, "cpu")
    assert ids.shape == targets.shape == (2, 16) and int(ids.max()) < 257 and torch.equal(ids[:, 1:], targets[:, :-1])
    expected = F.cross_entropy(adapter.model(ids).flatten(0, 1), targets.flatten())
    assert torch.equal(adapter.loss((ids, targets)), expected)
    real, traced = run(spec), estimate(spec)
    assert real.params_total == traced.params_total == tiny_lm_parameters(257, 16, 2)
    assert traced.memory.peak_bytes == real.memory.peak_bytes
    assert 4.5 < real.loss < 6.5  # about ln(257): random ids, a fresh model


@pytest.mark.parametrize("returns", ["scalar", "loss_attribute"])
def test_a_scalar_output_or_its_loss_attribute_is_the_loss(user, returns):
    spec = user_spec(kwargs={"returns": returns})
    torch.manual_seed(0)
    adapter = build_adapter(spec, "cpu")
    batch = make_batch(spec, "cpu")
    output = adapter.model(batch[0])
    own = output if returns == "scalar" else output.loss
    assert own.dim() == 0 and torch.equal(adapter.loss(batch), own)
    assert run(spec).memory.peak_bytes == estimate(spec).memory.peak_bytes


def test_custom_batch_is_passed_as_keyword_arguments_and_the_custom_loss_used(user, tmp_path, monkeypatch):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(json.dumps({
        "model": {"python": f"{MODULE}:make", "kwargs": {"vocab": 50}, "batch": f"{MODULE}:make_batch",
                  "loss": f"{MODULE}:loss"},
        "train": {"batch_size": 4, "seq_len": 8, "steps": 1}, "run": {"device": "cpu"},
        "strategies": ["accum:micro_batches=2"]}))
    user.CALLS["loss"].clear()
    user.CALLS["batch"].clear()
    out = tmp_path / "out.json"
    result = invoke(["profile", spec_file, "--json-out", out])
    assert result.exit_code == 0, result.output
    assert user.CALLS["batch"] and set(user.CALLS["batch"]) == {(4, 8, "cpu")}
    assert user.CALLS["loss"] and all(keys == ["ids", "labels"] for keys in user.CALLS["loss"])  # the dict, split
    doc = json.loads(out.read_text())
    assert doc["runs"][0]["params"]["total"] == tiny_lm_parameters(50, 32, 3)
    from memopt.spec import load_spec

    spec = load_spec(spec_file)
    torch.manual_seed(0)
    adapter = build_adapter(spec, "cpu")
    batch = make_batch(spec, "cpu")
    assert isinstance(batch, dict) and batch["ids"].shape == (4, 8)
    expected = F.cross_entropy(adapter.model(**batch).flatten(0, 1), batch["labels"].flatten())
    assert torch.equal(adapter.loss(batch), expected)
    assert estimate(spec).memory.peak_bytes == run(spec).memory.peak_bytes


def test_ckpt_wraps_the_module_list_and_lowers_activations(user):
    baseline, ckpt = run(user_spec()), run(user_spec(["ckpt"]))
    assert ckpt.memory.category_peak_bytes["activations"] < 0.5 * baseline.memory.category_peak_bytes["activations"]
    assert ckpt.loss == baseline.loss
    assert estimate(user_spec(["ckpt"])).memory.peak_bytes == ckpt.memory.peak_bytes
    blocks = prepare(user_spec(["ckpt"])).model.blocks
    assert len(blocks) == 3 and all(type(b).__name__ == "Checkpointed" for b in blocks)


def test_quant_and_lora_apply_to_the_linears_of_the_blocks(user):
    real = run(user_spec(["quant:bits=4,lora=4"]))
    lora = 3 * 4 * ((32 + 128) + (128 + 32))  # rank 4 on up (32->128) and down (128->32) in 3 blocks
    assert real.params_trainable == lora
    assert estimate(user_spec(["quant:bits=4,lora=4"])).memory.peak_bytes == real.memory.peak_bytes


@pytest.mark.parametrize("strategy,reason", [
    ("chunked_ce", "chunked_ce: needs to know the model's final hidden states and output head, which memopt cannot "
                   "for a model from a Python factory"),
    ("sdpa", "sdpa: needs to know the model's attention kernel, which memopt cannot for a model from a Python "
             "factory"),
    ("prune:ffn=0.5", "prune: needs to know the model's feed-forward and attention layout, which memopt cannot for a "
                      "model from a Python factory"),
])
@pytest.mark.parametrize("command", ["profile", "estimate"])
def test_what_cannot_apply_is_refused_with_the_reason_before_anything_runs(user, command, strategy, reason):
    forward_calls = user.CALLS["forward"]
    result = invoke([command, "--model", f"{MODULE}:make", "--seq-len", 8, "-s", strategy])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [f"error: {reason}"]
    assert user.CALLS["forward"] == forward_calls  # the model never ran (refused before the factory is called)


def test_the_current_directory_is_on_the_import_path(user, tmp_path, monkeypatch):
    (tmp_path / "memopt_test_cwd_model.py").write_text(f"from {MODULE} import make\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "memopt_test_cwd_model", raising=False)
    result = invoke(["estimate", "--model", "memopt_test_cwd_model:make", "--seq-len", 8, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["runs"][0]["params"]["total"] == tiny_lm_parameters(300, 32, 3)


BAD = {
    "missing module": (["--model", "memopt_test_nowhere:make"],
                       "error: --model model.python: memopt_test_nowhere:make cannot be imported, no module named "
                       "'memopt_test_nowhere' (the import path holds the current directory and PYTHONPATH)"),
    "missing dependency": (["--model", "memopt_test_broken_import:make"],
                           "error: --model model.python: memopt_test_broken_import:make cannot be imported, no module "
                           "named 'memopt_test_not_installed_dependency' (the import path holds the current directory "
                           "and PYTHONPATH)"),
    "import raises": (["--model", "memopt_test_raises_on_import:make"],
                      "error: --model model.python: memopt_test_raises_on_import:make cannot be imported, importing "
                      "memopt_test_raises_on_import raised ValueError: bad config: line 2, and more"),
    "missing attribute": (["--model", f"{MODULE}:factory"],
                          f"error: --model model.python: {MODULE}:factory not found, {MODULE} has no attribute "
                          "factory"),
    "not callable": (["--model", f"{MODULE}:NOT_CALLABLE"],
                     f"error: --model model.python: {MODULE}:NOT_CALLABLE is not callable (a value of type int)"),
    "factory raises": (["--model", f"{MODULE}:boom"],
                       f"error: model.python: {MODULE}:boom raised RuntimeError: no weights here, see the docs"),
    "not a Module": (["--model", f"{MODULE}:not_a_module"],
                     f"error: model.python: {MODULE}:not_a_module returned a value of type int, not an nn.Module"),
    "returns None": (["--model", f"{MODULE}:returns_none"],
                     f"error: model.python: {MODULE}:returns_none returned None, not an nn.Module"),
    "--hf and --model": (["--hf", "gpt2", "--model", f"{MODULE}:make"],
                         "error: --hf and --model each name a model: give one of them"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_entry_points_are_one_message_naming_them(user, case):
    args, expected = BAD[case]
    result = invoke(["estimate", *args, "--seq-len", 8])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [expected]


def test_bad_batch_and_loss_entry_points_are_named(user, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({"model": {"python": f"{MODULE}:make", "batch": f"{MODULE}:boom",
                                          "loss": f"{MODULE}:nothing"}, "train": {"seq_len": 8}}))
    result = invoke(["estimate", spec])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"model.loss: {MODULE}:nothing not found" in result.output
    spec.write_text(json.dumps({"model": {"python": f"{MODULE}:make", "batch": f"{MODULE}:boom"},
                                "train": {"seq_len": 8}}))
    result = invoke(["estimate", spec])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        f"error: model.batch: {MODULE}:boom raised TypeError: boom() takes 0 positional arguments but 3 were given"]

