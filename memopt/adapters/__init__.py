"""The model seam: what strategies, the runner and drift may know about a model.

A ``ModelAdapter`` wraps one ``nn.Module`` and answers, in the model's own terms: its repeated blocks
(what checkpointing and offload policies wrap), its Linear layers by qualified name (what quantization,
LoRA and pruning swap), its attention (how to switch it to SDPA, its q/k/v/o projections), its
embedding and output head, and its training objective split into ``hidden_states`` and
``loss_from_hidden`` (so a chunked loss can replace the second half). No strategy imports memopt's
model classes; a strategy that needs what an adapter cannot give refuses with ``AdapterError``'s reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from memopt.core.errors import StrategyError
from memopt.model.kv_cache import KvPlan, OnNew

Batch = tuple[torch.Tensor, torch.Tensor]            # (tokens, next-token targets), (batch, seq) each
LinearFilter = Callable[[nn.Module, str], bool]       # (module, fqn) -> keep it, as torchao's filter_fn
LossFromHidden = Callable[[torch.Tensor, nn.Linear, torch.Tensor], torch.Tensor]  # (hidden, head, targets)


class LossModule(nn.Module):
    """A loss function as a module, so the tracker names it (e.g. ``loss_head``) like the one it replaces."""

    def __init__(self, loss: LossFromHidden):
        super().__init__()
        self.loss = loss

    def forward(self, hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(hidden, head, targets)


class AdapterError(StrategyError):
    """This model cannot give what a strategy needs (e.g. no separable output head)."""


@dataclass(frozen=True)
class FeedForward:
    """One FFN by the qualified names of its Linears: ``up`` (parallel inputs, e.g. SwiGLU's gate and up)
    and ``down``; pruning keeps the same channels in each."""

    up: tuple[str, ...]
    down: str


class AttentionProjections(Protocol):
    """q/k/v/o Linears of one attention module, with its head layout (what head pruning rewrites)."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    n_heads: int
    n_kv_heads: int
    head_dim: int


class ModelAdapter(Protocol):
    """What memopt may know about a model."""

    model: nn.Module

    def blocks(self) -> nn.ModuleList:
        """The repeated layers, in order; strategies may replace items (e.g. with a checkpointed wrapper)."""
        ...

    def linears(self, keep: LinearFilter | None = None) -> dict[str, nn.Linear]:
        """Qualified name -> ``nn.Linear`` inside the blocks (attention projections included: a packed
        projection is first split into q/k/v/o Linears holding the same weights)."""
        ...

    def head(self) -> tuple[str, nn.Linear] | None:
        """The output projection (name, Linear), or None when the model has no separable head."""
        ...

    def embedding(self) -> tuple[str, nn.Embedding] | None:
        """The token embedding (name, module), or None."""
        ...

    def tied_embeddings(self) -> bool:
        """Whether the head shares the embedding's weight."""
        ...

    def attention_kind(self) -> str:
        """'eager' (the s*s scores materialised) or 'sdpa'."""
        ...

    def use_attention(self, kind: str) -> None:
        """Switch every attention module to ``kind``."""
        ...

    def attention_projections(self) -> list[AttentionProjections]:
        """Each block's attention as q/k/v/o Linears (packed projections split first)."""
        ...

    def feed_forwards(self) -> list[FeedForward]:
        """Each block's FFN."""
        ...

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """The final hidden states (batch, seq, d) the output head reads."""
        ...

    def loss_from_hidden(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The training loss from the hidden states."""
        ...

    def replace_loss(self, loss: LossFromHidden, name: str) -> None:
        """Compute ``loss_from_hidden`` with ``loss(hidden, head, targets)`` instead (as a module named ``name``)."""
        ...

    def loss(self, batch: Batch) -> torch.Tensor:
        """The training objective for one batch: a scalar."""
        ...

    def own_optimizer(self) -> Any | None:
        """The optimizer the model brings (a compiled Keras model's), stepped as a torch one; None: memopt makes the
        spec's."""
        ...

    def loss_through_root(self) -> None:
        """From now on compute ``loss`` inside a call of the root module, so that hooks on the root run around it
        (FSDP2 gathers the root's own parameters there: embeddings, final norm, head)."""
        ...

    def logits(self, batch: Batch) -> torch.Tensor:
        """Logits (batch, seq, vocab) without the loss, for accuracy drift and ``--mode infer``."""
        ...

    def make_cache(self, plan: KvPlan, batch: int, positions: int, on_new: OnNew) -> Any:
        """An empty KV cache for generation (``positions`` at most), its key/value tensors reported to ``on_new``;
        AdapterError when the model cannot generate or the plan's layout does not apply to it."""
        ...

    def next_logits(self, tokens: torch.Tensor, cache: Any | None, start: int) -> torch.Tensor:
        """Tokens (batch, s) at positions start.. -> the last position's logits (batch, vocab), stored in
        ``cache``; without a cache the tokens are the whole sequence, recomputed."""
        ...

    def skip_cache_to(self, cache: Any, length: int) -> None:
        """Make ``cache`` stand for ``length`` positions seen (estimates trace the first and last decode steps)."""
        ...


__all__ = ["AdapterError", "AttentionProjections", "Batch", "FeedForward", "LinearFilter", "LossFromHidden",
           "LossModule", "ModelAdapter"]


