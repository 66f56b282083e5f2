"""Every strategy on the seed config, each in its own process: peak, saving, time, saving vs theory.

Usage: python scripts/bench_strategies.py [CONFIG] [--steps 2]
Prints a Markdown table (copied into README). Theory per strategy, in the category it targets:
  ckpt (full)   activations: baseline - what stays: L x layer-input bytes + the embedding/head's activations
                at the end of forward, or L - 1 layer inputs + one recomputed layer in backward, whichever
                is larger; one layer = (baseline - the 1-layer model) / (L - 1), embedding/head = the
                1-layer model - one layer (the issue's looser bound, L inputs + one layer + head, reads 121%)
  ckpt every k  activations: ceil(L / k) checkpointed layers x (one layer - its input)
  ckpt selective activations: L x (one layer - its input - the matmul outputs it keeps), the kept outputs
                being the projections, the b x heads x s^2 scores, attention x V and the FFN matmuls
  sdpa          activations: L x b x heads x s^2 x 4 bytes of attention probabilities
  chunked_ce    peak: 3 x b x s x V x 4 bytes (logits, log-probabilities, their gradient)
  accum k       activations: baseline x (1 - 1/k)
  offload       activations: all of them leave the device
  optim_in_bwd  grads: all gradients but the largest parameter's
  amp           activations: half of what the baseline's matmuls save for backward (autocast stores those
                in 16 bits) less a 16-bit copy of each weight they save (memopt.strategies.amp.expected_saving,
                one forward of the baseline in this process)
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from memopt.isolate import run_isolated
from memopt.spec import Spec, load_spec, spec_from_data
from memopt.strategies.amp import expected_saving
from memopt.units import format_bytes

RUNS = ["ckpt", "ckpt:policy=every,every=2", "ckpt:policy=selective", "sdpa", "chunked_ce", "amp",
        "accum:micro_batches=4", "offload", "optim_in_bwd", "ckpt+chunked_ce+optim_in_bwd",
        "sdpa+chunked_ce+ckpt+optim_in_bwd",
        # compression (issue: quantized frozen weights with LoRA, 8-bit optimizer states, pruning)
        "quant:bits=8,lora=8", "quant:bits=4,lora=8", "quant:bits=4,format=nf4,lora=8", "optim8bit",
        "prune:ffn=0.5,heads=0.25",
        "quant:bits=4,lora=8,embedding=true+sdpa+ckpt+chunked_ce+accum:micro_batches=4"]


def theory(name: str, spec: Spec, base: dict[str, Any], one_layer_acts: int) -> tuple[str, int] | None:
    """(category, theoretical saving in bytes) for a single strategy, or None when there is no formula."""
    m, t = spec.model, spec.train
    acts = base["category_peak_bytes"]["activations"]
    bsd = t.batch_size * t.seq_len * m.d_model * 4
    layer = (acts - one_layer_acts) // max(m.n_layers - 1, 1)
    if name == "ckpt":
        head = one_layer_acts - layer
        return "activations", acts - max(m.n_layers * bsd + head, (m.n_layers - 1) * bsd + layer)
    if name.startswith("ckpt:policy=every"):
        k = int(name.rsplit("=", 1)[1])
        return "activations", -(-m.n_layers // k) * (layer - bsd)
    if name == "ckpt:policy=selective":
        return "activations", m.n_layers * (layer - bsd - matmul_outputs(spec))
    if name == "sdpa":
        return "activations", m.n_layers * t.batch_size * m.n_heads * t.seq_len ** 2 * 4
    if name == "chunked_ce":
        return "peak", 3 * t.batch_size * t.seq_len * m.vocab_size * 4
    if name.startswith("accum"):
        k = int(name.rsplit("=", 1)[1])
        return "activations", acts * (k - 1) // k
    if name == "offload":
        return "activations", acts
    if name == "optim_in_bwd":
        largest = max(m.vocab_size, m.max_seq_len, m.ffn_dim or 0) * m.d_model * 4
        return "grads", base["category_peak_bytes"]["grads"] - largest
    if name == "amp":
        return "activations", expected_saving(spec)
    return None


def matmul_outputs(spec: Spec) -> int:
    """Bytes of one layer's matmul and attention outputs, which selective checkpointing keeps."""
    m, t = spec.model, spec.train
    tokens = t.batch_size * t.seq_len
    kv = 2 * (m.n_kv_heads or m.n_heads) * m.head_dim
    ffn = m.ffn_dim * (2 if m.arch == "decoder" else 1)  # SwiGLU: gate and up
    scores = t.batch_size * m.n_heads * t.seq_len ** 2 if m.attention == "eager" else 0
    return 4 * (tokens * (m.d_model + kv + m.d_model + m.d_model + ffn + m.d_model) + scores)


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
        return run_isolated(spec_from_data(of.to_dict(), strategies=strategies), name)

    if args.only:
        global RUNS
        RUNS = [r for r in RUNS if any(word in r for word in args.only.split(","))]

    base = profile([], "baseline")
    one_layer = spec_from_data({**spec.to_dict(), "model": {**spec.to_dict()["model"], "n_layers": 1}})
    one_layer_acts = profile([], "baseline, 1 layer", one_layer)["category_peak_bytes"]["activations"]
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
        expected = theory(label, spec, base, one_layer_acts)
        vs_theory, target = "-", "-"
        if expected is not None and expected[1] > 0:
            target = expected[0]
            vs_theory = f"{100 * measured_saving(expected[0], base, run) / expected[1]:.1f}%"
        drift = run.get("drift")
        drift_text = f"{100 * drift['logits_rel_error']:.2f}% (loss {drift['loss_delta']:+.4f})" if drift else "-"
        print(f"| {label} | {format_bytes(run['peak_bytes'])} | {100 * saving:.1f}% | {run['step_time_s']:.2f} s "
              f"| {slowdown:.2f}x | {target} | {vs_theory} | {format_bytes(run['state_bytes']['params'])} "
              f"| {format_bytes(run['state_bytes']['optimizer'])} | {drift_text} |", flush=True)
    print(f"\nbaseline peak {format_bytes(base['peak_bytes'])}; params + AdamW state "
          f"{format_bytes(base['state_bytes']['params'] + base['state_bytes']['optimizer'])} "
          f"({100 * (base['state_bytes']['params'] + base['state_bytes']['optimizer']) / base['peak_bytes']:.0f}% "
          f"of it); total bench time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
