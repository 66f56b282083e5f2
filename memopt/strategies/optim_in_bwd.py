"""The optimizer step fused into backward, per parameter (register_post_accumulate_grad_hook).

Each parameter steps as soon as its gradient is complete and the gradient is freed at once, so the
full gradient set never lives together (LOMO; PyTorch's "optimizer step in backward" tutorial).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memopt.adapters import ModelAdapter
from memopt.core.errors import StrategyError
from memopt.strategies import register
from memopt.strategies.base import Options, Strategy


class FusedOptimizer:
    """One optimizer per parameter, stepped from that parameter's post-accumulate-grad hook."""

    def __init__(self, params: list[nn.Parameter], make: Callable[[list[nn.Parameter]], Any]):
        self.optimizers: dict[torch.Tensor, Any] = {p: make([p]) for p in params}
        self.handles = [p.register_post_accumulate_grad_hook(self._step_one) for p in params]

    def _step_one(self, param: torch.Tensor) -> None:
        opt = self.optimizers[param]
        opt.step()
        opt.zero_grad(set_to_none=True)

    @property
    def state(self) -> dict[Any, Any]:
        merged: dict[Any, Any] = {}
        for opt in self.optimizers.values():
            merged.update(opt.state)
        return merged

    def step(self) -> None:
        """Nothing to do: every parameter already stepped during backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: every gradient was freed right after its step."""


class OptimInBwdOptions(Options):
    pass


@register
class OptimInBwd(Strategy[OptimInBwdOptions]):
    name = "optim_in_bwd"
    Options = OptimInBwdOptions
    summary = "step each parameter inside backward as soon as its gradient is ready, then free it"
    saves = "gradients never all live at once: ~one parameter's gradient instead of all of them"
    order = 70
    refuses = {"accum": "gradients must accumulate over all micro-batches before a step, but optim_in_bwd "
                        "steps on each parameter's first gradient"}

    def check(self) -> None:
        if self.spec.train.optimizer == "none":
            raise StrategyError("optim_in_bwd: train.optimizer is none, so there is no step to fuse")

    def attach_optimizer(self, model: ModelAdapter, make_optimizer: Callable[..., Any]) -> Any:
        if any(s.name == "offload_states" for s in self.spec.strategies):
            return None  # offload_states steps each parameter in backward itself, where its state lives
        params = [p for p in model.model.parameters() if p.requires_grad]
        train = self.spec.train
        return FusedOptimizer(params, lambda ps: make_optimizer(train.optimizer, ps, train.lr))

