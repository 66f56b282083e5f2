"""What a run measured, as plain dataclasses, and their schema-1 JSON. No torch: cheap to import.

``RunResult.to_json()`` is one entry of a document's ``runs`` (schema 1) and ``RunResult.from_json`` reads
one back, from a file or from a run in another process (memopt.app.isolate). A run dict does not carry what
only the process that ran it knows: the device (the document names it), each step's time, the FLOPs of
an estimate and the timeline; those come back empty.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from memopt.core.timing import Ratio
from memopt.core.trace import MemoryTrace


def _number(value: float | None) -> float:
    """A float from JSON, where strict writers put null for NaN and infinities."""
    return math.nan if value is None else value


class Category(str, Enum):
    """Where a tensor's bytes are counted. A str, so that JSON keys and older results (plain strings) compare equal."""

    PARAMS = "params"
    BUFFERS = "buffers"
    GRADS = "grads"
    OPTIMIZER = "optimizer"
    ACTIVATIONS = "activations"   # saved for backward
    KV_CACHE = "kv_cache"
    UNSHARD = "unshard"           # parameters an FSDP unit gathered for compute
    TEMPORARIES = "temporaries"   # everything else

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass
class StepMemory:
    """What the tracker saw during one step. Every number is bytes."""

    peak_bytes: int
    peak_breakdown: dict[str, int]
    category_peak_bytes: dict[str, int]
    phase_peak_bytes: dict[str, int]
    state_bytes: dict[str, int]
    peak_phase: str
    peak_module: str | None = None
    timeline: MemoryTrace | None = None  # every event of the step, when recorded; not in the run dict

    def to_json(self) -> dict[str, Any]:
        """The memory fields of a schema-1 run dict, in its order."""
        return {"state_bytes": self.state_bytes, "peak_bytes": self.peak_bytes,
                "peak_breakdown": self.peak_breakdown, "category_peak_bytes": self.category_peak_bytes,
                "phase_peak_bytes": self.phase_peak_bytes, "peak_phase": self.peak_phase,
                "peak_module": self.peak_module}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepMemory:
        """From a run dict. peak_bytes, category_peak_bytes and phase_peak_bytes are required (what memopt
        check compares; a hand-written baseline may hold only those); the other fields default to empty."""
        return cls(peak_bytes=data["peak_bytes"], peak_breakdown=data.get("peak_breakdown", {}),
                   category_peak_bytes=data["category_peak_bytes"], phase_peak_bytes=data["phase_peak_bytes"],
                   state_bytes=data.get("state_bytes", {}), peak_phase=data.get("peak_phase", ""),
                   peak_module=data.get("peak_module"))


@dataclass
class HostPeaks:
    """The process's own view: RSS peak, Python-heap peak (tracemalloc) and the CUDA allocator's peaks."""

    rss_peak_bytes: int = 0
    python_heap_peak_bytes: int = 0
    cuda: dict[str, int] | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        """The host fields of a schema-1 run dict, in its order."""
        return {"python_heap_peak_bytes": self.python_heap_peak_bytes, "rss_peak_bytes": self.rss_peak_bytes,
                "cuda": self.cuda}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostPeaks:
        return cls(rss_peak_bytes=data.get("rss_peak_bytes", 0),
                   python_heap_peak_bytes=data.get("python_heap_peak_bytes", 0), cuda=data.get("cuda"))


def cuda_reconciliation(memory: StepMemory, cuda: dict[str, int]) -> dict[str, int]:
    """The tracker's peak against the CUDA allocator's, itemised where memopt can name the difference (bytes):

    - ``outside_at_start``: allocated when the measured steps began and not a model state the tracker counts
      (cuBLAS workspaces, memory a library allocated outside any dispatched op);
    - ``unexplained``: the rest of ``max_allocated - tracker peak`` (negative: the tracker counted more);
    - ``reserved_not_allocated``: the allocator's cache at its peak, fragmentation included (what the
      ``allocator`` strategy's settings change)."""
    allocated, reserved = cuda["max_allocated_bytes"], cuda["max_reserved_bytes"]
    states = sum(memory.state_bytes.values())
    outside = max(0, cuda.get("allocated_at_start_bytes", states) - states)
    difference = allocated - memory.peak_bytes
    return {"tracker_peak": memory.peak_bytes, "max_allocated": allocated, "difference": difference,
            "outside_at_start": outside, "unexplained": difference - outside,
            "max_reserved": reserved, "reserved_not_allocated": reserved - allocated}


