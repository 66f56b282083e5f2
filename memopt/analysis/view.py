"""``memopt view``: a memory snapshot a user recorded on their own CUDA job, read as memopt reads its own runs: the
peak over the recorded events, the allocations alive at the peak by size with their frames, grouped by the top
frame of the user's code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memopt.core.errors import MemoptError
from memopt.core.trace import Live, MemoryTrace
from memopt.render.snapshot import devices_of, read_snapshot, snapshot_trace, top_user_frame

NO_FRAME = "(no Python frame recorded)"


@dataclass
class SnapshotView:
    """One device of a snapshot: its peak and what was alive then."""

    path: str
    device: int
    devices: dict[int, int]       # every device in the snapshot -> its peak
    trace: MemoryTrace
    alive: list[Live]
    groups: list[tuple[str, int, int]]  # (top user frame, bytes, allocations), largest first
    note: str | None = None

    @property
    def peak_bytes(self) -> int:
        return self.trace.peak_bytes()

    @property
    def peak_index(self) -> int:
        return self.trace.peak_index()


def view(path: str | Path, device: int | None = None) -> SnapshotView:
    """The snapshot in ``path``, for ``device`` (default: the one with the highest peak)."""
    snapshot = read_snapshot(path)
    traces = {d: snapshot_trace(snapshot, d) for d in devices_of(snapshot)}
    if not traces:
        raise MemoptError(f"{path}: the snapshot holds no allocation (nothing was alive and no event was recorded)")
    if device is not None and device not in traces:
        raise MemoptError(f"--device {device}: the snapshot has devices {', '.join(map(str, sorted(traces)))}")
    peaks = {d: t.peak_bytes() for d, t in traces.items()}
    chosen = device if device is not None else max(peaks, key=peaks.__getitem__)
    trace = traces[chosen]
    alive = trace.alive_at(trace.peak_index())
    groups: dict[str, list[int]] = {}
    for live in alive:
        group = groups.setdefault(top_user_frame(live.allocation.frames or []) or NO_FRAME, [0, 0])
        group[0] += live.nbytes
        group[1] += 1
    note = None
    if len(trace.kinds) == 1:
        note = ("the snapshot has no recorded events (memory history was not being recorded): this is what was "
                "alive when it was taken, not the peak")
    return SnapshotView(str(path), chosen, peaks, trace, alive,
                        sorted(((k, v[0], v[1]) for k, v in groups.items()), key=lambda g: -g[1]), note)
