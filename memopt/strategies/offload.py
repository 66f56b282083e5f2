"""Saved activations go one tier down through saved_tensors_hooks: CUDA -> pinned CPU, CPU -> disk.

A context around forward+backward, as torchtune's activation offloading is, not a model rewrite.
``torch.autograd.graph.save_on_cpu`` alone does nothing on CPU (the tensors are already there), so on
CPU memopt writes them to memory-mapped-size files in a temporary folder, removed afterwards, also
when the step fails.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from memopt.adapters import ModelAdapter
from memopt.core._torch_private import is_fake, storage_key
from memopt.core.errors import StrategyError
from memopt.strategies import register
from memopt.strategies.base import Options, SavedTensors, StepPlan, Strategy


class OffloadOptions(Options):
    target: Literal["auto", "cpu", "disk"] = Field("auto", description="auto: cpu on CUDA, disk on CPU")
    min_bytes: int = Field(1024, ge=0, description="smaller saved tensors stay on the device")


class _DiskTier:
    """Writes each saved tensor to its own file and reads it back (then deletes it) in backward."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.count = 0

    def put(self, t: torch.Tensor) -> Any:
        path = self.folder / f"{self.count}.bin"
        self.count += 1
        flat = t.detach().contiguous().view(-1)
        flat.view(torch.uint8).numpy().tofile(path)
        return path, t.dtype, t.shape, flat.numel()

    @staticmethod
    def get(packed: Any) -> torch.Tensor:
        path, dtype, shape, numel = packed
        raw = torch.from_file(str(path), shared=False, size=numel * dtype.itemsize, dtype=torch.uint8)
        path.unlink(missing_ok=True)
        return raw.view(dtype).view(shape)


class _FakeTier:
    """Under fake tensors (estimate) the bytes leave the device by definition; readback allocates again."""

    @staticmethod
    def put(t: torch.Tensor) -> Any:
        return t.shape, t.dtype, t.device

    @staticmethod
    def get(packed: Any) -> torch.Tensor:
        shape, dtype, device = packed
        return torch.empty(shape, dtype=dtype, device=device)


class _CpuTier:
    """Copies each saved CUDA tensor into pinned host memory and back."""

    @staticmethod
    def put(t: torch.Tensor) -> Any:
        host = torch.empty_like(t, device="cpu", pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host, t.device

    @staticmethod
    def get(packed: Any) -> torch.Tensor:
        host, device = packed
        return host.to(device, non_blocking=True)


@register
class Offload(Strategy[OffloadOptions]):
    name = "offload"
    Options = OffloadOptions
    summary = "move tensors saved for backward off the device: CUDA -> pinned CPU, CPU -> disk"
    saves = ("saved activations leave the device (kept: parameter views and tensors under min_bytes); in infer/"
             "generate, where nothing is saved, the weights do, brought in layer by layer")
    order = 50
    modes = ("train", "infer", "generate")

    def __init__(self, options: OffloadOptions, spec: Any, device: str, saved: SavedTensors | None = None):
        super().__init__(options, spec, device, saved)
        auto = "cpu" if device == "cuda" else "disk"
        self.target = options.target if options.target != "auto" else auto
        self.moved_bytes = 0
        self.moved_tensors = 0
        self.weights: Any = None  # inference: offload_states' weight streaming does the work
        if spec.run.mode != "train":
            from memopt.strategies.offload_states import OffloadStates, OffloadStatesOptions

            self.weights = OffloadStates(OffloadStatesOptions(optimizer=False, params=True, target=options.target),
                                         spec, device, saved)

    def check(self) -> None:
        if self.device == "cpu" and self.target == "cpu":
            raise StrategyError("offload.target: cpu on a CPU device moves nothing (the tensors are already "
                                "there); use target: disk")
        if self.weights is not None:
            self.weights.check()

    def apply(self, model: ModelAdapter) -> None:
        if self.weights is not None:
            self.weights.apply(model)
            return
        module = model.model
        self.trace_device = next(module.parameters()).device.type  # the CPU when tracing a CUDA estimate
        self._pinned = {storage_key(t) for t in (*module.parameters(), *module.buffers())}

    def configure(self, plan: StepPlan) -> None:
        if self.weights is not None:
            self.weights.configure(plan)
            return
        plan.contexts.append(self.context)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        folder = Path(tempfile.mkdtemp(prefix="memopt-offload-")) if self.target == "disk" else None
        tier: Any = _DiskTier(folder) if folder is not None else _CpuTier()
        self.moved_bytes = self.moved_tensors = 0
        min_bytes = self.options.min_bytes

        def pack(t: torch.Tensor) -> Any:
            nbytes = t.numel() * t.element_size()
            if (t.device.type != self.trace_device or nbytes < min_bytes
                    or storage_key(t) in self._pinned):
                self.saved(t)
                return ("kept", t)
            self.moved_bytes += nbytes
            self.moved_tensors += 1
            if is_fake(t):
                return ("fake", _FakeTier.put(t))
            return ("moved", tier.put(t))

        def unpack(packed: Any) -> torch.Tensor:
            kind, value = packed
            return value if kind == "kept" else (_FakeTier if kind == "fake" else tier).get(value)

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                yield
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    def report(self) -> dict[str, Any]:
        if self.weights is not None:
            return dict(self.weights.report())
        return {"target": self.target, "moved_off_device_bytes": self.moved_bytes,
                "moved_tensors": self.moved_tensors}

    def close(self) -> None:
        if self.weights is not None:
            self.weights.close()
