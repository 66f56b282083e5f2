"""Where users train, measured: a Hugging Face llama of the seed's width and depth (d512, 8 heads, 6 layers,
V32000; batch 4 x 256 to keep it quick on 2 cores), AdamW, fp32, each loop in its own process:

- the plain loop under ``memopt run``, and PyTorch's ``MemTracker`` around the same loop's steady step;
- the Hugging Face Trainer and a Lightning module under ``memopt run``;
- the overhead: the plain loop's wall time under ``memopt run`` against the bare script (same steps).

    python scripts/bench_integrations.py                   # about 6 minutes on 2 CPU cores
    python scripts/bench_integrations.py --overhead-only   # the last part
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
              intermediate_size=2048, vocab_size=32000, max_position_embeddings=512)
STEPS, BATCH, SEQ = 4, 4, 256
COMMON = f"""
import sys, torch, transformers
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{CONFIG}))
ids = torch.randint(32000, ({STEPS} * {BATCH}, {SEQ}), generator=torch.Generator().manual_seed(0))
"""
PLAIN = COMMON + f"""
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
def step(batch):
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for i in range({STEPS}):
    step(ids[i * {BATCH}:(i + 1) * {BATCH}])
if "--memtracker" in sys.argv:
    from torch.distributed._tools.mem_tracker import MemTracker
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        step(ids[:{BATCH}])
    print("MEMTRACKER", tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"], file=sys.stderr)
"""
TRAINER = COMMON + f"""
from transformers import Trainer, TrainingArguments
rows = [{{"input_ids": r, "labels": r}} for r in ids]
args = TrainingArguments(output_dir=sys.argv[1], per_device_train_batch_size={BATCH}, max_steps={STEPS},
                         learning_rate=1e-4, report_to=[], save_strategy="no", logging_strategy="no",
                         use_cpu=True, disable_tqdm=True, max_grad_norm=0.0)
Trainer(model=model, args=args, train_dataset=rows).train()
"""
LIGHTNING = COMMON + f"""
import warnings, pytorch_lightning as pl
warnings.filterwarnings("ignore")
class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = model
    def training_step(self, batch, index):
        return self.model(input_ids=batch, labels=batch).loss
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)
pl.Trainer(max_steps={STEPS}, accelerator="cpu", logger=False, enable_checkpointing=False,
           enable_progress_bar=False, enable_model_summary=False).fit(
    Module(), torch.utils.data.DataLoader(ids, batch_size={BATCH}))
"""


def timed(args: list[str], cwd: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    began = time.perf_counter()
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=1800)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - began, done


def main() -> int:
    MiB = 2**20
    with tempfile.TemporaryDirectory() as folder:
        for name, text in (("plain.py", PLAIN), ("trainer.py", TRAINER), ("lightning.py", LIGHTNING)):
            (Path(folder) / name).write_text(text)
        rows = []
        for name in () if "--overhead-only" in sys.argv else ("plain.py", "trainer.py", "lightning.py"):
            print(f"memopt run {name}", file=sys.stderr, flush=True)
            _, done = timed(["-m", "memopt", "run", "--json", name, folder], folder)
            run = json.loads(done.stdout)["runs"][0]
            rows.append((name, run["peak_bytes"], run["state_bytes"]))
        memtracker = 0
        if rows:
            _, reference = timed(["plain.py", folder, "--memtracker"], folder)
            memtracker = int(reference.stderr.split("MEMTRACKER")[1].split()[0])
        bare = [timed(["plain.py", folder], folder)[0] for _ in range(2)]
        tracked = [timed(["-m", "memopt", "run", "plain.py", folder], folder)[0] for _ in range(2)]
    print(f"\nHF llama d512 L6 V32000, AdamW fp32, batch {BATCH} x {SEQ}, {STEPS} steps (the first the warm-up)\n")
    print("| loop | memopt peak | params + grads + AdamW | MemTracker peak |\n|---|---:|---:|---:|")
    for name, peak, state in rows:
        states = state["params"] + state["grads"] + state["optimizer"]
        reference_cell = f"{memtracker / MiB:.2f} MiB ({memtracker - peak:+,} B)" if name == "plain.py" else \
            "not wired (it wraps one step of a loop it is handed)"
        print(f"| {name.removesuffix('.py')} | {peak / MiB:.2f} MiB | {states / MiB:.2f} MiB | {reference_cell} |")
    ratio = min(tracked) / min(bare)
    print(f"\nmemopt run overhead on the plain script (best of 2, whole process): bare {min(bare):.1f} s, "
          f"memopt run {min(tracked):.1f} s, {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
