"""optimize at 60%, 30% and 10% of the baseline peak, and whether its winner is the fastest set that fits.

Usage: python scripts/bench_optimize.py [CONFIG] [--batch-size N] [--only 60%,...] [--lossy] [--check-fastest]

For each budget the search runs as ``memopt optimize`` does (every set estimated, the contenders measured in
rounds beside a fresh baseline, each run in a process of its own) and the row shows its winner, estimated and
measured peak, and its measured ratio to the baseline with the spread over rounds. ``--lossy`` adds a 10% row
with --allow-lossy and a 2% drift cap.

``--check-fastest`` then measures every set that any search estimated to fit its budget (each once, in a process
of its own, a fresh baseline before every third set and after the last; a set's ratio is its median step over the
median of the baselines on either side), and each row gains the fastest set that fits measured so, and the
winner's time against it (target: the winner within 10% of the fastest).

    python scripts/bench_optimize.py configs/seed.yaml --batch-size 2 --check-fastest   # about 40 minutes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from memopt.analysis.optimize import Candidate, Outcome, optimize, ranks_of
from memopt.app.isolate import run_isolated
from memopt.core.errors import MemoptError
from memopt.core.units import format_bytes
from memopt.render.text import drift_text
from memopt.spec import Spec, load_spec

CASES = [("60%", 0.6, False, None), ("30%", 0.3, False, None), ("10%", 0.1, False, None)]
LOSSY_CASE = ("10% lossy, drift cap", 0.1, True, 0.02)
EVERY = 3  # sets measured between two baselines in --check-fastest


def _say(started: float) -> Any:
    def say(message: str) -> None:
        print(f"  [{time.perf_counter() - started:4.0f} s] {message}", file=sys.stderr, flush=True)
    return say


def _run(spec: Spec, candidate: Candidate | None) -> dict[str, Any]:
    if candidate is None:
        return run_isolated(spec, "baseline", drift=False).to_json()
    return run_isolated(spec.with_strategies((*candidate.strategies, *ranks_of(spec))), candidate.label,
                        drift=False).to_json()


def measure_all(spec: Spec, sets: list[Candidate]) -> dict[str, tuple[float, int]]:
    """label -> (ratio to the baselines beside it, measured peak), each set run once."""
    say = _say(time.perf_counter())
    out: dict[str, tuple[float, int]] = {}
    for first in range(0, len(sets), EVERY):
        group = sets[first:first + EVERY]
        before = _run(spec, None)["step_times_s"]
        runs: list[dict[str, Any]] = []
        for c in group:
            say(f"measuring {c.label} ({first + len(runs) + 1}/{len(sets)})")
            runs.append(_run(spec, c))
        after = _run(spec, None)["step_times_s"]
        baseline = statistics.median([*before, *after])
        for c, r in zip(group, runs):
            if r.get("ok", True) and r.get("step_times_s"):
                out[c.label] = (statistics.median(r["step_times_s"]) / baseline, r["peak_bytes"])
    return out


def print_table(outcomes: list[tuple[str, int, bool, float | None, Outcome, float]], failed: dict[str, str],
                checked: dict[str, tuple[float, int]]) -> None:
    print("| budget | lossy | winner | est. peak | measured peak | x baseline (search) | drift | sets estimated | "
          "search time | fastest fitting set, measured once each | winner / fastest |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for label, why in failed.items():
        print(f"| {label} | | {why} | | | | | | | | |")
    for label, budget, lossy, cap, outcome, seconds in outcomes:
        w = outcome.winner
        ratio = w.ratio.text() if w.ratio is not None else "-"
        allowed = "no" if not lossy else f"yes, drift <= {cap:.0%}" if cap is not None else "yes"
        fastest = target = "-"
        fitting = {k: v for k, v in checked.items() if v[1] <= budget and k in {c.label for c in outcome.fitting}}
        if fitting and w.label in checked:
            best = min(fitting, key=lambda k: fitting[k][0])
            fastest = f"{best} ({fitting[best][0]:.2f}x of {len(fitting)})"
            share = checked[w.label][0] / fitting[best][0]
            target = f"{share:.2f} {'ok' if share <= 1.10 else 'OVER 1.10'}"
        print(f"| {label} ({format_bytes(budget)}) | {allowed} | {w.label} | {format_bytes(w.peak)} | "
              f"{format_bytes(w.measured_peak or 0)} {'ok' if (w.measured_peak or 0) <= budget else 'OVER'} | "
              f"{ratio} | {drift_text(w.drift)} | {outcome.evaluated} | {seconds:.0f} s | {fastest} | {target} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--only", help="comma-separated budget labels to run (60%%, 30%%, 10%%)")
    parser.add_argument("--lossy", action="store_true", help="also the 10%% budget with lossy strategies")
    parser.add_argument("--check-fastest", action="store_true", help="measure every set that fits (see above)")
    args = parser.parse_args()
    cases = CASES + ([LOSSY_CASE] if args.lossy else [])
    if args.only:
        cases = [c for c in cases if c[0] in args.only.split(",")]
    overrides: dict[str, Any] = {"device": "cpu", "steps": 2}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    spec = load_spec(args.config, overrides, strategies=[])
    base = run_isolated(spec, "baseline").to_json()
    print(f"baseline peak {format_bytes(base['peak_bytes'])}, step {base['step_time_s']:.2f} s", file=sys.stderr)
    outcomes: list[tuple[str, int, bool, float | None, Outcome, float]] = []
    failed: dict[str, str] = {}
    for label, fraction, lossy, cap in cases:
        budget = int(base["peak_bytes"] * fraction)
        started = time.perf_counter()
        try:
            outcome = optimize(spec, budget, run_one=run_isolated, allow_lossy=lossy, top=3, max_drift=cap,
                               progress=_say(started))
        except MemoptError as exc:  # nothing fits: that row says so
            failed[label] = str(exc)
            continue
        outcomes.append((label, budget, lossy, cap, outcome, time.perf_counter() - started))
    checked: dict[str, tuple[float, int]] = {}
    if args.check_fastest:
        sets: dict[str, Candidate] = {}
        for *_, outcome, _seconds in outcomes:
            for c in outcome.fitting:
                sets.setdefault(c.label, c)
        checked = measure_all(spec, list(sets.values()))
    print(f"{args.config or 'the default model'}, batch {spec.train.batch_size} x {spec.train.seq_len}, baseline "
          f"peak {format_bytes(base['peak_bytes'])}, {base['step_time_s']:.2f} s a step\n")
    print_table(outcomes, failed, checked)

if __name__ == "__main__":
    main()
