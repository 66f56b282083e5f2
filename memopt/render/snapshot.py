"""PyTorch's memory snapshot format, both ways: memopt's step written as the dict ``torch.cuda.memory._snapshot()``
returns (so that pytorch.org/memory_viz and ``torch.cuda._memory_viz`` open it), and a snapshot a user recorded
on their own CUDA job (``torch.cuda.memory._record_memory_history()`` + ``_dump_snapshot()``) read back as a
MemoryTrace.

The snapshot's ``segments`` hold the blocks alive when it was taken; ``device_traces`` the allocator's events
before that (``alloc``, ``free_requested``, ``free_completed``, ``segment_alloc``, ...). Written by memopt, every
allocation is a segment of its own at a made-up address (the tracker sees storages, not the caching allocator's
segments), and the first frame of each names memopt's view: the op, category and module.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from memopt.core.errors import MemoptError
from memopt.core.files import read_input_bytes
from memopt.core.trace import Allocation, Frame, MemoryTrace

BASE_ADDRESS = 0x7F0000000000
ALIGN = 512
MAX_SNAPSHOT_BYTES = 4 * 2**30
SNAPSHOT_CATEGORY = "allocated"  # a user's snapshot has no categories: every block is this
FREE_ACTIONS = ("free_completed", "free")  # the block's bytes are free again (free: snapshots before PyTorch 2.1)


def _frames(allocation: Allocation, category: str) -> list[dict[str, Any]]:
    what = f"{allocation.op or 'registered'} [{category}]" + (f" in {allocation.module}" if allocation.module else "")
    own = [{"filename": "memopt", "line": 0, "name": what}]
    return own + [{"filename": f, "line": line, "name": name} for f, line, name in allocation.frames or []]


def _addresses(trace: MemoryTrace) -> list[int]:
    """A made-up address per allocation, none reused, each room for its largest size."""
    addresses, next_address = [], BASE_ADDRESS
    for allocation in trace.allocations:
        addresses.append(next_address)
        largest = max([allocation.nbytes, *(n for _, _, n in allocation.changes)])
        next_address += max(ALIGN, -(-largest // ALIGN) * ALIGN)
    return addresses


def _events(trace: MemoryTrace, addresses: list[int]) -> list[dict[str, Any]]:
    """The allocator's events of the step: alloc; free_requested and free_completed; a resize as both."""
    events: list[dict[str, Any]] = []
    for at, (kind, index) in enumerate(zip(trace.kinds, trace.subjects)):
        if index < 0 or kind not in ("alloc", "free", "resize"):
            continue
        allocation = trace.allocations[index]
        category, nbytes = allocation.at(at)
        before = allocation.at(at - 1)[1]
        actions = {"alloc": [("alloc", nbytes)], "free": [("free_requested", before), ("free_completed", before)],
                   "resize": [("free_requested", before), ("free_completed", before), ("alloc", nbytes)]}[kind]
        events.extend({"action": action, "addr": addresses[index], "size": size, "stream": 0,
                       "time_us": trace.times_ns[at] // 1000, "frames": _frames(allocation, category)}
                      for action, size in actions if size)
    return events


def _segments(trace: MemoryTrace, addresses: list[int], device: int) -> list[dict[str, Any]]:
    """A segment of one active block for each allocation alive at the end."""
    end = len(trace.kinds) - 1
    segments = []
    for index, allocation in enumerate(trace.allocations):
        category, nbytes = allocation.at(end)
        if allocation.end is not None or not nbytes:
            continue
        frames = _frames(allocation, category)
        block = {"address": addresses[index], "size": nbytes, "requested_size": nbytes, "state": "active_allocated",
                 "frames": frames}
        segments.append({"device": device, "address": addresses[index], "total_size": nbytes,
                         "allocated_size": nbytes, "active_size": nbytes, "requested_size": nbytes, "stream": 0,
                         "segment_type": "large", "segment_pool_id": (0, 0), "is_expandable": False,
                         "frames": frames, "blocks": [block]})
    return segments


def to_snapshot(trace: MemoryTrace, device: int = 0) -> dict[str, Any]:
    """The step as a memory snapshot: an event per allocation, free and resize, and the blocks alive at its end."""
    addresses = _addresses(trace)
    traces: list[list[dict[str, Any]]] = [[] for _ in range(device)] + [_events(trace, addresses)]
    return {"segments": _segments(trace, addresses, device), "device_traces": traces,
            "allocator_settings": {"memopt": "written by memopt from its tracker; not a CUDA allocator's state"}}


class _PlainData(pickle.Unpickler):
    """A snapshot is plain data (dicts, lists, strings, numbers): anything else is refused, not run."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it names {module}.{name}, and a memory snapshot holds only plain data")


def read_snapshot(path: str | Path) -> dict[str, Any]:
    """The snapshot in FILE (a pickle as ``torch.cuda.memory._dump_snapshot`` writes it); MemoptError if it is not
    one. Nothing in it is executed: only plain data is read."""
    data = read_input_bytes(path, "memory snapshot", MAX_SNAPSHOT_BYTES)
    try:
        snapshot = _PlainData(io.BytesIO(data)).load()
    except Exception as exc:
        raise MemoptError(f"{path}: not a PyTorch memory snapshot ({type(exc).__name__}: {exc})") from None
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("segments"), list):
        raise MemoptError(f"{path}: not a PyTorch memory snapshot (no 'segments' list; write one with "
                          "torch.cuda.memory._dump_snapshot('snapshot.pickle'))")
    return snapshot


def _user_frames(raw: Any) -> list[Frame]:
    if not isinstance(raw, list):
        return []
    return [(str(f.get("filename", "?")), int(f.get("line", 0) or 0), str(f.get("name", "?")))
            for f in raw if isinstance(f, dict)]


def devices_of(snapshot: dict[str, Any]) -> list[int]:
    """The devices the snapshot has blocks or events on."""
    found = {int(s.get("device", 0)) for s in snapshot["segments"] if isinstance(s, dict)}
    found |= {i for i, events in enumerate(snapshot.get("device_traces") or []) if events}
    return sorted(found)


def snapshot_trace(snapshot: dict[str, Any], device: int) -> MemoryTrace:
    """One device's allocations over the recorded events as a MemoryTrace (category ``allocated``); blocks alive
    before the first event (allocated before history was recorded) are alive from event 0."""
    try:
        return _snapshot_trace(snapshot, device)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MemoptError(f"the snapshot's device {device} is not in the format PyTorch writes ({exc!r})") from None


def _alive_at_end(snapshot: dict[str, Any], device: int) -> dict[int, Any]:
    """address -> block, for the device's blocks alive when the snapshot was taken."""
    return {int(block["address"]): block for segment in snapshot["segments"] if int(segment.get("device", 0)) == device
            for block in segment.get("blocks", []) if block.get("state") == "active_allocated"}


def _alive_before(at_end: dict[int, Any], events: list[dict[str, Any]], frees: tuple[str, ...]) -> dict[int, int]:
    """address -> bytes alive before the first event: the end state, replayed backwards."""
    before = {address: int(block["size"]) for address, block in at_end.items()}
    for e in reversed(events):
        if e.get("action") == "alloc":
            before.pop(int(e["addr"]), None)
        elif e.get("action") in frees:
            before[int(e["addr"])] = int(e["size"])
    return before


def _snapshot_trace(snapshot: dict[str, Any], device: int) -> MemoryTrace:
    traces = snapshot.get("device_traces") or []
    events = [e for e in (traces[device] if device < len(traces) else []) if isinstance(e, dict)]
    frees = FREE_ACTIONS if {e.get("action") for e in events} & set(FREE_ACTIONS) else ("free_requested",)
    at_end = _alive_at_end(snapshot, device)
    before = _alive_before(at_end, events, frees)
    trace = MemoryTrace([SNAPSHOT_CATEGORY])
    current: dict[int, int] = {}  # address -> allocation index

    def made(address: int, nbytes: int, frames: list[Frame], start: int) -> int:
        current[address] = len(trace.allocations)
        trace.allocations.append(Allocation(nbytes, SNAPSHOT_CATEGORY, op=top_user_frame(frames),
                                            frames=frames or None, start=start))
        return current[address]

    for address, nbytes in before.items():
        made(address, nbytes, _user_frames(at_end[address].get("frames")) if address in at_end else [], 0)
    live = sum(before.values())
    start_us = next((e["time_us"] for e in events if "time_us" in e), 0)
    trace.record("start", -1, "recorded", None, [live], 0)
    for e in events:
        action, address = e.get("action"), int(e.get("addr", 0))
        if action == "alloc":
            subject = made(address, int(e["size"]), _user_frames(e.get("frames")), len(trace.kinds))
            live += trace.allocations[subject].nbytes
        elif action in frees and address in current:
            subject = current.pop(address)
            live -= trace.allocations[subject].nbytes
            trace.allocations[subject].end = len(trace.kinds)
        else:
            continue
        time_ns = (int(e.get("time_us", start_us)) - start_us) * 1000
        trace.record("alloc" if action == "alloc" else "free", subject, "recorded", None, [live], time_ns)
    return trace


def top_user_frame(frames: list[Frame]) -> str | None:
    """The innermost frame in the user's Python code: not PyTorch's, not the interpreter's or a C++ frame."""
    python = [f for f in frames if f[0].endswith(".py")]
    for filename, line, name in python:
        path = filename.replace("\\", "/")
        if "/torch/" not in path and "/site-packages/" not in path and "/dist-packages/" not in path \
                and "/lib/python" not in path:
            return f"{name} ({Path(filename).name}:{line})"
    if python:
        filename, line, name = python[0]
        return f"{name} ({Path(filename).name}:{line})"
    return None
