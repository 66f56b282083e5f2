"""``memopt.track(model, optimizer)``: the profile's measurement around the user's own training loop.

    with memopt.track(model, optimizer) as t:
        loss = model(x).loss; loss.backward(); optimizer.step(); optimizer.zero_grad()
    t.report()          # the tables of ``memopt profile``
    doc = t.to_json()   # its schema-1 document, one run named "track"

The block runs under the profile's own machinery (``TensorTracker``, ``ModelWatch``, ``host_peaks``); the
phases come from hooks, so the loop is not changed:

  forward    from entering the block, and again from the root module's next forward pre-hook after a
             backward or an optimizer step (gradient accumulation, several steps in one block)
  backward   from the first backward node of a root-module output (a pre-hook on its ``grad_fn``), or the
             first saved tensor unpacked for backward, whichever comes first. With the loss computed
             inside the model (``model(x)`` returns it, or a mapping with ``"loss"``) that is the first node
             of backward; only autograd's 1-element seed gradient is allocated before it
  optimizer  from ``optimizer.step``'s pre-hook; its post-hook records the state bytes (the optimizer's
             state created lazily by a first step is classified there) and ends a step

The numbers are over the whole block (one measurement window: the peak of all its steps), or with
``warmup_steps=N`` over the steps after the first N (``memopt run`` and the framework callbacks: the first step
creates the optimizer state). Tensors that exist before the block count from the start only as what they are to
the model and optimizer: parameters, buffers, gradients and optimizer state. A module called several times in one
step and frozen parameters are fine (PyTorch's ``MemTracker`` raises on both: tests/test_track.py).

Without a model or an optimizer, they are found through PyTorch's global hooks (memopt.measure.discover): the
top-level modules that run, the optimizers that step (also one created inside the block); optimizer state created
inside the block counts as optimizer state, also in the peak's breakdown. A step then ends at the first-found
optimizer's step.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memopt.core._torch_private import is_fake
from memopt.core.errors import MemoptError
from memopt.core.results import Category, HostPeaks, RunResult
from memopt.measure.discover import Discovery, optimizer_parameters
from memopt.measure.tracker import CUDA_BLOCK, ModelWatch, TensorTracker, host_peaks, mark_optimizer_state
from memopt.model.transformer import count_parameters
from memopt.render import documents, tables
from memopt.render.exports import SUFFIXES, Exports
from memopt.render.outputs import Outputs, strict

NAME = "track"
_MAX_DEPTH = 4  # how deep a model's output (tuples, mappings) is searched for tensors


def track(model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None, *,
          timeline: bool = False, stacks: bool = False) -> Tracking:
    """Measure the tensor memory of the training steps run inside the ``with`` block (see the module); a model or
    optimizer not given is found as it runs. ``timeline``: record every event, for ``save("step.html")``
    (``stacks``: with the Python stack of each allocation)."""
    return Tracking(model, optimizer, timeline=timeline or stacks, stacks=stacks)


class StopTracking(BaseException):
    """Raised from an optimizer step's hook when ``stop_after`` steps were measured (``memopt run --steps``): a
    BaseException, so that a training framework's own ``except Exception`` lets it through."""


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _device_of(model: nn.Module) -> str:
    """The device type of the model's first parameter (or buffer); the CPU for a model with neither."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device.type
    return "cpu"


def _dtype_of(model: nn.Module) -> str | None:
    """'float32' when every floating-point parameter has that dtype; None when they differ or there are none."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None


