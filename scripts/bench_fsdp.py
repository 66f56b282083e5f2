"""Per-rank memory under FSDP2: measured on N gloo ranks here, estimated for large N, beside ZeRO-3's formula.

1. The seed config (encoder d512 L6 V32000, batch 8 x 512, fp32, AdamW) on 1, 2 and 4 ranks, measured (memopt
   launches the ranks; each steps on its shard of the batch), and the one-rank estimate beside each.
2. llama-7b and llama-70b (bfloat16, CUDA, seq 2048, one sequence per rank) per-rank estimates for 8, 64 and
   512 ranks, with and without ckpt: one rank traced on fake tensors in a fake process group; DeepSpeed's
   ZeRO-3 model-states formula (params + grads + AdamW state) / N beside, and the time and RSS of each estimate.

    python scripts/bench_fsdp.py               # about 15 minutes on 2 CPU cores
    python scripts/bench_fsdp.py --no-measure  # part 2 only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GiB, MiB = 2**30, 2**20


def memopt(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "memopt", *args, "--json"], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"memopt {' '.join(args)} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def zero3(doc: dict[str, Any]) -> int:
    a = doc["analytic"]
    return int(a["params"] + a["grads"] + (a["optimizer"] or 0))


def measured_rows() -> list[str]:
    rows = []
    for world in (1, 2, 4):
        args = ["configs/seed.yaml", *(["--world-size", str(world)] if world > 1 else [])]
        began = time.perf_counter()
        run = memopt("profile", *args)["runs"][0]
        seconds = time.perf_counter() - began
        est = memopt("estimate", *args)
        traced = est["runs"][0]
        states = sum(run["state_bytes"][c] for c in ("params", "grads", "optimizer"))
        ranks = run.get("ranks") or [run]
        peaks = [r["peak_bytes"] / MiB for r in ranks]
        spread = f"{min(peaks):,.2f} - {max(peaks):,.2f}"
        off = 100 * (traced["peak_bytes"] - run["peak_bytes"]) / run["peak_bytes"]
        unshard = run["peak_breakdown"].get("unshard", 0)
        rows.append(f"| {world} | {spread} | {unshard / MiB:,.2f} | {states / MiB:,.2f} | {zero3(est) / MiB:,.2f} | "
                    f"{traced['peak_bytes'] / MiB:,.2f} ({off:+.2f}%) | {run['step_time_s']:.2f} s | {seconds:.0f} s |")
        print(f"  seed on {world}: peak {run['peak_bytes'] / MiB:,.2f} MiB, estimate {off:+.2f}%", file=sys.stderr)
    return rows


def estimated_rows() -> list[str]:
    rows = []
    for preset in ("llama-7b", "llama-70b"):
        for world in (8, 64, 512):
            for strategies in ("", "ckpt"):
                args = [preset, "--batch-size", str(world), "--seq-len", "2048", "--dtype", "bf16", "--device",
                        "cuda", "--world-size", str(world), *(["-s", strategies] if strategies else [])]
                began = time.perf_counter()
                doc = memopt("estimate", *args)
                seconds = time.perf_counter() - began
                run = doc["runs"][0]
                states = sum(run["state_bytes"][c] for c in ("params", "grads", "optimizer"))
                formula = zero3(doc)
                rows.append(f"| {preset} | {world} | {strategies or '-'} | {run['peak_bytes'] / GiB:,.2f} | "
                            f"{run['peak_breakdown'].get('unshard', 0) / GiB:,.2f} | {states / GiB:,.2f} | "
                            f"{formula / GiB:,.2f} ({100 * (formula - states) / states:+.1f}% states, "
                            f"{100 * (formula - run['peak_bytes']) / run['peak_bytes']:+.0f}% peak) | "
                            f"{seconds:.0f} s | {run['rss_peak_bytes'] / GiB:.2f} GiB |")
                print(f"  {preset} x{world} {strategies}: {run['peak_bytes'] / GiB:,.2f} GiB in {seconds:.0f} s",
                      file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-measure", action="store_true", help="skip part 1 (the measured seed runs)")
    args = parser.parse_args()
    if not args.no_measure:
        print("seed config, measured", file=sys.stderr)
        rows = measured_rows()
        print("\n### Seed config (encoder d512 L6 V32000, batch 8 x 512, fp32, AdamW), gloo ranks on this CPU\n")
        print("| ranks | per-rank peak MiB (min - max) | unshard at peak MiB | model states per rank MiB | "
              "ZeRO-3 formula MiB | estimate MiB (off) | step time | wall |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        print("\n".join(rows))
    print("large models, estimated", file=sys.stderr)
    rows = estimated_rows()
    print("\n### Per-rank estimates (bfloat16, CUDA, seq 2048, one sequence per rank, AdamW)\n")
    print("| model | ranks | strategies | peak GiB | unshard GiB | model states GiB | ZeRO-3 formula GiB (off) | "
          "time | RSS |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
