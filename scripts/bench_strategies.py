"""Every strategy on the seed config, each in its own process: peak, saving, time, saving vs theory.

Usage: python scripts/bench_strategies.py [CONFIG] [--steps 2]
Prints a Markdown table (copied into README). Theory per strategy, in the category it targets
(memopt/theory.py; one layer = (baseline - the 1-layer model) / (L - 1), head = the rest):
  ckpt          activations: baseline - what stays, the larger of L layer inputs + the head's activations
                at the end of forward and L - 1 inputs + one recomputed layer in backward (the issue's
                looser bound, L inputs + one layer + head, reads 121%)
  ckpt every k  activations: the same with only every k-th layer checkpointed
  ckpt selective activations: the same with each layer keeping its input and its matmul outputs (the
                projections, the b x heads x s^2 scores, attention x V and the FFN matmuls)
  sdpa          activations: L x b x heads x s^2 x 4 bytes of attention probabilities
  chunked_ce    peak: 3 x b x s x V x 4 bytes (logits, log-probabilities, their gradient)
  accum k       activations: baseline x (1 - 1/k)
  offload       activations: all of them leave the device
  optim_in_bwd  grads: all gradients but the largest parameter's
  amp           activations: half of what the baseline's matmuls save for backward (autocast stores those
                in 16 bits) less a 16-bit copy of each weight they save (one forward of the baseline in
                this process)
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from memopt.analysis.theory import expected_saving, one_layer_spec
from memopt.app.isolate import run_isolated
from memopt.core.units import format_bytes
from memopt.render.text import drift_text
from memopt.spec import Spec, load_spec, spec_from_data

RUNS = ["ckpt", "ckpt:policy=every,every=2", "ckpt:policy=selective", "sdpa", "chunked_ce", "amp",
        "accum:micro_batches=4", "offload", "optim_in_bwd", "ckpt+chunked_ce+optim_in_bwd",
        "sdpa+chunked_ce+ckpt+optim_in_bwd",
        # compression (issue: quantized frozen weights with LoRA, 8-bit optimizer states, pruning)
        "quant:bits=8,lora=8", "quant:bits=4,lora=8", "quant:bits=4,format=nf4,lora=8", "optim8bit",
        "prune:ffn=0.5,heads=0.25",
        "quant:bits=4,lora=8,embedding=true+sdpa+ckpt+chunked_ce+accum:micro_batches=4"]


def measured_saving(category: str, base: dict[str, Any], run: dict[str, Any]) -> int:
    if category == "peak":
        return base["peak_bytes"] - run["peak_bytes"]
    return base["category_peak_bytes"][category] - run["category_peak_bytes"][category]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=None)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--only", help="comma-separated words: run only the sets containing one of them")
    args = parser.parse_args()
    spec = load_spec(args.config, {"steps": args.steps, "device": "cpu"}, strategies=[])
    started = time.perf_counter()

    def profile(strategies: list[str], name: str, of: Spec = spec) -> dict[str, Any]:
        print(f"[{time.perf_counter() - started:5.0f} s] {name}", file=sys.stderr)
        return run_isolated(spec_from_data(of.to_dict(), strategies=strategies), name).to_json()

    if args.only:
        global RUNS
        RUNS = [r for r in RUNS if any(word in r for word in args.only.split(","))]

    base = profile([], "baseline")
    one_layer_acts = profile([], "baseline, 1 layer", one_layer_spec(spec))["category_peak_bytes"]["activations"]
    print("| run | peak | saving | step time | slowdown | targets | saving vs theory | params | optimizer | drift |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    print(f"| baseline | {format_bytes(base['peak_bytes'])} | - | {base['step_time_s']:.2f} s | 1.00x | - | - "
          f"| {format_bytes(base['state_bytes']['params'])} | {format_bytes(base['state_bytes']['optimizer'])} | - |")
    for label in RUNS:
        run = profile(label.split("+"), label)
        if not run["ok"]:
            print(f"| {label} | failed: {run['error']} | | | | | | | | |")
            continue
        saving = 1 - run["peak_bytes"] / base["peak_bytes"]
        slowdown = run["step_time_s"] / base["step_time_s"]
        expected = expected_saving(label, spec, base["category_peak_bytes"], one_layer_acts)
        vs_theory, target = "-", "-"
        if expected is not None and expected[1] > 0:
            target = expected[0]
            vs_theory = f"{100 * measured_saving(expected[0], base, run) / expected[1]:.1f}%"
        drift = run.get("drift")
        drift_cell = f"{drift_text(drift)} (loss {drift['loss_delta']:+.4f})" if drift else "-"
        print(f"| {label} | {format_bytes(run['peak_bytes'])} | {100 * saving:.1f}% | {run['step_time_s']:.2f} s "
              f"| {slowdown:.2f}x | {target} | {vs_theory} | {format_bytes(run['state_bytes']['params'])} "
              f"| {format_bytes(run['state_bytes']['optimizer'])} | {drift_cell} |", flush=True)
    print(f"\nbaseline peak {format_bytes(base['peak_bytes'])}; params + AdamW state "
          f"{format_bytes(base['state_bytes']['params'] + base['state_bytes']['optimizer'])} "
          f"({100 * (base['state_bytes']['params'] + base['state_bytes']['optimizer']) / base['peak_bytes']:.0f}% "
          f"of it); total bench time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
