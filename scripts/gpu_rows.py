"""The CUDA benchmark rows (scripts/gpu_check.sh runs it on a lent GPU): for each setting, the tracker's peak, the
CUDA allocator's max allocated and reserved, what of the difference is named, the step time and its ratio to the
baseline's. Each run in its own process (memopt profile --json).

    python scripts/gpu_rows.py [OUT_FOLDER]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memopt.core.results import StepMemory, cuda_reconciliation  # noqa: E402

MiB = 2**20
TRAIN = ["", "ckpt", "chunked_ce", "quant:bits=4", "ckpt+offload", "offload_states", "offload_states:params=true",
         "offload_states+ckpt+chunked_ce", "offload_states:params=true+optim_in_bwd+ckpt+chunked_ce+offload",
         "allocator:expandable_segments=true"]
GENERATE = ["", "kv_quant:bits=8", "kv_quant:bits=4", "quant:bits=4+kv_quant:bits=8"]
DECODER = ("model: {arch: decoder, d_model: 512, n_heads: 8, n_kv_heads: 2, n_layers: 6, vocab_size: 32000, "
           "ffn_dim: 1376, max_seq_len: 1024}\ntrain: {batch_size: 8, steps: 3}\nrun: {dtype: bfloat16}\n")


def profile(args: list[str], out: Path, name: str) -> dict | str:
    done = subprocess.run([sys.executable, "-m", "memopt", "profile", *args, "--device", "cuda", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=150)
    (out / f"{name}.json").write_text(done.stdout)
    (out / f"{name}.err").write_text(done.stderr)
    if done.returncode:
        return done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
    return json.loads(done.stdout)["runs"][0]


def row(label: str, run: dict | str, base_time: float | None) -> str:
    if isinstance(run, str):
        return f"| {label} | failed: {run} |||||||"
    r = cuda_reconciliation(StepMemory.from_json(run), run["cuda"])
    ratio = f"{run['step_time_s'] / base_time:.2f}x" if base_time else "1.00x"
    return (f"| {label} | {r['tracker_peak'] / MiB:.2f} | {r['max_allocated'] / MiB:.2f} | "
            f"{r['difference'] / MiB:+.2f} ({r['difference'] / r['max_allocated']:+.1%}) | "
            f"{r['outside_at_start'] / MiB:.2f} | {r['unexplained'] / r['max_allocated']:+.2%} | "
            f"{r['max_reserved'] / MiB:.2f} | {run['step_time_s'] * 1000:.1f} ms | {ratio} |")


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu_out")
    out.mkdir(parents=True, exist_ok=True)
    decoder = out / "decoder.yaml"
    decoder.write_text(DECODER)
    header = ("| setting | tracker MiB | allocated MiB | allocated - tracker | outside ops at start MiB | unexplained "
              "| reserved MiB | step | vs baseline |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("seed config, training, --steps 3\n" + header, flush=True)
    base_time = None
    for i, setting in enumerate(TRAIN):
        run = profile(["configs/seed.yaml", "--steps", "3", *(["-s", setting] if setting else [])], out, f"train{i}")
        if not setting and not isinstance(run, str):
            base_time = run["step_time_s"]
        print(row(setting or "baseline", run, base_time), flush=True)
    print("\nsmall decoder, bfloat16, generate 8 x (448 + 64)\n" + header, flush=True)
    base_time = None
    for i, setting in enumerate(GENERATE):
        run = profile([str(decoder), "--mode", "generate", "--prompt-len", "448", "--new-tokens", "64",
                       *(["-s", setting] if setting else [])], out, f"gen{i}")
        if not setting and not isinstance(run, str):
            base_time = run["step_time_s"]
        print(row(setting or "baseline", run, base_time), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
