"""fsdp and ddp: the model over N ranks of a process group (PyTorch's FSDP2 ``fully_shard``, or replicated).

memopt launches the ranks itself (``--world-size N``: gloo on CPU, NCCL on CUDA) or runs under torchrun's
process group; each rank steps on its own shard of the global batch. Under ``memopt estimate`` one rank is
traced on fake tensors in a fake process group of N ranks (memopt.core._torch_private.fake_process_group).

fsdp: ``fully_shard`` on each block of the model adapter, then on the root. Each rank keeps 1/N of every
parameter (dim 0 padded to a multiple of N), of its gradient and of the optimizer state; a unit's parameters are
all-gathered when it runs (the ``unshard`` category) and freed after its forward (``reshard_after_forward``)
and after its backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from memopt.adapters import ModelAdapter
from memopt.core._torch_private import (
    fsdp_memory_reporting,
    in_fake_mode,
    meshes_outside_fake_mode,
    parallel_mesh,
    replicate,
)
from memopt.core.errors import StrategyError
from memopt.core.results import Category
from memopt.spec.schema import DTYPE_ALIASES
from memopt.strategies import register
from memopt.strategies.base import Options, StepPlan, Strategy

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class FsdpOptions(Options):
    world_size: int = Field(2, ge=1, le=2**16, description="ranks (processes) the model is sharded over")
    reshard_after_forward: bool = Field(True, description="free a unit's gathered parameters after its forward "
                                        "(gather again in backward); false keeps them until backward")
    mixed_precision: Literal["bfloat16", "float16"] | None = Field(
        None, description="FSDP's MixedPrecisionPolicy: gather and compute in this dtype, reduce gradients in "
        "float32")
    cpu_offload: bool = Field(False, description="FSDP's CPUOffloadPolicy: sharded parameters, gradients and "
                              "optimizer state in CPU memory (CUDA only)")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _dtype_spelling(cls, value: Any) -> Any:
        """bf16 and fp16 as run.dtype spells them."""
        return DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value


class DdpOptions(Options):
    world_size: int = Field(2, ge=1, le=2**16, description="ranks (processes), each with the whole model")


def needs_ranks(strategy: Strategy[Any]) -> None:
    """Refuse what cannot be split over the ranks: one rank, or a batch that does not divide."""
    world, batch = strategy.options.world_size, strategy.spec.train.batch_size
    shards = strategy.spec.batch_shards
    if world < 2:
        raise StrategyError(f"{strategy.name}.world_size: 1 rank shards nothing; give 2 or more")
    if batch % shards:
        raise StrategyError(f"{strategy.name}.world_size: train.batch_size {batch} does not split over {shards} "
                            "ranks (each rank steps on its own shard of the global batch)")


def require_process_group(name: str, world: int) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        raise StrategyError(f"{name}: needs a process group of {world} ranks: memopt profile launches them itself, "
                            "or run under torchrun")
    if dist.get_world_size() != world:
        raise StrategyError(f"{name}.world_size: {world}, but the process group has {dist.get_world_size()} ranks "
                            "(under torchrun the world size is --nproc-per-node x --nnodes)")


@register
class Fsdp(Strategy[FsdpOptions]):
    name = "fsdp"
    Options = FsdpOptions
    summary = ("FSDP2 fully_shard over N ranks (each block, then the root): parameters, gradients and optimizer "
               "state sharded, a unit's parameters all-gathered while it runs")
    saves = "model states / N per rank (+ padding); adds the gathered parameters of the running unit(s) (unshard)"
    order = 95
    searched = False
    unshards = True
    shards_model_states = True
    refuses = {"ddp": "a model is either sharded or replicated",
               "optim8bit": "its 8-bit state is per parameter of the whole model, not of a shard",
               "optim_in_bwd": "FSDP sets the sharded gradients after its reduce-scatter, outside autograd's hooks",
               "offload_states": "use fsdp.cpu_offload (FSDP's own CPU offload of the sharded states)",
               "quant": "FSDP shards floating-point parameters; packed integer weights are not",
               "lora": "not measured with FSDP yet", "amp": "FSDP casts its gathered parameters itself; use run.dtype",
               "prune": "the pruned model's embedding reaches FSDP's forward unsharded (fails on the ranks)"}

    def check(self) -> None:
        needs_ranks(self)
        if self.options.cpu_offload and self.device != "cuda":
            raise StrategyError("fsdp.cpu_offload: the states are in CPU memory already on a CPU device")

    def apply(self, model: ModelAdapter) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        world = self.options.world_size
        require_process_group(self.name, world)
        # beside tensor parallelism FSDP shards over the mesh's other dimension
        mesh = parallel_mesh(next(model.model.parameters()).device.type, world, world // self.spec.batch_shards)["dp"]
        kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": self.options.reshard_after_forward}
        if self.options.mixed_precision:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=DTYPES[self.options.mixed_precision],
                                                       reduce_dtype=torch.float32)
        if self.options.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        with meshes_outside_fake_mode():  # 2-D: FSDP2 joins its mesh with the tensor-parallel one
            for unit in [*model.blocks(), model.model]:
                fully_shard(unit, **kwargs)
        model.loss_through_root()  # the root's own parameters are gathered in its forward hooks

    def configure(self, plan: StepPlan) -> None:
        plan.contexts.append(self.context)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Around forward and backward: the tracker (pointed at before the plan's contexts are entered) hears of
        FSDP's resized all-gather buffers and sharded grads; unmeasured steps need nothing."""
        tracker = self.saved.tracker
        if tracker is None:
            yield
            return
        with fsdp_memory_reporting(lambda t: tracker.regrown(t, Category.UNSHARD),
                                   lambda t: tracker.resized(t.untyped_storage()),
                                   lambda t: tracker.mark(t, Category.GRADS),
                                   lambda: tracker.allocating_as(Category.UNSHARD)):
            yield

    def report(self) -> dict[str, Any]:
        return {"world_size": self.options.world_size, "mesh": {"dp": self.spec.batch_shards}}


@register
class Ddp(Strategy[DdpOptions]):
    name = "ddp"
    Options = DdpOptions
    summary = "data parallel over N ranks: every rank holds the whole model, gradients all-reduced (the baseline)"
    saves = "nothing: activations scale with the rank's shard of the batch; adds the gradient buckets"
    order = 95
    searched = False
    refuses = {"offload_states": "its own gradient handling bypasses the all-reduce",
               "optim_in_bwd": "the optimizer would step before the gradients are all-reduced"}

    def check(self) -> None:
        needs_ranks(self)
        if in_fake_mode():
            raise StrategyError("ddp: cannot be estimated (DDP's start-up checks read the weights, which fake tensors "
                                "do not have); measure it with memopt profile, or estimate fsdp")

    def apply(self, model: ModelAdapter) -> None:
        require_process_group(self.name, self.options.world_size)
        replicate(model.model)

    def report(self) -> dict[str, Any]:
        return {"world_size": self.options.world_size, "mesh": {"dp": self.options.world_size}}
