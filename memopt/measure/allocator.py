"""The CPU allocator's own account of a block of code: a reference for the tensor tracker, at the level below it.

PyTorch's profiler with ``profile_memory=True`` records every allocation and free of the CPU allocator, including
what no dispatch mode sees (``torch.get_rng_state``, ``storage.resize_``, buffers inside C++ kernels); replayed in
order they give the bytes allocated above the block's start at every moment, and so its peak.

    with allocator_replay() as replay:
        train_step(session)   # warm-up: what the measured step frees was allocated while the profiler ran
        replay.begin()
        train_step(session)
    replay.peak_bytes   # the most bytes allocated above begin(), at any moment after it

The profiler does not know the size of a block allocated before it started, so it drops that block's free
(PyTorch warns "Memory block of unknown size"): a step that frees what existed before it (a parameter released by
``offload_states``, state a library replaces) would replay too high. ``begin()`` inside the block measures from
there, with the blocks allocated since the profiler started known by size.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass

from torch.profiler import ProfilerActivity, profile, record_function

from memopt.core._torch_private import cpu_allocator_events, profiler_mark_times

WINDOW_MARK = "memopt::allocator_window"


@dataclass
class AllocatorReplay:
    peak_bytes: int = 0   # the most bytes allocated above the start of the block
    end_bytes: int = 0    # bytes allocated above the start when the block ended (negative: it freed more)
    events: int = 0

    def begin(self) -> None:
        """Measure from here (the peak and end are above the bytes allocated now). Collects garbage first: a cycle
        allocated before here and collected in the window would count as a free of the measured code."""
        gc.collect()
        with record_function(WINDOW_MARK):
            pass


@contextlib.contextmanager
def allocator_replay() -> Iterator[AllocatorReplay]:
    """Replay the CPU allocator's events of the block; the result is filled in when the block ends."""
    replay = AllocatorReplay()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield replay
    marks = profiler_mark_times(prof, WINDOW_MARK)
    begin = marks[-1] if marks else None
    events = [(time, nbytes) for time, nbytes in cpu_allocator_events(prof) if begin is None or time >= begin]
    total = 0
    for _time, nbytes in events:
        total += nbytes
        replay.peak_bytes = max(replay.peak_bytes, total)
    replay.end_bytes, replay.events = total, len(events)
