"""TensorFlow's own records of a step's memory, read back: the allocator's events from the profiler (an xplane
protobuf, parsed with the ``xplane_pb2`` module TensorFlow ships) and XLA's buffer assignment (its text dump).

Allocator events carry the bytes asked for, the address, the op, output or temp, shape and dtype; with
``TF_CPU_ALLOCATOR_USE_BFC=true`` set before TensorFlow is imported every CPU allocation emits one. Replayed per
address they give the step's tensor bytes over time: what the step allocates on top of what was live before it
(the variables), a buffer the step frees that it did not allocate counted off what was there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PHASES = ("forward", "backward", "optimizer")


@dataclass(frozen=True)
class AllocatorEvent:
    """One allocation (``bytes`` > 0) or deallocation (``bytes`` < 0) by TensorFlow's allocator."""

    time_ps: int
    bytes: int
    address: int
    op: str
    region: str   # "output", "temp" or "" (unknown)
    shape: str


def read_allocator_events(xplane: Path) -> list[AllocatorEvent]:
    """Every MemoryAllocation/MemoryDeallocation event of the host plane, in time order."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # TensorFlow's own copy of the profiler's schema

    space = xplane_pb2.XSpace()
    space.ParseFromString(xplane.read_bytes())
    events: list[AllocatorEvent] = []
    for plane in space.planes:
        names, stat_names = plane.event_metadata, plane.stat_metadata
        for line in plane.lines:
            for ev in line.events:
                kind = names[ev.metadata_id].name
                if kind not in ("MemoryAllocation", "MemoryDeallocation"):
                    continue
                stats: dict[str, Any] = {}
                for stat in ev.stats:
                    which = stat.WhichOneof("value")
                    value = getattr(stat, which)
                    stats[stat_names[stat.metadata_id].name] = stat_names[value].name if which == "ref_value" else value
                size = int(stats.get("requested_bytes", 0))
                events.append(AllocatorEvent(
                    time_ps=line.timestamp_ns * 1000 + ev.offset_ps,
                    bytes=size if kind == "MemoryAllocation" else -size, address=int(stats.get("addr", 0)),
                    op=str(stats.get("tf_op", "")), region=str(stats.get("region_type", "")),
                    shape=str(stats.get("shape", ""))))
    events.sort(key=lambda e: e.time_ps)  # stable: one thread's events keep their order
    return events


@dataclass
class ReplayedStep:
    """A step's allocator events replayed on top of what was live before it (``resident``, by category)."""

    peak_bytes: int                                   # resident + the step's live bytes at their highest
    peak_breakdown: dict[str, int]                    # by category at that point
    category_peak_bytes: dict[str, int]               # each category's own highest point
    phase_peak_bytes: dict[str, int]                  # the highest point reached by an allocation of each phase
    peak_phase: str
    peak_op: str
    events: int


def phase_of(op: str, optimizer_scope: str) -> str:
    """The phase an op belongs to, by its name scope: gradients are built under ``gradient_tape/``, the optimizer's
    updates under its own name; the rest is the forward pass and the loss. In graph mode TensorFlow interleaves
    them, so a phase here is where an allocation came from, not a span of time."""
    if op.startswith("gradient_tape/"):
        return "backward"
    if optimizer_scope and op.startswith(optimizer_scope + "/"):
        return "optimizer"
    return "forward"


def category_of(event: AllocatorEvent, phase: str, weight_shapes: set[str]) -> str:
    """Where an allocation's bytes count: a weight's new buffer written by the optimizer (``Assign*VariableOp``) is
    params; a backward output shaped like a weight is its gradient; a forward output is an activation (live at the
    peak: kept for backward, or not yet let go); everything else is temporaries. By names and shapes: approximate
    where TensorFlow's names say less (a weight-shaped intermediate of backward reads as a gradient)."""
    if phase == "optimizer" and "Assign" in event.op.rsplit("/", 1)[-1]:
        return "params"
    if phase == "backward" and event.region == "output" and event.shape in weight_shapes:
        return "grads"
    if phase == "forward" and event.region == "output":
        return "activations"
    return "temporaries"


