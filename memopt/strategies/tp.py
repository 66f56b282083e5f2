"""tp: tensor parallelism, Megatron's split of each block through PyTorch's ``parallelize_module``.

In every block the attention's q, k and v and the feed-forward's up (and gate) projections are split by output rows
(``ColwiseParallel``: each of the ``size`` ranks computes its heads and its FFN channels), o and down by input
columns (``RowwiseParallel``: partial sums all-reduced). Each rank holds 1/size of those weights, their gradients
and optimizer state; embeddings, norms and head stay whole (replicated). The ranks of a tensor-parallel group step
on the same rows of the batch. With ``world_size`` > ``size`` (``--world-size N`` beside ``tp:size=T+fsdp``) the
mesh is 2-D, TorchTitan's layout: FSDP2 over N/T groups of T consecutive ranks.
"""

from __future__ import annotations

from typing import Any, cast

from pydantic import Field, model_validator
from torch import nn

from memopt.adapters import ModelAdapter
from memopt.core._torch_private import parallel_mesh
from memopt.core.errors import StrategyError
from memopt.strategies import register
from memopt.strategies.base import Options, Strategy
from memopt.strategies.fsdp import needs_ranks, require_process_group


class TpOptions(Options):
    size: int = Field(2, ge=2, le=1024, description="ranks each block's projections are split over (the "
                      "tensor-parallel degree)")
    world_size: int = Field(0, ge=0, le=2**16, description="ranks in all (0: size); more than size needs fsdp, "
                            "which shards over the other world_size / size")

    @model_validator(mode="after")
    def _whole_groups(self) -> TpOptions:
        if self.world_size == 0:
            object.__setattr__(self, "world_size", self.size)
        if self.world_size % self.size:
            raise ValueError(f"world_size {self.world_size} is not a whole number of tensor-parallel groups of "
                             f"{self.size}")
        return self

    @property
    def ranks_per_batch(self) -> int:
        return self.size


@register
class Tp(Strategy[TpOptions]):
    name = "tp"
    Options = TpOptions
    summary = ("tensor parallelism (Megatron's split through parallelize_module): q/k/v and FFN up/gate split by "
               "rows, o and down by columns, over size ranks; 2-D with fsdp")
    saves = "the blocks' projection weights, their grads and optimizer state / size per rank; activations inside "\
            "attention and the FFN / size"
    order = 94  # before fsdp (95): FSDP2 shards the tensor-parallel DTensors over the other mesh dimension
    searched = False
    shards_model_states = True  # the blocks' projections, most of a Transformer's states
    refuses = {"ddp": "use fsdp for the data-parallel dimension",
               "quant": "packed integer weights are not split", "lora": "not measured with tensor parallelism yet",
               "optim8bit": "its 8-bit state is per parameter of the whole model, not of a shard",
               "offload_states": "not measured with tensor parallelism yet",
               "prune": "pruning changes the widths the split divides", "amp": "not measured with tensor "
               "parallelism yet; use run.dtype or fsdp.mixed_precision",
               "optim_in_bwd": "not measured with tensor parallelism yet"}

    def check(self) -> None:
        size, world = self.options.size, self.options.world_size
        if world > size and not any(s.name == "fsdp" for s in self.spec.strategies):
            raise StrategyError(f"tp.world_size: {world} ranks in groups of {size} need a data-parallel dimension: "
                                f"add fsdp (-s tp:size={size}+fsdp --world-size {world})")
        fsdp = next((s for s in self.spec.strategies if s.name == "fsdp"), None)
        if fsdp is not None and fsdp.world_size != world:
            raise StrategyError(f"tp.world_size: {world}, but fsdp.world_size is {fsdp.world_size}; give one "
                                "--world-size for both")
        if self.spec.run.mode != "train":
            raise StrategyError(f"tp: applies to --mode train, not to run.mode {self.spec.run.mode}")
        needs_ranks(self)

    def apply(self, model: ModelAdapter) -> None:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        size, world = self.options.size, self.options.world_size
        require_process_group(self.name, world)
        device = next(model.model.parameters()).device.type
        mesh = parallel_mesh(device, world, size)
        projections = model.attention_projections()  # first: an encoder's attention is split into Linears here
        names = {id(m): name for name, m in model.model.named_modules()}
        plan: dict[str, Any] = {}
        for attn in projections:
            for what, count in (("heads", attn.n_heads), ("key/value heads", attn.n_kv_heads)):
                if count % size:
                    raise StrategyError(f"tp.size: {count} attention {what} do not split over {size} ranks")
            plan.update({names[id(attn.q)]: ColwiseParallel(), names[id(attn.k)]: ColwiseParallel(),
                         names[id(attn.v)]: ColwiseParallel(), names[id(attn.o)]: RowwiseParallel()})
            attn.n_heads, attn.n_kv_heads = attn.n_heads // size, attn.n_kv_heads // size  # each rank's own
        for ffn in model.feed_forwards():
            for up in ffn.up:
                rows = cast(nn.Linear, model.model.get_submodule(up)).out_features
                if rows % size:
                    raise StrategyError(f"tp.size: the feed-forward's {rows} channels ({up}) do not split over "
                                        f"{size} ranks")
                plan[up] = ColwiseParallel()
            plan[ffn.down] = RowwiseParallel()
        parallelize_module(model.model, mesh["tp"], plan)

    def report(self) -> dict[str, Any]:
        return {"tp_size": self.options.size, "world_size": self.options.world_size,
                "mesh": {"dp": self.options.world_size // self.options.size, "tp": self.options.size}}
