"""What tracking costs: the seed step with and without memopt's measurement, interleaved.

"Tracked" is exactly what ``memopt profile`` runs: the tensor tracker, saved-tensor hooks, gradient hooks,
the RSS sampler thread and tracemalloc.

Usage: python scripts/bench_overhead.py [--rounds 5] [--batch-size 8] [--seq-len 512]
Prints the median step time of each and the median ratio (target: tracking costs <= 10%).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from memopt.core.units import format_bytes
from memopt.engine.step import prepare, train_step
from memopt.measure.tracker import ModelWatch, TensorTracker, host_peaks
from memopt.spec import load_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    spec = load_spec(None, {"batch_size": args.batch_size, "seq_len": args.seq_len, "device": "cpu"})
    session = prepare(spec)
    train_step(session)  # warm-up: optimizer state exists from here on
    plain, tracked, ratios, tracker_entries, heaps = [], [], [], 0, []
    for i in range(args.rounds):
        with host_peaks("cpu") as untracked_host:
            start = time.perf_counter()
            train_step(session)
            plain.append(time.perf_counter() - start)
        tracker = TensorTracker("cpu")
        with host_peaks("cpu") as host, tracker:
            watch = ModelWatch(tracker, session.model, session.optimizer)
            start = time.perf_counter()
            train_step(session, tracker, watch)
            tracked.append(time.perf_counter() - start)
            tracker_entries = max(tracker_entries, len(tracker._live))
            watch.close()
        heaps.append(host.python_heap_peak_bytes - untracked_host.python_heap_peak_bytes)
        ratios.append(tracked[-1] / plain[-1])
        print(f"round {i + 1}: plain {plain[-1] * 1000:.0f} ms, tracked {tracked[-1] * 1000:.0f} ms", file=sys.stderr)
    print(f"| seed step (batch {args.batch_size}, seq {args.seq_len}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads) | median |")
    print("|---|---|")
    print(f"| untracked step | {statistics.median(plain) * 1000:.0f} ms |")
    print(f"| tracked step | {statistics.median(tracked) * 1000:.0f} ms |")
    print(f"| median ratio tracked/untracked | {statistics.median(ratios):.3f} |")
    print(f"| tracker's own memory | {format_bytes(statistics.median(heaps))} of Python heap (tracemalloc, "
          f"tracked minus untracked step; {tracker_entries} storages live at the end), no tensor memory |")


if __name__ == "__main__":
    main()
