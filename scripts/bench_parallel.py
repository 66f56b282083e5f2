"""Per-rank memory under FSDP, tensor parallelism and both on a 2-D mesh: measured on gloo ranks here, estimated for
clusters, beside the formula a user would otherwise use.

1. A seed-sized llama (memopt's decoder: d512, 8 heads, 6 layers, vocab 32000, SwiGLU 1376; batch 8 x 256, fp32,
   AdamW) on 1, 2 and 4 gloo ranks as FSDP, TP and 2 x 2 (TP 2 inside, FSDP 2 across): measured (memopt launches
   the ranks) and one rank estimated on a fake process group.
2. llama-70b and a 405B-shaped llama (seq 8192, one sequence per data-parallel group, FSDP bf16 mixed precision
   with fp32 master state, AdamW, full ckpt) on 64 x 8 and 128 x 8 meshes: one rank traced, beside the formula
   (model states / N at 16 bytes a parameter, plus the checkpointed layer inputs and one recomputed layer), with
   the time and RSS of each estimate.

    python scripts/bench_parallel.py               # about 25 minutes on 2 CPU cores
    python scripts/bench_parallel.py --no-measure  # part 2 only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
GiB, MiB = 2**30, 2**20
SEED_LLAMA = dict(arch="decoder", d_model=512, n_heads=8, n_kv_heads=8, n_layers=6, vocab_size=32000, ffn_dim=1376,
                  max_seq_len=512)
LAYOUTS = [("1 rank", 1, ""), ("FSDP 2", 2, "fsdp"), ("FSDP 4", 4, "fsdp"), ("TP 2", 2, "tp:size=2"),
           ("TP 4", 4, "tp:size=4"), ("2 x 2 (FSDP 2 x TP 2)", 4, "tp:size=2+fsdp")]
LARGE = {
    "llama-70b": dict(arch="decoder", d_model=8192, n_heads=64, n_kv_heads=8, n_layers=80, vocab_size=32000,
                      ffn_dim=28672, max_seq_len=8192),
    "llama-405b-shaped": dict(arch="decoder", d_model=16384, n_heads=128, n_kv_heads=8, n_layers=126,
                              vocab_size=128256, ffn_dim=53248, max_seq_len=8192),
}
MESHES = [(64, 8), (128, 8)]


def memopt(*args: str) -> tuple[dict[str, Any], float]:
    began = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "memopt", *args, "--json"], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"memopt {' '.join(args)} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout), time.perf_counter() - began


def spec_file(folder: Path, name: str, model: dict[str, Any], train: dict[str, Any], run: dict[str, Any]) -> str:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"model": model, "train": train, "run": run}))
    return str(path)


def measured_rows(folder: Path) -> list[str]:
    config = spec_file(folder, "seed-llama", SEED_LLAMA, {"batch_size": 8, "seq_len": 256, "steps": 1},
                       {"device": "cpu"})
    rows = []
    for label, world, strategies in LAYOUTS:
        args = [config, *(["-s", strategies] if strategies else []), *(["--world-size", str(world)] if world > 1
                                                                        else [])]
        doc, seconds = memopt("profile", *args)
        run = doc["runs"][0]
        traced = memopt("estimate", *args)[0]["runs"][0]
        ranks = run.get("ranks") or [run]
        peaks = [r["peak_bytes"] / MiB for r in ranks]
        off = 100 * (traced["peak_bytes"] - run["peak_bytes"]) / run["peak_bytes"]
        rows.append(f"| {label} | {min(peaks):,.2f} - {max(peaks):,.2f} | {run['state_bytes']['params'] / MiB:,.2f} | "
                    f"{traced['peak_bytes'] / MiB:,.2f} ({off:+.2f}%) | {run['loss']:.6f} | {run['step_time_s']:.2f} s "
                    f"| {seconds:.0f} s |")
        print(f"  {label}: peak {run['peak_bytes'] / MiB:,.2f} MiB, estimate {off:+.2f}%", file=sys.stderr)
    return rows


def formula(model: dict[str, Any], params: int, world: int, tp: int, seq: int = 8192) -> tuple[float, float]:
    """What a careful user computes by hand for this layout: model states / N (fp32 params and grads, AdamW's two
    moments: 16 bytes a parameter), and with full recompute one sequence's bf16 layer inputs kept for backward
    (L*s*h*2, whole on every tensor-parallel rank) plus one layer recomputed with flash attention (Korthikanti et al.
    2022 without the s^2 score term: s*h*(10 + 24/t))."""
    h, layers = model["d_model"], model["n_layers"]
    return 16 * params / world, layers * seq * h * 2 + seq * h * (10 + 24 / tp)


def estimated_rows(folder: Path) -> list[str]:
    rows = []
    for name, model in LARGE.items():
        for dp, tp in MESHES:
            world = dp * tp
            config = spec_file(folder, name, model, {"batch_size": dp, "seq_len": 8192, "steps": 1},
                               {"device": "cuda"})
            doc, seconds = memopt("estimate", config, "-s", f"tp:size={tp}+fsdp:mixed_precision=bf16+ckpt",
                                  "--world-size", str(world))
            run = doc["runs"][0]
            states = sum(run["state_bytes"][c] for c in ("params", "grads", "optimizer"))
            formula_states, formula_acts = formula(model, run["params"]["total"], world, tp)
            rows.append(f"| {name} | {dp} x {tp} ({world}) | {run['peak_bytes'] / GiB:,.2f} | {states / GiB:,.2f} | "
                        f"{run['peak_breakdown'].get('unshard', 0) / GiB:,.2f} | "
                        f"{run['category_peak_bytes'].get('activations', 0) / GiB:,.2f} | "
                        f"{formula_states / GiB:,.2f} + {formula_acts / GiB:,.2f} = "
                        f"{(formula_states + formula_acts) / GiB:,.2f} | {seconds:.0f} s | "
                        f"{run['rss_peak_bytes'] / GiB:.2f} GiB |")
            print(f"  {name} {dp} x {tp}: {run['peak_bytes'] / GiB:,.2f} GiB in {seconds:.0f} s", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-measure", action="store_true", help="skip part 1 (the measured runs)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.no_measure:
            print("seed-sized llama, measured", file=sys.stderr)
            rows = measured_rows(folder)
            print("\n### Seed-sized llama (decoder d512 L6 V32000, batch 8 x 256, fp32, AdamW), gloo ranks here\n")
            print("| layout | per-rank peak MiB (min - max) | params per rank MiB | estimate MiB (off) | loss | "
                  "step time | wall |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            print("\n".join(rows))
        print("large models, estimated", file=sys.stderr)
        rows = estimated_rows(folder)
        print("\n### Per-rank estimates (CUDA, seq 8192, one sequence per data-parallel group, FSDP bf16 mixed "
              "precision, AdamW, ckpt)\n")
        print("| model | mesh dp x tp (ranks) | peak GiB | model states GiB | gathered bf16 GiB | activations GiB | "
              "hand formula: states / N + checkpointed activations GiB | time | RSS |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
