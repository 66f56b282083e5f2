"""Tensor memory measured at the allocation level, plus the host views (RSS, Python heap, CUDA stats).

``TensorTracker`` is a TorchDispatchMode that sees every op's outputs, follows each new tensor storage
until it is freed (a weakref callback on the storage), and keeps live bytes per category:

  params, buffers      registered from the model
  grads                the gradient a trainable parameter receives (hooks on the parameter)
  optimizer            tensors in ``optimizer.state``
  activations          storages autograd saves for backward (saved-tensor hooks), parameters excluded
  temporaries          everything else the step allocates

It works the same for CPU, CUDA and fake tensors. ``tracemalloc`` is *not* tensor memory (a 64 MiB
CPU tensor leaves it at 0): it is reported separately as the Python heap.
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
import tracemalloc
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import psutil
import torch

from memopt.core._torch_private import (
    TorchDispatchMode,
    decompose_composite,
    local_tensor,
    observe_saved_tensors,
    storage_key,
)
from memopt.core.errors import OutOfMemory
from memopt.core.results import Category, HostPeaks, StepMemory
from memopt.core.trace import Allocation, Frame, MemoryTrace
from memopt.core.units import format_bytes

CATEGORIES = (Category.PARAMS, Category.BUFFERS, Category.GRADS, Category.OPTIMIZER, Category.ACTIVATIONS,
              Category.TEMPORARIES)
STATE_CATEGORIES = (Category.PARAMS, Category.BUFFERS, Category.GRADS, Category.OPTIMIZER, Category.KV_CACHE)
PHASES = ("forward", "backward", "optimizer")
# inference: nothing is saved for backward; generation keeps the keys and values of the tokens seen so far
INFERENCE_CATEGORIES = (Category.PARAMS, Category.BUFFERS, Category.KV_CACHE, Category.TEMPORARIES)
MODE_CATEGORIES = {"train": CATEGORIES, "infer": INFERENCE_CATEGORIES, "generate": INFERENCE_CATEGORIES}
MODE_PHASES = {"train": PHASES, "infer": ("forward",), "generate": ("prefill", "decode")}
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to 512 bytes
STACK_DEPTH = 48  # frames kept per allocation with stacks=True
_OWN_FRAMES = ("memopt/measure/tracker.py", "torch/utils/_python_dispatch.py", "torch/_ops.py",
               "torch/_dynamo/eval_frame.py", "torch/_compile.py")

def _by_name(by_category: dict[Category, int]) -> dict[str, int]:
    """Results hold categories by name (plain strings, as in their JSON)."""
    return {str(category): nbytes for category, nbytes in by_category.items()}


def _tensors(out: Any) -> Iterator[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from _tensors(item)


class TensorTracker(TorchDispatchMode):
    """Live tensor bytes by category, with the step's peak, its breakdown and per-phase peaks."""

    def __init__(self, device_type: str, *, timeline: bool = False, limit_bytes: int | None = None,
                 round_to: int | None = None, mode: str = "train", unshard: bool = False, stacks: bool = False):
        super().__init__()
        self.device_type = device_type
        self.categories, self.phases = MODE_CATEGORIES[mode], MODE_PHASES[mode]
        if unshard:  # FSDP: the all-gathered parameters of the units being computed
            self.categories = (*self.categories, Category.UNSHARD)
        self.new_category = Category.TEMPORARIES  # what a storage no one has claimed yet counts as
        self._depth = 0  # entered how many times: re-entered to see inside composite ops (inference_mode)
        self.round_to = round_to or (CUDA_BLOCK if device_type == "cuda" else 1)
        self.limit_bytes = limit_bytes
        # storage key -> [weakref, category, nbytes, allocation number, Allocation (when recording), its trace index]
        self._live: dict[int, list[Any]] = {}
        self._allocations = 0  # storages added so far (numbers them)
        self._peak_allocation = 0  # the number of the allocation that reached the peak
        self.bytes = dict.fromkeys(self.categories, 0)
        self.total = 0
        self.phase = self.phases[0]
        self.module: str | None = None  # the module running now (set by ModelWatch)
        self.stage: str | None = None   # named in an out-of-memory message instead of the phase (e.g. "model build")
        self._record_timeline = timeline
        self._stacks = stacks
        self._frozen_timeline: MemoryTrace | None = None
        self.begin_step()

    # -- bookkeeping -----------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Start a new measurement window from what is live now."""
        self.phase = self.phases[0]
        self.peak = self.total
        self.peak_breakdown = dict(self.bytes)
        self.peak_phase = self.phase
        self.peak_module = self.module
        self._at_peak = True
        self._peak_allocation = self._allocations
        self.step_peak = self.total  # the peak since new_step() (a user's loop: one optimizer step's)
        self.category_peak = dict(self.bytes)
        self.phase_peak = dict.fromkeys(self.phases, 0)
        self.record_state()
        self.timeline: MemoryTrace | None = None
        if self._record_timeline:
            self._started_ns = time.perf_counter_ns()
            self.timeline = MemoryTrace([str(c) for c in self.categories])
            for entry in self._live.values():  # alive when the step begins: event 0
                self._enter_timeline(entry, start=0)
        self._tick("start")

    def result(self) -> StepMemory:
        timeline = self.timeline if self.timeline is not None else self._frozen_timeline
        return StepMemory(self.peak, _by_name(self.peak_breakdown), _by_name(self.category_peak), dict(self.phase_peak),
                          _by_name(self.state_bytes), self.peak_phase, self.peak_module, timeline)

    def _nbytes(self, storage: Any) -> int:
        n = storage.nbytes()
        return -(-n // self.round_to) * self.round_to

    def _add(self, storage: Any, category: Category, tensor: torch.Tensor | None = None, op: Any = None,
             origin: Allocation | None = None) -> None:
        key = storage_key(storage)
        n = self._nbytes(storage)
        ref = weakref.ref(storage, lambda _ref, k=key: self._free(k))  # type: ignore[misc]
        self._allocations += 1
        entry = self._live[key] = [ref, category, n, self._allocations, origin, None]
        if self._record_timeline and origin is None:
            made_here = op is not None  # else registered (a parameter, optimizer state): not made by this step
            entry[4] = Allocation(n, str(category), str(op) if made_here else None,
                                  self.module if made_here else None, self.phase if made_here else None,
                                  list(tensor.shape) if tensor is not None else None,
                                  str(tensor.dtype).removeprefix("torch.") if tensor is not None else None,
                                  _stack() if self._stacks else None)
        self.bytes[category] += n
        self.total += n
        if self.total > self.step_peak:
            self.step_peak = self.total
        if self.bytes[category] > self.category_peak[category]:
            self.category_peak[category] = self.bytes[category]
        if self.total > self.phase_peak[self.phase]:
            self.phase_peak[self.phase] = self.total
        if self.total > self.peak:
            self.peak = self.total
            self.peak_breakdown = dict(self.bytes)
            self.peak_phase = self.phase
            self.peak_module = self.module
            self._at_peak = True
            self._peak_allocation = self._allocations
        else:
            self._at_peak = False
        if self.timeline is not None:
            self._enter_timeline(entry, start=len(self.timeline.kinds))
        self._tick("alloc", entry[5])
        if self.limit_bytes is not None and self.total > self.limit_bytes:
            self._over_limit()

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is None:
            return
        self.bytes[entry[1]] -= entry[2]
        self.total -= entry[2]
        self._at_peak = False
        event = self._tick("free", entry[5])
        if event is not None:
            self.timeline.allocations[entry[5]].end = event  # type: ignore[union-attr]

    def _enter_timeline(self, entry: list[Any], start: int) -> None:
        """The live storage ``entry`` as an allocation of this step's timeline, from event ``start``."""
        assert self.timeline is not None
        origin = entry[4] or Allocation(entry[2], str(entry[1]))  # where it was made, when that was recorded
        entry[5] = len(self.timeline.allocations)
        self.timeline.allocations.append(replace(origin, nbytes=entry[2], category=str(entry[1]), start=start,
                                                 end=None, changes=[]))

    def _tick(self, kind: str, subject: int = -1) -> int | None:
        """Record an event (``subject``: the allocation's index in the timeline) when recording; its index."""
        if self.timeline is None:
            return None
        return self.timeline.record(kind, subject, self.phase, self.module, list(self.bytes.values()),
                                    time.perf_counter_ns() - self._started_ns)

    def _changed(self, entry: list[Any], kind: str) -> None:
        """An allocation's size (``resize``) or category (``move``) changed: an event, and the change kept with it."""
        event = self._tick(kind, entry[5])
        if event is not None:
            self.timeline.allocations[entry[5]].changes.append((event, str(entry[1]), entry[2]))  # type: ignore[union-attr]

    def _over_limit(self) -> None:
        limit = self.limit_bytes
        self.limit_bytes = None  # do not raise again while the step unwinds
        where = f" in {self.module}" if self.module else ""
        when = f"in the {self.stage}" if self.stage else f"during {self.phase}{where}"
        raise OutOfMemory(f"out of memory: live tensors reached {format_bytes(self.total)} {when}, over the "
                          f"device's {format_bytes(limit or 0)}")

    def resized(self, storage: Any) -> None:
        """A tracked storage changed size in place (``resize_``: a parameter released or brought back)."""
        entry = self._live.get(storage_key(storage))
        if entry is None:
            return
        n = self._nbytes(storage)
        if n < entry[2]:
            self.bytes[entry[1]] -= entry[2] - n
            self.total -= entry[2] - n
            entry[2] = n
            self._at_peak = False
            self._changed(entry, "resize")
            return
        self._free(storage_key(storage))
        self._add(storage, entry[1], origin=entry[4])  # a growth is an allocation: peaks and the limit apply

    @contextlib.contextmanager
    def allocating_as(self, category: Category) -> Iterator[None]:
        """New storages count as ``category`` inside (FSDP's all-gather buffers as unshard)."""
        before, self.new_category = self.new_category, category
        try:
            yield
        finally:
            self.new_category = before

    def regrown(self, tensor: torch.Tensor, category: Category) -> None:
        """``tensor``'s storage was grown in place (``resize_``): counted again, or counted as ``category`` if new."""
        storage = local_tensor(tensor).untyped_storage()
        if storage_key(storage) in self._live:
            self.resized(storage)
        else:
            self.mark(tensor, category)

    def new_step(self) -> None:
        """Start a new step's peak (``step_peak``) inside the measurement window."""
        self.step_peak = self.total

    def mark(self, tensor: torch.Tensor, category: Category, only_from: Category | None = None,
             retroactive: bool = False) -> None:
        """Put ``tensor``'s storage in ``category`` (tracking it if new); a DTensor's local shard. ``retroactive``:
        also in the peak's breakdown when it was allocated by then (live now, so live at the peak): optimizer
        state a user's first step created, found only after the step."""
        tensor = local_tensor(tensor)
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        entry = self._live.get(storage_key(storage))
        if entry is None:
            if only_from is None and tensor.device.type == self.device_type:
                self._add(storage, category, tensor)
            return
        old = entry[1]
        if old == category or (only_from is not None and old != only_from):
            return
        self.bytes[old] -= entry[2]
        self.bytes[category] += entry[2]
        entry[1] = category
        self._changed(entry, "move")
        if self.bytes[category] > self.category_peak[category]:
            self.category_peak[category] = self.bytes[category]
        if self._at_peak:
            self.peak_breakdown = dict(self.bytes)
        elif retroactive and entry[3] <= self._peak_allocation:
            moved = min(entry[2], self.peak_breakdown[old])
            self.peak_breakdown[old] -= moved
            self.peak_breakdown[category] += moved
            self.category_peak[category] = max(self.category_peak[category], self.peak_breakdown[category])

    def mark_all(self, tensors: Iterable[torch.Tensor], category: Category) -> None:
        for t in tensors:
            self.mark(t, category)

    # -- phases and state --------------------------------------------------------------------------
    @contextlib.contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        if phase != self.phase:
            self.module = None  # module hooks name it again inside the new phase
        self.phase = phase
        if self.total > self.phase_peak[phase]:
            self.phase_peak[phase] = self.total
        yield

    def record_state(self) -> None:
        """Remember the state categories' bytes now (params/buffers/grads/optimizer after the optimizer step)."""
        self.state_bytes = {c: self.bytes[c] for c in self.categories if c in STATE_CATEGORIES}

    # -- the dispatch hook ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = decompose_composite(self, func, args, kwargs or {})  # under inference_mode they come whole
        if out is not NotImplemented:
            return out
        out = func(*args, **(kwargs or {}))
        for t in _tensors(out):
            t = local_tensor(t)  # a DTensor's own storage is a placeholder of the global size: its shard is real
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            if storage_key(storage) not in self._live and t.device.type == self.device_type:
                self._add(storage, self.new_category, t, func)
        return out

    def __enter__(self) -> TensorTracker:
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if not self._depth:  # frees after tracking ends (the model going away) must not extend the timeline
            self._frozen_timeline, self.timeline = self.timeline, None
        return super().__exit__(*exc)

    def saved(self, tensor: torch.Tensor) -> None:
        """``tensor`` is kept for backward: an activation (strategies with own hooks report through this)."""
        self.mark(tensor, Category.ACTIVATIONS, only_from=Category.TEMPORARIES)

    def saved_tensors(self) -> contextlib.AbstractContextManager[None]:
        """Around forward+backward: storages autograd saves become activations."""
        return observe_saved_tensors(self.saved)


def _stack() -> list[Frame]:
    """The Python stack here, innermost first, without the tracker's and the dispatcher's own frames."""
    frames = traceback.extract_stack(limit=STACK_DEPTH + 8)
    kept = [(f.filename, f.lineno or 0, f.name) for f in reversed(frames)
            if not f.filename.replace("\\", "/").endswith(_OWN_FRAMES)]
    return kept[:STACK_DEPTH]


class ModelWatch:
    """Registers a model's and optimizer's tensors with a tracker and keeps gradients classified."""

    def __init__(self, tracker: TensorTracker, model: torch.nn.Module, optimizer: Any | None):
        self.tracker, self.model, self.optimizer = tracker, model, optimizer
        self._handles: list[Any] = []
        self._stack: list[str | None] = []
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._entering(name or "model")))
            self._handles.append(module.register_forward_hook(self._leaving(name or "model")))
        tracker.mark_all(model.parameters(), Category.PARAMS)
        tracker.mark_all(model.buffers(), Category.BUFFERS)
        for p in model.parameters():
            if p.requires_grad:
                if p.grad is not None:
                    tracker.mark(p.grad, Category.GRADS)
                self._handles.append(p.register_hook(self._on_grad))
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_accumulated))
        self.rescan_optimizer()

    def _entering(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any) -> None:
            self._stack.append(self.tracker.module)
            self.tracker.module = name
        return hook

    def _leaving(self, name: str) -> Any:
        """Pop the module; its backward starts when the gradient of its output arrives."""
        def on_output_grad(grad: torch.Tensor) -> None:
            self.tracker.module = name

        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            self.tracker.module = self._stack.pop() if self._stack else None
            if isinstance(output, torch.Tensor) and output.requires_grad and not hasattr(output, "_memopt_module"):
                output._memopt_module = name  # type: ignore[attr-defined]  # the innermost module producing this tensor names its backward
                output.register_hook(on_output_grad)
        return hook

    def _on_grad(self, grad: torch.Tensor | None) -> None:
        if grad is not None:  # None: a Function that hands the gradient elsewhere (offload_states' vocab rows)
            self.tracker.mark(grad, Category.GRADS)

    def _on_accumulated(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            self.tracker.mark(param.grad, Category.GRADS)

    def rescan_optimizer(self, retroactive: bool = False) -> None:
        """Classify tensors in ``optimizer.state`` (created lazily by the first step); ``retroactive``: in the
        peak's breakdown too (see TensorTracker.mark)."""
        if self.optimizer is not None:
            mark_optimizer_state(self.tracker, self.optimizer, retroactive)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def mark_optimizer_state(tracker: TensorTracker, optimizer: Any, retroactive: bool = False) -> None:
    """Classify the tensors in ``optimizer.state`` as optimizer state (see TensorTracker.mark for ``retroactive``)."""
    for state in getattr(optimizer, "state", {}).values():
        for value in state.values() if isinstance(state, dict) else ():
            if isinstance(value, torch.Tensor):
                tracker.mark(value, Category.OPTIMIZER, retroactive=retroactive)


class RssSampler:
    """Peak resident set size of this process, sampled every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


@contextlib.contextmanager
def host_peaks(device_type: str, python_heap: bool = True) -> Iterator[HostPeaks]:
    """RSS peak, Python-heap peak (tracemalloc, unless ``python_heap`` is off) and CUDA allocator peaks."""
    peaks = HostPeaks()
    cuda = device_type == "cuda"
    at_start = 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        at_start = torch.cuda.memory_allocated()
    if not python_heap:
        with RssSampler() as rss:
            yield peaks
        peaks.rss_peak_bytes = rss.peak
        return
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    with RssSampler() as rss:
        try:
            yield peaks
        finally:
            if cuda:
                torch.cuda.synchronize()
            peaks.python_heap_peak_bytes = tracemalloc.get_traced_memory()[1]
            if started:
                tracemalloc.stop()
    peaks.rss_peak_bytes = rss.peak
    if cuda:
        peaks.cuda = {"max_allocated_bytes": torch.cuda.max_memory_allocated(),
                      "max_reserved_bytes": torch.cuda.max_memory_reserved(), "allocated_at_start_bytes": at_start}
