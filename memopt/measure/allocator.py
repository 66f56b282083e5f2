"""The CPU allocator's own account of a block of code: a reference for the tensor tracker, at the level below it.

PyTorch's profiler with ``profile_memory=True`` records every allocation and free of the CPU allocator, including
what no dispatch mode sees (``torch.get_rng_state``, ``storage.resize_``, buffers inside C++ kernels); replayed in
order they give the bytes allocated above the block's start at every moment, and so its peak.

    with allocator_replay() as replay:
        train_step(session)
    replay.peak_bytes   # the most bytes allocated above the start, at any moment of the block
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from torch.profiler import ProfilerActivity, profile

from memopt.core._torch_private import cpu_allocator_events


@dataclass
class AllocatorReplay:
    peak_bytes: int = 0   # the most bytes allocated above the start of the block
    end_bytes: int = 0    # bytes allocated above the start when the block ended (negative: it freed more)
    events: int = 0


@contextlib.contextmanager
def allocator_replay() -> Iterator[AllocatorReplay]:
    """Replay the CPU allocator's events of the block; the result is filled in when the block ends."""
    replay = AllocatorReplay()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield replay
    total = 0
    for _time, nbytes in cpu_allocator_events(prof):
        total += nbytes
        replay.peak_bytes = max(replay.peak_bytes, total)
    replay.end_bytes, replay.events = total, len(cpu_allocator_events(prof))