@dataclass
class VsBaseline:
    """A run against the baseline of the same compare (set by memopt.analysis.compare)."""

    saving: float                # 1 - peak / baseline peak
    slowdown: float              # step time / baseline step time
    loss_delta: float            # loss - baseline loss (same batch, after one identical update)
    grad_cosine: float | None    # warm-up gradients against the baseline's; None when the trainable sets differ
    slowdown_spread: float | None = None  # slowdown +- this (memopt.core.timing); None: not known

    @property
    def time_ratio(self) -> Ratio:
        return Ratio(self.slowdown, math.inf if self.slowdown_spread is None else self.slowdown_spread)

    def to_json(self) -> dict[str, Any]:
        return {"saving": self.saving, "slowdown": self.slowdown, "loss_delta": self.loss_delta,
                "grad_cosine": self.grad_cosine, "slowdown_spread": self.slowdown_spread,
                "same_time": self.time_ratio.to_json()["same"]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VsBaseline:
        return cls(saving=_number(data["saving"]), slowdown=_number(data["slowdown"]),
                   loss_delta=_number(data["loss_delta"]), grad_cosine=data.get("grad_cosine"),
                   slowdown_spread=data.get("slowdown_spread"))


@dataclass
class RunResult:
    """Everything one run measured. Sizes are bytes, times seconds.

    A failed run (``ok`` false: out of memory, killed, timed out) has only its name, strategies and error;
    it serialises to exactly those and ``ok``.
    """

    name: str
    strategies: list[dict[str, Any]]
    device: str  # "" when read back from a run dict, which does not carry it
    estimated: bool = False
    ok: bool = True
    error: str | None = None
    params_total: int = 0
    params_trainable: int = 0
    memory: StepMemory | None = None
    host: HostPeaks = field(default_factory=HostPeaks)
    step_time_s: float = 0.0
    step_times_s: list[float] = field(default_factory=list)
    loss: float = float("nan")
    drift: dict[str, float] | None = None
    flops: int | None = None  # FLOPs of one step (estimates only: torch.utils.flop_counter)
    strategy_facts: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what may make the numbers wrong (e.g. a NaN loss)
    pid: int = field(default_factory=os.getpid)
    vs_baseline: VsBaseline | None = None  # only in a compare, only when this run and the baseline are ok
    inference: dict[str, Any] | None = None  # infer/generate runs: shapes, KV cache bytes, time to first token
    world_size: int = 1                      # ranks of a distributed run (fsdp, ddp)
    ranks: list[dict[str, Any]] | None = None  # each rank's own run dict; the run's fields are its highest rank's
    rank: int = 0                            # which rank this process is (not serialised)
    mesh: dict[str, int] | None = None       # ranks per mesh dimension ({"dp": 2, "tp": 2}) of a run on ranks
    tensorflow: dict[str, Any] | None = None  # a Keras model on TensorFlow: its allocator's own figures, XLA's

    @classmethod
    def failed(cls, name: str, strategies: list[dict[str, Any]], error: str, device: str = "") -> RunResult:
        """A run that did not finish, and why."""
        return cls(name=name, strategies=strategies, device=device, ok=False, error=error)

    def to_json(self) -> dict[str, Any]:
        """The run in the schema-1 layout (sizes as integer bytes); a failed run as name, strategies, ok, error."""
        data: dict[str, Any] = {"name": self.name, "strategies": self.strategies, "ok": self.ok, "error": self.error}
        if not self.ok:
            return data
        data.update({"estimated": self.estimated,
                     "params": {"total": self.params_total, "trainable": self.params_trainable}})
        if self.memory is not None:
            data.update(self.memory.to_json())
        data.update(self.host.to_json())
        data["step_time_s"] = self.step_time_s
        if self.step_times_s:  # each measured step (a result written before they were kept has none)
            data["step_times_s"] = self.step_times_s
        data.update({"loss": self.loss, "drift": self.drift,
                     "strategy_facts": self.strategy_facts, "notes": self.notes, "warnings": self.warnings,
                     "pid": self.pid})
        if self.vs_baseline is not None:
            data["vs_baseline"] = self.vs_baseline.to_json()
        if self.inference is not None:
            data["inference"] = self.inference
        if self.mesh is not None:
            data["mesh"] = self.mesh
        if self.tensorflow is not None:
            data["tensorflow"] = self.tensorflow
        if self.world_size > 1:
            data["world_size"] = self.world_size
            if self.ranks is not None:
                data["ranks"] = self.ranks
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], device: str = "") -> RunResult:
        """A run dict (schema 1) back as a RunResult; ``device``: the document's, which run dicts leave out.
        Fields a run dict of an older memopt lacks (estimated, warnings) take their defaults."""
        if not data["ok"]:
            return cls.failed(data["name"], data["strategies"], data["error"], device)
        params = data.get("params", {})
        vs = data.get("vs_baseline")
        return cls(name=data["name"], strategies=data["strategies"], device=device,
                   estimated=data.get("estimated", False), ok=True, error=data.get("error"),
                   params_total=params.get("total", 0), params_trainable=params.get("trainable", 0),
                   memory=StepMemory.from_json(data) if "peak_bytes" in data else None,
                   host=HostPeaks.from_json(data), step_time_s=_number(data.get("step_time_s")),
                   step_times_s=data.get("step_times_s", []),
                   loss=_number(data.get("loss")), drift=data.get("drift"),
                   strategy_facts=data.get("strategy_facts", {}), notes=data.get("notes", []),
                   warnings=data.get("warnings", []), pid=data.get("pid", 0),
                   vs_baseline=VsBaseline.from_json(vs) if vs is not None else None,
                   inference=data.get("inference"), world_size=data.get("world_size", 1),
                   ranks=data.get("ranks"), mesh=data.get("mesh"),
                   tensorflow=data.get("tensorflow"))


# Runs one spec (``(spec, name, **options) -> RunResult``) in a process of its own: the analyses that compare runs
# (compare, optimize) are given memopt.app.isolate.run_isolated, from the layer above them.
RunOne = Callable[..., RunResult]
