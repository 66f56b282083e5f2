"""Activation checkpointing with torch.utils.checkpoint (non-reentrant).

full: every layer keeps only its input and recomputes the rest in backward (Chen et al. 2016).
every: every k-th layer is checkpointed. selective: matmul and attention outputs are kept, the cheap
elementwise ops recomputed (Korthikanti et al. 2022), via create_selective_checkpoint_contexts.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from memopt.adapters import ModelAdapter
from memopt.core._torch_private import TorchDispatchMode, observe_saved_tensors
from memopt.strategies import register
from memopt.strategies.base import Options, SavedTensors, Strategy

aten = torch.ops.aten
# Ops whose outputs selective checkpointing keeps: the matmuls and attention kernels (the expensive ones).
SAVED_OPS = {
    aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.linear.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}


def keep_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class _NoteKept(TorchDispatchMode):
    """Tells the tracker that selective checkpointing keeps these ops' outputs for backward."""

    def __init__(self, saved: Callable[[torch.Tensor], None]):
        super().__init__()
        self.saved = saved

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in SAVED_OPS:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.saved(t)
        return out


def _full_contexts(saved: SavedTensors) -> tuple[Any, Any]:
    # Recomputed tensors are saved through checkpoint's own hooks: observe them as activations too.
    return contextlib.nullcontext(), observe_saved_tensors(saved)


def _selective_contexts(saved: SavedTensors) -> tuple[Any, Any]:
    forward, recompute = create_selective_checkpoint_contexts(keep_matmuls)

    @contextlib.contextmanager
    def forward_with_notes():
        with forward, _NoteKept(saved):
            yield

    @contextlib.contextmanager
    def recompute_with_notes():
        with recompute, observe_saved_tensors(saved):
            yield

    return forward_with_notes(), recompute_with_notes()


class Checkpointed(nn.Module):
    """Runs ``inner`` under torch.utils.checkpoint: only its inputs are saved, the rest is recomputed."""

    def __init__(self, inner: nn.Module, selective: bool, saved: SavedTensors):
        super().__init__()
        self.inner = inner
        self._context_fn = functools.partial(_selective_contexts if selective else _full_contexts, saved)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.inner(*args, **kwargs)
        return checkpoint(self.inner, *args, use_reentrant=False, context_fn=self._context_fn, **kwargs)


class CkptOptions(Options):
    policy: Literal["full", "every", "selective"] = "full"
    every: int = Field(2, ge=1, le=1024, description="with policy every: checkpoint every k-th layer")


@register
class Ckpt(Strategy[CkptOptions]):
    name = "ckpt"
    Options = CkptOptions
    summary = "activation checkpointing per layer: full, every k-th layer, or selective (keep matmuls)"
    saves = "saved activations shrink from ~L x layer activations to L x layer input + one layer"
    order = 30
    candidates = ({"policy": "selective"}, {"policy": "every", "every": 2}, {})

    def apply(self, model: ModelAdapter) -> None:
        opts = self.options
        blocks = model.blocks()
        for i, block in enumerate(blocks):
            if opts.policy == "every" and i % opts.every:
                continue
            blocks[i] = Checkpointed(block, selective=opts.policy == "selective", saved=self.saved)


