"""optimize on the seed config with budgets of 60%, 30% and 10% of the baseline peak.

Usage: python scripts/bench_optimize.py [CONFIG] [--only WORD,...]
Prints: budget, chosen mix, its measured peak, slowdown and drift, and the search time (target: each
search <= 5 minutes on 2 cores, measured peak under the budget). The 10% budget is below parameters +
AdamW state, so it is searched with --allow-lossy, and once more with a 2% drift cap (--max-drift);
the others without lossy strategies.
"""

from __future__ import annotations

import argparse
import sys
import time

from memopt.analysis.optimize import optimize, winner_spec
from memopt.app.isolate import run_isolated
from memopt.core.units import format_bytes
from memopt.render.text import drift_text
from memopt.spec import load_spec, spec_from_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=None)
    parser.add_argument("--only", help="comma-separated words: run only the rows whose label has one of them")
    args = parser.parse_args()
    cases = [("60%", 0.6, False, None), ("30%", 0.3, False, None), ("10%", 0.1, True, None),
             ("10% drift cap", 0.1, True, 0.02)]
    if args.only:
        cases = [c for c in cases if any(word in c[0] for word in args.only.split(","))]
    spec = load_spec(args.config, {"device": "cpu", "steps": 2}, strategies=[])
    base = run_isolated(spec, "baseline").to_json()
    print(f"baseline peak {format_bytes(base['peak_bytes'])}, step {base['step_time_s']:.2f} s", file=sys.stderr)
    print("| budget | lossy allowed | chosen mix | estimated peak | measured peak | slowdown | drift "
          "| sets estimated | search time |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for _label, fraction, lossy, cap in cases:
        budget = int(base["peak_bytes"] * fraction)
        allowed = f"{lossy}" + (f", drift <= {cap:.0%}" if cap is not None else "")
        started = time.perf_counter()
        def say(message: str, started: float = started) -> None:
            print(f"  [{time.perf_counter() - started:4.0f} s] {message}", file=sys.stderr)

        try:
            outcome = optimize(spec, budget, run_one=run_isolated, allow_lossy=lossy, top=3, max_drift=cap,
                               progress=say)
        except Exception as exc:
            print(f"| {fraction:.0%} ({format_bytes(budget)}) | {allowed} | {exc} | | | | | | "
                  f"{time.perf_counter() - started:.0f} s |")
            continue
        seconds = time.perf_counter() - started
        w = outcome.winner
        if w.measured_peak is None:  # confirm the winner when the search could not measure it
            done = run_isolated(spec_from_data(winner_spec(spec, outcome)), w.label).to_json()
            w.measured_peak, w.measured_s = done.get("peak_bytes"), done.get("step_time_s")
        slowdown = w.measured_s / base["step_time_s"] if w.measured_s else float("nan")
        print(f"| {fraction:.0%} ({format_bytes(budget)}) | {allowed} | {w.label} | {format_bytes(w.peak)} | "
              f"{format_bytes(w.measured_peak or 0)} {'ok' if (w.measured_peak or 0) <= budget else 'OVER'} | "
              f"{slowdown:.2f}x | {drift_text(w.drift)} | {outcome.evaluated} | {seconds:.0f} s |", flush=True)
        if outcome.rejected:
            print(f"  left out for drift: {', '.join(outcome.rejected)}", file=sys.stderr)


if __name__ == "__main__":
    main()
