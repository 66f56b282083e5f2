"""One measured step, event by event: every allocation, free, resize and category change the tracker saw, with the
live bytes per category after each. The HTML report, the memory_viz snapshot and the Chrome trace are drawn from it,
and ``memopt view`` reads a user's CUDA snapshot into one. Plain data, no torch.

Event 0 is the start of the step; an allocation with ``start == 0`` was already alive then (a parameter, optimizer
state). An allocation is alive at event ``i`` when ``start <= i < end``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

Frame = tuple[str, int, str]  # (file name, line, function)


@dataclass
class Allocation:
    """One storage (or, from a CUDA snapshot, one allocator block) over the step."""

    nbytes: int
    category: str
    op: str | None = None          # the op that made it; None: registered (a parameter, optimizer state), or unknown
    module: str | None = None      # the module running when it was made
    phase: str | None = None
    shape: list[int] | None = None
    dtype: str | None = None
    frames: list[Frame] | None = None  # the Python stack where it was made, innermost first (--stacks)
    start: int = 0                 # the event that made it; 0: alive when the step began
    end: int | None = None         # the event that freed it; None: alive at the end
    changes: list[tuple[int, str, int]] = field(default_factory=list)  # (event, category, bytes) since start

    def at(self, event: int) -> tuple[str, int]:
        """Its category and bytes at ``event``."""
        category, nbytes = self.category, self.nbytes
        for index, new_category, new_bytes in self.changes:
            if index > event:
                break
            category, nbytes = new_category, new_bytes
        return category, nbytes

    def alive_at(self, event: int) -> bool:
        return self.start <= event and (self.end is None or event < self.end)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Allocation:
        frames = data.get("frames")
        return cls(**{**data, "frames": [tuple(f) for f in frames] if frames is not None else None,
                      "changes": [tuple(c) for c in data.get("changes", [])]})


@dataclass
class Live:
    """An allocation as it was at one event."""

    allocation: Allocation
    category: str
    nbytes: int


@dataclass
class MemoryTrace:
    """The step's events (parallel lists, one entry per event) and its allocations."""

    categories: list[str]
    phases: list[str] = field(default_factory=list)
    modules: list[str | None] = field(default_factory=list)
    bytes: list[list[int]] = field(default_factory=list)    # live bytes per category after the event
    times_ns: list[int] = field(default_factory=list)       # since the step began
    kinds: list[str] = field(default_factory=list)          # start, alloc, free, resize, move
    subjects: list[int] = field(default_factory=list)       # the allocation's index; -1 for the start
    allocations: list[Allocation] = field(default_factory=list)

    def record(self, kind: str, subject: int, phase: str, module: str | None, live: list[int], time_ns: int) -> int:
        """Append one event; its index."""
        self.kinds.append(kind)
        self.subjects.append(subject)
        self.phases.append(phase)
        self.modules.append(module)
        self.bytes.append(live)
        self.times_ns.append(time_ns)
        return len(self.kinds) - 1

    def totals(self) -> list[int]:
        return [sum(b) for b in self.bytes]

    def peak_index(self) -> int:
        """The first event at the highest live total, after the category changes that followed it at once (the
        split the tracker reports for its peak)."""
        totals = self.totals()
        if not totals:
            return 0
        index = max(range(len(totals)), key=totals.__getitem__)
        while index + 1 < len(totals) and self.kinds[index + 1] == "move":
            index += 1
        return index

    def peak_bytes(self) -> int:
        return max(self.totals(), default=0)

    def alive_at(self, event: int) -> list[Live]:
        """The allocations alive at ``event``, largest first."""
        live = [Live(a, *a.at(event)) for a in self.allocations if a.alive_at(event)]
        return sorted((x for x in live if x.nbytes), key=lambda x: -x.nbytes)

    def peaks_by(self, what: str) -> dict[str, tuple[int, int]]:
        """The highest live total while each phase (``what="phases"``) or module ran: name -> (bytes, event)."""
        names = self.phases if what == "phases" else self.modules
        peaks: dict[str, tuple[int, int]] = {}
        for index, (name, total) in enumerate(zip(names, self.totals())):
            if name is not None and total > peaks.get(name, (-1, 0))[0]:
                peaks[name] = (total, index)
        return peaks

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "allocations"}
        data["allocations"] = [a.to_json() for a in self.allocations]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MemoryTrace:
        return cls(**{**data, "allocations": [Allocation.from_json(a) for a in data["allocations"]]})