def replay(events: list[AllocatorEvent], resident: dict[str, int], optimizer_scope: str,
           weight_shapes: set[str]) -> ReplayedStep:
    """Live bytes after each event, by category, on top of ``resident``; a buffer freed that the step did not
    allocate (a variable's old buffer, replaced by the optimizer's update) comes off params."""
    current = {c: resident.get(c, 0) for c in ("params", "buffers", "grads", "optimizer", "activations",
                                               "temporaries")}
    live: dict[int, tuple[AllocatorEvent, str]] = {}
    total = sum(current.values())
    best = ReplayedStep(peak_bytes=total, peak_breakdown=dict(current), category_peak_bytes=dict(current),
                        phase_peak_bytes=dict.fromkeys(PHASES, 0), peak_phase="forward", peak_op="", events=len(events))
    for event in events:
        if event.bytes > 0:
            phase = phase_of(event.op, optimizer_scope)
            category = category_of(event, phase, weight_shapes)
            live[event.address] = (event, category)
            current[category] += event.bytes
            total += event.bytes
            best.phase_peak_bytes[phase] = max(best.phase_peak_bytes[phase], total)
            best.category_peak_bytes[category] = max(best.category_peak_bytes[category], current[category])
            if total > best.peak_bytes:
                best.peak_bytes, best.peak_breakdown = total, dict(current)
                best.peak_phase, best.peak_op = phase, event.op
        else:
            mine = live.pop(event.address, None)
            category = mine[1] if mine is not None else "params"
            size = mine[0].bytes if mine is not None else -event.bytes
            current[category] -= size
            total -= size
    return best


@dataclass(frozen=True)
class BufferAssignment:
    """XLA's buffer assignment of one compiled computation: bytes by kind of allocation."""

    total_bytes: int        # "Total bytes used" of its memory-usage report
    parameter_bytes: int    # the step's inputs: weights, optimizer slots, the batch
    temp_bytes: int         # the preallocated temporary buffer (every intermediate, overlapped by XLA)
    output_bytes: int
    constant_bytes: int
    module: str

    def to_json(self) -> dict[str, Any]:
        return {"total_bytes": self.total_bytes, "parameter_bytes": self.parameter_bytes,
                "temp_bytes": self.temp_bytes, "output_bytes": self.output_bytes,
                "constant_bytes": self.constant_bytes, "module": self.module}


_ALLOCATION = re.compile(r"^allocation \d+: size (\d+), (.*)$")


def read_buffer_assignment(dump_dir: Path, name_part: str = "one_step_on_data") -> BufferAssignment:
    """The buffer assignment XLA dumped (``--xla_dump_to=DIR --xla_dump_hlo_as_text``) for the computation whose
    name holds ``name_part`` (Keras's train step); the largest one when it was compiled more than once.
    ValueError when there is none."""
    reports = sorted(dump_dir.glob(f"*{name_part}*after_optimizations-buffer-assignment.txt"))
    if not reports:
        raise ValueError(f"XLA wrote no buffer assignment for {name_part} in {dump_dir}")
    found = [_parse_assignment(path) for path in reports]
    return max(found, key=lambda b: b.total_bytes)


def _parse_assignment(path: Path) -> BufferAssignment:
    sizes = {"parameter": 0, "temp": 0, "output": 0, "constant": 0}
    for line in path.read_text(errors="replace").splitlines():
        match = _ALLOCATION.match(line)
        if match is None:
            continue
        size, what = int(match.group(1)), match.group(2)
        if what.startswith("parameter"):
            sizes["parameter"] += size
        elif "constant" in what.split(",")[0]:
            sizes["constant"] += size
        elif "temp" in what.split(",")[0]:
            sizes["temp"] += size
        else:
            sizes["output"] += size
    usage = path.with_name(path.name.replace("buffer-assignment", "memory-usage-report"))
    total = sum(sizes.values())
    if usage.exists():
        first = re.search(r"Total bytes used: (\d+)", usage.read_text(errors="replace"))
        total = int(first.group(1)) if first else total
    module = path.name.split(".")[1] if "." in path.name else path.name
    return BufferAssignment(total_bytes=total, parameter_bytes=sizes["parameter"], temp_bytes=sizes["temp"],
                            output_bytes=sizes["output"], constant_bytes=sizes["constant"], module=module)
