"""estimate vs profile on the seed config per strategy, and what estimating large presets costs.

Usage: python scripts/bench_estimate.py [--skip-profile]
Every measurement runs in its own process (time and RSS are that process's). Targets: error <= 1%;
llama-7b <= 15 s and <= 1 GiB RSS; llama-70b <= 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from memopt.app.isolate import run_isolated
from memopt.core.units import format_bytes
from memopt.spec import load_spec

STRATEGIES = [[], ["ckpt"], ["ckpt:policy=selective"], ["sdpa"], ["chunked_ce"], ["amp"], ["accum:micro_batches=4"],
              ["offload"], ["optim_in_bwd"], ["quant:bits=4,lora=8"], ["optim8bit"], ["prune:ffn=0.5"],
              ["ckpt", "chunked_ce", "optim_in_bwd"]]

CHILD = """
import json, resource, sys, time
from memopt.analysis.estimate import estimate
from memopt.spec import load_spec
start = time.perf_counter()
spec = load_spec(sys.argv[1], json.loads(sys.argv[2]), strategies=json.loads(sys.argv[3]))
r = estimate(spec)
print(json.dumps({"peak": r.memory.peak_bytes, "state": r.memory.state_bytes, "seconds": time.perf_counter() - start,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def estimate_in_child(config: str | None, overrides: dict, strategies: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, config or "configs/seed.yaml", json.dumps(overrides),
                          json.dumps(strategies)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-profile", action="store_true", help="only the large presets")
    args = parser.parse_args()
    started = time.perf_counter()
    if not args.skip_profile:
        print("| seed config, strategies | profile peak | estimate peak | error | state bytes equal |")
        print("|---|---:|---:|---:|---|")
        for strategies in STRATEGIES:
            label = "+".join(strategies) or "baseline"
            print(f"[{time.perf_counter() - started:5.0f} s] {label}", file=sys.stderr)
            spec = load_spec(None, {"steps": 1, "device": "cpu"}, strategies=strategies)
            real = run_isolated(spec, label).to_json()
            est = estimate_in_child(None, {"steps": 1, "device": "cpu"}, strategies)
            if not real["ok"]:
                print(f"| {label} | failed: {real['error']} | | | |")
                continue
            error = (est["peak"] - real["peak_bytes"]) / real["peak_bytes"]
            print(f"| {label} | {format_bytes(real['peak_bytes'])} | {format_bytes(est['peak'])} | {100 * error:+.2f}% "
                  f"| {est['state'] == real['state_bytes']} |", flush=True)
        print()
    print("| estimate | peak | time | RSS |")
    print("|---|---:|---:|---:|")
    for preset, dtype in (("llama-7b", "bfloat16"), ("llama-7b", "float32"), ("llama-70b", "bfloat16"),
                          ("llama-70b", "float32")):
        print(f"[{time.perf_counter() - started:5.0f} s] {preset} {dtype}", file=sys.stderr)
        est = estimate_in_child(preset, {"batch_size": 1, "seq_len": 2048, "dtype": dtype, "device": "cpu"}, [])
        print(f"| {preset}, batch 1 x seq 2048, AdamW, {dtype} | {format_bytes(est['peak'])} | {est['seconds']:.1f} s "
              f"| {format_bytes(est['rss'])} |", flush=True)


if __name__ == "__main__":
    main()
