"""Model states off the device: the best lossless mix against its baseline, and what `optimize` finds at 10%.

On the seed config (the design document's encoder) and on the llama-shaped HF model of the seed's size (d512,
ffn 1376, 6 layers, vocab 32000, batch 8 x seq 512, fp32, AdamW), each run in its own process:

- the baseline and the best lossless mix with the model states offloaded (measured: peak, step time, bytes moved
  off the device and back per step, from offload_states' report);
- ``memopt optimize --budget <10% of the baseline>`` without --allow-lossy: the mix it picks and its peak.

    python scripts/bench_offload_states.py            # about 15 minutes on 2 CPU cores
    python scripts/bench_offload_states.py --no-optimize
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LLAMA = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6,
         "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 512,
         "tie_word_embeddings": False}
BEST = "offload_states:params=true+optim_in_bwd+ckpt+chunked_ce+offload"
MiB = 2**20


def memopt(*args: str, may_fail: bool = False) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "memopt", *args, "--json"], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        if may_fail:
            return {"error": out.stderr.strip()}
        raise SystemExit(f"memopt {' '.join(args)} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def profile(model: list[str], strategies: str | None) -> dict[str, Any]:
    run = memopt("profile", *model, "--steps", "2", *(["-s", strategies] if strategies else []))["runs"][0]
    print(f"  {strategies or 'baseline'}: {run['peak_bytes'] / MiB:,.2f} MiB", file=sys.stderr)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-optimize", action="store_true", help="skip memopt optimize (the slow part)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        llama = Path(folder) / "config.json"
        llama.write_text(json.dumps(LLAMA))
        models = {"seed (encoder d512 L6 V32000, batch 8 x 512)": ["configs/seed.yaml"],
                  "HF llama d512 L6 V32000, batch 8 x 512": ["--hf", str(llama), "--batch-size", "8",
                                                             "--seq-len", "512"]}
        for title, model in models.items():
            print(title, file=sys.stderr)
            base, best = profile(model, None), profile(model, BEST)
            facts = best["strategy_facts"]
            steps = 3  # the warm-up and two measured steps moved bytes; the report counts every step the tier saw
            moved_off = facts["offload_states"]["moved_off_device_bytes"] / steps
            moved_back = facts["offload_states"]["moved_to_device_bytes"] / steps
            found = None
            if not args.no_optimize:
                budget = f"{base['peak_bytes'] // 10}B"
                doc = memopt("optimize", *model, "--budget", budget, "--top", "1", may_fail=True)
                winner = {} if "error" in doc else doc["candidates"][0]
                found = winner and {"strategies": "+".join(winner["strategies"]),
                                    "peak_bytes": winner.get("measured_peak") or winner["peak"]}
                print(f"  optimize --budget {budget}: {found or doc.get('error')}", file=sys.stderr)
            rows.append((title, base, best, moved_off, moved_back, found))
    print("| model | baseline peak | best lossless peak | of baseline | step time (baseline) | moved off / back per "
          "step | `optimize --budget 10%` found |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for title, base, best, off, back, found in rows:
        picked = "-" if found is None else (f"`{found.get('strategies', '?')}` "
                                            f"({found.get('peak_bytes', 0) / MiB:,.2f} MiB)" if found else "nothing")
        print(f"| {title} | {base['peak_bytes'] / MiB:,.2f} MiB | {best['peak_bytes'] / MiB:,.2f} MiB | "
              f"{100 * best['peak_bytes'] / base['peak_bytes']:.1f}% | {best['step_time_s']:.1f} s "
              f"({base['step_time_s']:.1f} s) | {off / MiB:,.0f} / {back / MiB:,.0f} MiB | {picked} |")
    print(f"\nbest lossless mix: `{BEST}`")


if __name__ == "__main__":
    main()
