"""Saved activations go one tier down through saved_tensors_hooks: CUDA -> pinned CPU, CPU -> disk.

A context around forward+backward, as torchtune's activation offloading is, not a model rewrite.
``torch.autograd.graph.save_on_cpu`` alone does nothing on CPU (the tensors are already there), so on
CPU memopt writes them to files in a temporary folder (memopt.strategies.tiers, the tiers offload_states uses
too), removed afterwards, also when the step fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import Field

from memopt.adapters import ModelAdapter
from memopt.core._torch_private import is_fake, storage_key
from memopt.core.errors import StrategyError
from memopt.strategies import register
from memopt.strategies.base import Options, SavedTensors, StepPlan, Strategy
from memopt.strategies.offload_states import OffloadStates, OffloadStatesOptions
from memopt.strategies.tiers import DiskTier, FakeTier, HostTier, Tier


class OffloadOptions(Options):
    target: Literal["auto", "cpu", "disk"] = Field("auto", description="auto: cpu on CUDA, disk on CPU")
    min_bytes: int = Field(1024, ge=0, description="smaller saved tensors stay on the device")


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
        tier: Tier = DiskTier("offload", "memopt-offload-") if self.target == "disk" else HostTier()
        fake = FakeTier()
        self.moved_bytes = self.moved_tensors = 0
        min_bytes = self.options.min_bytes

        def pack(t: torch.Tensor) -> Any:
            nbytes = t.numel() * t.element_size()
            if (t.device.type != self.trace_device or nbytes < min_bytes
                    or storage_key(t) in self._pinned):
                self.saved(t)
                return ("kept", t)
            self.moved_tensors += 1
            self.moved_bytes += nbytes
            key = str(self.moved_tensors)
            where = fake if is_fake(t) else tier
            where.put(key, t)
            return (where, key, t.shape, t.dtype, t.device)

        def unpack(packed: Any) -> torch.Tensor:
            if packed[0] == "kept":
                return packed[1]
            where, key, shape, dtype, device = packed
            return where.take(key, shape, dtype, device)

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                yield
        finally:
            tier.close()

    def report(self) -> dict[str, Any]:
        if self.weights is not None:
            return dict(self.weights.report())
        return {"target": self.target, "moved_off_device_bytes": self.moved_bytes,
                "moved_tensors": self.moved_tensors}

    def close(self) -> None:
        if self.weights is not None:
            self.weights.close()