def _output_tensors(output: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """The tensors in a module's output: a tensor, tuples and lists, mappings (e.g. a HuggingFace ModelOutput)."""
    if isinstance(output, torch.Tensor):
        yield output
    elif depth < _MAX_DEPTH and isinstance(output, (tuple, list)):
        for item in output:
            yield from _output_tensors(item, depth + 1)
    elif depth < _MAX_DEPTH and isinstance(output, Mapping):
        for item in output.values():
            yield from _output_tensors(item, depth + 1)


def _loss_of(output: Any) -> torch.Tensor | None:
    """The loss in a model's output when it plainly is one: a 1-element floating tensor that requires grad,
    returned alone or as a mapping's ``"loss"``; None otherwise (logits, tuples: the loss is not known)."""
    if isinstance(output, Mapping):
        output = output.get("loss")
    if (isinstance(output, torch.Tensor) and output.requires_grad and output.is_floating_point()
            and output.numel() == 1):
        return output
    return None


class Tracking:
    """The context manager ``memopt.app.track`` returns; after the block: ``result``, ``report()``, ``to_json()``."""

    def __init__(self, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None, *,
                 warmup_steps: int = 0, stop_after: int | None = None, device: str | None = None,
                 label: str = "memopt.track", python_heap: bool = True, timeline: bool = False,
                 stacks: bool = False):
        if model is not None and not isinstance(model, nn.Module):
            raise MemoptError(f"memopt.track: expected a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not callable(getattr(optimizer, "register_step_pre_hook", None)):
            raise MemoptError(f"memopt.track: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model, self.optimizer = model, optimizer
        self.models: list[nn.Module] = [model] if model is not None else []
        self.optimizers: list[Any] = [optimizer] if optimizer is not None else []
        self.device = _device_of(model) if model is not None else \
            device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.warmup_steps, self.stop_after, self.label = warmup_steps, stop_after, label
        self.python_heap = python_heap  # tracemalloc's peak too (it slows Python-heavy code: imports, model builds)
        self.timeline, self.stacks = timeline, stacks  # record every event (and each allocation's stack)
        self.step_peaks: list[int] = []  # each optimizer step's peak (bytes), warm-up steps included
        self._watches: list[ModelWatch] = []
        self._optimizer_hooked = optimizer is not None  # its own step hooks drive the steps (else discovery's)
        self.steps = 0  # optimizer steps taken inside the block
        self._state = "new"  # new -> running -> done | failed
        self._result: RunResult | None = None
        self._stack: contextlib.ExitStack | None = None
        self._tracker: TensorTracker | None = None
        self._watch: ModelWatch | None = None
        self._host: HostPeaks | None = None
        self._handles: list[Any] = []       # hooks on the model and optimizer, for the whole block
        self._node_handles: list[Any] = []  # backward pre-hooks on the grad_fn of the latest outputs
        self._warmed_up = False
        self._loss = math.nan
        self._step_times: list[float] = []
        self._step_start = 0.0
        self._block_start = 0.0

    # -- the block ---------------------------------------------------------------------------------------------
    def __enter__(self) -> Tracking:
        if self._state != "new":
            raise MemoptError("memopt.track: a tracker measures one block and this one was used already; "
                              "call memopt.track() again")
        self._state = "running"
        optimizer = self.optimizer
        self._warmed_up = optimizer is not None and bool(getattr(optimizer, "state", None))
        stack = contextlib.ExitStack()
        try:
            self._host = stack.enter_context(host_peaks(self.device, python_heap=self.python_heap))
            tracker = TensorTracker(self.device, round_to=CUDA_BLOCK if self.device == "cuda" else 1,
                                    timeline=self.timeline, stacks=self.stacks)
            self._tracker = stack.enter_context(tracker)
            stack.callback(self._remove_hooks)
            if self.model is not None:
                self._watch = ModelWatch(tracker, self.model, optimizer)
                self._watches.append(self._watch)
            self._install_hooks()
            if self.model is None or optimizer is None:
                discovery = Discovery(self._found_model, self._found_optimizer, self._on_any_step,
                                      self._found_tensor)
                discovery.models.extend(self.models)
                discovery.optimizers.extend(self.optimizers)
                stack.enter_context(discovery)
            # our (pack, unpack) pair first: the tracker's saved-tensor observer wraps it
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._on_pack, self._on_unpack))
            stack.enter_context(tracker.saved_tensors())
            self._sync()
            tracker.begin_step()
            self._block_start = self._step_start = time.perf_counter()
        except BaseException:
            self._state = "failed"
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        stack, self._stack = self._stack, None
        assert stack is not None and self._tracker is not None
        try:
            if exc_type is None:
                self._sync()
                end = time.perf_counter()
                if not self._step_times:  # no optimizer step: the block is the step
                    self._step_times.append(end - self._block_start)
                    self._tracker.record_state()
        finally:
            stack.__exit__(exc_type, exc, tb)  # hooks removed, saved-tensor hooks, tracker and host views exited
        if exc_type is not None:
            self._state = "failed"
            return  # the exception propagates unchanged
        self._result = self._build_result()
        self._state = "done"

    def live_bytes(self) -> dict[str, int]:
        """The bytes live now, by category (while the block runs; a framework callback logs them each step)."""
        if self._tracker is None:
            return {}
        return {category.value: n for category, n in self._tracker.bytes.items()}

    # -- results -----------------------------------------------------------------------------------------------
    @property
    def result(self) -> RunResult:
        """The block's RunResult (name "track"), as ``memopt.engine.step.run`` returns one for a profile."""
        if self._result is None:
            raise MemoptError(self._not_ready())
        return self._result

    def report(self, console: Any = None) -> None:
        """Print the tables of ``memopt profile`` for the block (a Rich Console may be given)."""
        result = self.result
        shown = tables.profile_tables(None, result, title=self.title(), warmed_up=self._warmed_up)
        tables.print_tables(shown, console)

    def save(self, path: str | Path) -> None:
        """Write the block's events by the file's suffix: ``.html`` (the interactive report), ``.pickle`` (a
        PyTorch memory snapshot for memory_viz) or ``.json`` (a Chrome/Perfetto trace). Needs
        ``memopt.track(..., timeline=True)``."""
        result = self.result
        if result.memory is None or result.memory.timeline is None:
            raise MemoptError("memopt.track: no events were recorded; use memopt.track(..., timeline=True)")
        suffix = Path(path).suffix.lower()
        option = next((flag for flag, suffixes in SUFFIXES.items() if suffix in suffixes), None)
        if option is None:
            raise MemoptError(f"memopt.track save({str(path)!r}): use a .html, .pickle or .json file name")
        exports = Exports(**{option.removeprefix("--"): str(path)}, stacks=self.stacks)
        outputs = Outputs({}, **exports.paths())
        exports.add(outputs, [result], self.title())
        outputs.write()

    def to_json(self) -> dict[str, Any]:
        """The schema-1 document of ``memopt profile --json``, one run; strict (NaN and infinities as None).

        Its ``spec`` says what is known of the loop: the model's and optimizer's Python classes, the steps,
        the device and the parameters' dtype. ``memopt check`` can gate on it (the spec differs from any
        YAML spec's, so only against a baseline written from a track document)."""
        result = self.result
        return strict(documents.runs_document(self.spec(), [result], result.device))

    def spec(self) -> dict[str, Any]:
        """The document's ``spec``: what is true of the loop (no model spec: memopt did not build the model);
        ``train.step_peak_bytes``: each optimizer step's peak, warm-up steps included."""
        optimizer = None if self.optimizer is None else {"python": _type_name(self.optimizer)}
        models = ", ".join(_type_name(m) for m in self.models) or None
        return {"model": {"python": models},
                "train": {"optimizer": optimizer, "steps": self.steps, "warmup_steps": self.warmup_steps,
                          "step_peak_bytes": list(self.step_peaks)},
                "run": {"device": self.device, "dtype": self._dtype()},
                "strategies": []}

    def _dtype(self) -> str | None:
        """The models' one parameter dtype, None when they differ (or no model was seen)."""
        dtypes = {_dtype_of(m) for m in self.models}
        return dtypes.pop() if len(dtypes) == 1 else None

    def title(self) -> str:
        parts = [" + ".join(type(m).__name__ for m in self.models) or "no model seen",
                 type(self.optimizer).__name__ if self.optimizer is not None else "no optimizer",
                 self._dtype() or "mixed dtypes", self.device,
                 f"{self.steps} optimizer step{'s' if self.steps != 1 else ''}"]
        return f"{self.label.replace('.', ' ')} - " + ", ".join(parts)

    def _not_ready(self) -> str:
        if self._state == "failed":
            return "memopt.track: the tracked block raised; there is no result"
        if self._state == "running":
            return "memopt.track: the block is still running; the result exists once the with block ends"
        return "memopt.track: nothing measured yet; use it as `with memopt.track(model, optimizer) as t:`"

    def _build_result(self) -> RunResult:
        assert self._tracker is not None and self._host is not None
        total, trainable = self._parameter_counts()
        result = RunResult(name=NAME, strategies=[], device=self.device, params_total=total,
                           params_trainable=trainable)
        result.memory = self._tracker.result()
        result.host = self._host
        result.step_times_s = list(self._step_times) or [time.perf_counter() - self._block_start]
        result.step_time_s = statistics.median(result.step_times_s)
        result.loss = self._loss
        steps = (f"{self.steps} optimizer steps" if self.steps != 1 else "1 optimizer step") if self.steps else \
            "no optimizer step (the block is one step)"
        window = "the whole block" if not self.warmup_steps or self.steps <= self.warmup_steps else \
            f"the steps after the first {self.warmup_steps} (warm-up)"
        result.notes.append(f"{self.label}: {steps} of your loop; the peak is over {window}")
        if self.optimizer is not None and not self._warmed_up and getattr(self.optimizer, "state", None):
            result.notes.append("no optimizer state before the block: its first step created it (a steady-state "
                                "step may peak lower; take a step before the block to measure one)")
        if math.isnan(self._loss):
            result.notes.append("loss not seen: the model's output is not a scalar loss (or a mapping with one)")
        elif not math.isfinite(self._loss):
            result.warnings.append(f"the loss is {self._loss} (not finite): the numbers are of a diverged step")
        return result

    # -- hooks -------------------------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        if self.model is not None:
            self._watch_model_phases(self.model)
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._on_step_begins))
            self._handles.append(self.optimizer.register_step_post_hook(self._on_step_ends))

    def _watch_model_phases(self, model: nn.Module) -> None:
        self._handles.append(model.register_forward_pre_hook(self._on_forward, prepend=True))
        self._handles.append(model.register_forward_hook(self._on_output))

    def _remove_hooks(self) -> None:
        for handle in (*self._handles, *self._node_handles):
            handle.remove()
        self._handles.clear()
        self._node_handles.clear()
        for watch in self._watches:
            watch.close()

    def _parameter_counts(self) -> tuple[int, int]:
        if self.models:
            counts = [count_parameters(m) for m in self.models]
            return sum(c[0] for c in counts), sum(c[1] for c in counts)
        params = {id(p): p for o in self.optimizers for p in optimizer_parameters(o)}
        return sum(p.numel() for p in params.values()), sum(p.numel() for p in params.values() if p.requires_grad)

    # -- what the global hooks find (memopt.measure.discover) ----------------------------------------------------
    def _found_model(self, model: nn.Module, args: Any) -> None:
        """A top-level module starts its first forward in the block: its tensors are known from now on."""
        assert self._tracker is not None
        self.models.append(model)
        self._watches.append(ModelWatch(self._tracker, model, None))
        self._watch_model_phases(model)
        self._on_forward(model, args)  # its own pre-hook, added now, runs from its next call

    def _found_tensor(self, tensor: torch.Tensor, is_parameter: bool) -> None:
        """A parameter or buffer registered on a module inside the block (a model built in it)."""
        if self._tracker is not None:
            self._tracker.mark(tensor, Category.PARAMS if is_parameter else Category.BUFFERS)

    def _found_optimizer(self, optimizer: Any) -> None:
        """An optimizer steps for the first time in the block (created in it, perhaps)."""
        self.optimizers.append(optimizer)
        if self.optimizer is None:
            self.optimizer = optimizer
        assert self._tracker is not None
        for p in optimizer_parameters(optimizer):
            self._tracker.mark(p, Category.PARAMS)

    def _on_any_step(self, optimizer: Any, ended: bool) -> None:
        """Around every step of a found optimizer: gradients and state classified (also at the peak, when they
        were alive then); the first-found optimizer's steps are the loop's."""
        tracker = self._tracker
        assert tracker is not None
        if ended:
            mark_optimizer_state(tracker, optimizer, retroactive=True)
        else:  # the gradients it is about to use
            for p in optimizer_parameters(optimizer):
                if p.grad is not None:
                    tracker.mark(p.grad, Category.GRADS, retroactive=True)
        if optimizer is self.optimizer and not self._optimizer_hooked:
            (self._on_step_ends if ended else self._on_step_begins)(optimizer, (), {})

    def _switch(self, phase: str, keep_module: bool = False) -> None:
        tracker = self._tracker
        assert tracker is not None
        if tracker.phase == phase:
            return
        module = tracker.module
        with tracker.in_phase(phase):  # in_phase does its work on entry (phase, its peak so far)
            pass
        if keep_module:
            tracker.module = module

    def _on_forward(self, module: nn.Module, args: Any) -> None:
        """The root module's forward starts: a new forward (after a backward or an optimizer step)."""
        if self._tracker is not None and self._tracker.phase != "forward":
            for handle in self._node_handles:
                handle.remove()
            self._node_handles.clear()
            self._switch("forward")

    def _on_output(self, module: nn.Module, args: Any, output: Any) -> None:
        """Backward starts at the first node of any root-module output that needs grad; a loss is read there."""
        loss = _loss_of(output)
        for t in _output_tensors(output):
            if t.grad_fn is not None:
                ref = weakref.ref(t) if t is loss else None  # a weak one: the hook must not keep the loss alive
                self._node_handles.append(t.grad_fn.register_prehook(self._backward_hook(ref)))

    def _backward_hook(self, loss: weakref.ref[torch.Tensor] | None) -> Any:
        def hook(grad_outputs: Any) -> None:
            if self._tracker is None or self._tracker.phase == "backward":
                return
            self._switch("backward", keep_module=True)  # ModelWatch may have named the module already
            tensor = loss() if loss is not None else None
            if tensor is not None and not is_fake(tensor):
                self._loss = tensor.item()  # on CUDA the forward has to finish before backward anyway
        return hook

    def _on_pack(self, t: torch.Tensor) -> torch.Tensor:
        if self._tracker is not None and self._tracker.phase == "optimizer":
            self._switch("forward")  # a forward that did not go through the root module
        return t

    def _on_unpack(self, t: torch.Tensor) -> torch.Tensor:
        if self._tracker is not None and self._tracker.phase == "forward":
            self._switch("backward", keep_module=True)  # a loss computed outside the model
        return t

    def _on_step_begins(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._switch("optimizer")

    def _on_step_ends(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        tracker = self._tracker
        assert tracker is not None
        if self._watch is not None and self._watch.optimizer is not None:
            self._watch.rescan_optimizer(retroactive=True)  # state made by this (first) step is optimizer state
        tracker.record_state()
        self.steps += 1
        self._sync()
        now = time.perf_counter()
        self.step_peaks.append(tracker.step_peak)
        tracker.new_step()
        if self.steps > self.warmup_steps:
            self._step_times.append(now - self._step_start)
        elif self.steps == self.warmup_steps:  # the warm-up ends: the measurement window starts again
            tracker.begin_step()
            self._warmed_up = True
        self._step_start = now
        if self.stop_after is not None and self.steps - self.warmup_steps >= self.stop_after:
            raise StopTracking

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
