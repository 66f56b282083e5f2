"""The models and optimizers a program uses, found through PyTorch's global hooks: no reference to them is needed
(``memopt run``, ``memopt.track()`` without arguments, the pytest marker, the training-framework callbacks).

- a model is a top-level module: one whose forward starts while no other module's forward runs (a module with no
  parameters or buffers, such as a loss, is not one);
- a parameter or buffer registered on a module in the block (a model built inside it) is one from then on;
- an optimizer is one whose ``step`` runs (``torch.optim.Optimizer``'s global step hooks), found at its first step,
  so an optimizer created lazily (Hugging Face ``Trainer``) is found as well.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as nn_module
from torch.optim import optimizer as optim_module


class Discovery:
    """While entered, calls ``on_model(module, args)`` for each new top-level module as its forward starts,
    ``on_optimizer(optimizer)`` for each new optimizer before its first step, and ``on_step(optimizer, ended)`` around
    every optimizer step (``ended`` False before it, True after)."""

    def __init__(self, on_model: Callable[[nn.Module, Any], None], on_optimizer: Callable[[Any], None],
                 on_step: Callable[[Any, bool], None],
                 on_tensor: Callable[[torch.Tensor, bool], None] = lambda _t, _is_param: None):
        self.on_model, self.on_optimizer, self.on_step = on_model, on_optimizer, on_step
        self.on_tensor = on_tensor  # a parameter (True) or buffer (False) registered on a module in the block
        self.models: list[nn.Module] = []
        self.optimizers: list[Any] = []
        self._depth = 0  # module forwards running now
        self._handles: list[Any] = []

    def __enter__(self) -> Discovery:
        self._handles = [nn_module.register_module_forward_pre_hook(self._forward_starts),
                         nn_module.register_module_forward_hook(self._forward_ends, always_call=True),
                         optim_module.register_optimizer_step_pre_hook(self._step_starts),
                         optim_module.register_optimizer_step_post_hook(self._step_ends),
                         nn_module.register_module_parameter_registration_hook(self._parameter_registered),
                         nn_module.register_module_buffer_registration_hook(self._buffer_registered)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward_starts(self, module: nn.Module, args: Any) -> None:
        depth, self._depth = self._depth, self._depth + 1
        if depth or any(m is module for m in self.models) or not _holds_tensors(module):
            return
        if any(_is_inside(module, m) for m in self.models):
            return  # a submodule of a known model called on its own (a generation loop, a loss head)
        self.models.append(module)
        self.on_model(module, args)

    def _forward_ends(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth = max(0, self._depth - 1)

    def _step_starts(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._depth = 0  # a forward that raised inside a module leaves no forward running by now
        if not any(o is optimizer for o in self.optimizers):
            self.optimizers.append(optimizer)
            self.on_optimizer(optimizer)
        self.on_step(optimizer, False)

    def _step_ends(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.on_step(optimizer, True)


    def _parameter_registered(self, module: nn.Module, name: str, param: Any) -> None:
        if isinstance(param, torch.Tensor):
            self.on_tensor(param, True)

    def _buffer_registered(self, module: nn.Module, name: str, buffer: Any) -> None:
        if isinstance(buffer, torch.Tensor):
            self.on_tensor(buffer, False)


def _holds_tensors(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None or next(module.buffers(), None) is not None


def _is_inside(module: nn.Module, model: nn.Module) -> bool:
    return any(m is module for m in model.modules())


def optimizer_parameters(optimizer: Any) -> list[torch.Tensor]:
    """The parameters an optimizer updates (its param groups')."""
    return [p for group in getattr(optimizer, "param_groups", []) for p in group.get("params", [])
            if isinstance(p, torch.Tensor)]
