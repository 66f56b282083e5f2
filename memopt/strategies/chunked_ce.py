"""Output projection + cross-entropy in chunks of tokens, each chunk checkpointed.

The batch x seq x vocab logits, their log-probabilities and their gradient never exist whole:
only one chunk's (Liger Kernel's fused linear cross-entropy, Cut Cross-Entropy, in plain PyTorch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.checkpoint import checkpoint

from memopt.strategies import register
from memopt.strategies.base import Options, Strategy


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias)                         # chunk, vocab
    return F.cross_entropy(logits.float(), targets, reduction="sum")


class ChunkedCrossEntropyHead(nn.Module):
    """Same loss as CrossEntropyHead (mean over tokens), computed ``chunk_size`` tokens at a time."""

    def __init__(self, chunk_size: int):
        super().__init__()
        self.chunk_size = chunk_size

    def forward(self, hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
        flat, tgt = hidden.flatten(0, 1), targets.flatten()           # n, d and n
        total = hidden.new_zeros((), dtype=torch.float32)
        for h, t in zip(flat.split(self.chunk_size), tgt.split(self.chunk_size)):
            total = total + checkpoint(_chunk_loss, h, head.weight, head.bias, t, use_reentrant=False)
        return total / tgt.numel()


class ChunkedCeOptions(Options):
    chunk_size: int = Field(256, ge=1, le=2**24, description="tokens per chunk")


@register
class ChunkedCe(Strategy):
    name = "chunked_ce"
    Options = ChunkedCeOptions
    summary = "output projection + cross-entropy in checkpointed chunks of tokens"
    saves = "the b x s x vocab logits, log-probs and their gradient (3 x b*s*V floats)"
    order = 20

    def apply(self, model: nn.Module) -> None:
        model.loss_head = ChunkedCrossEntropyHead(self.options.chunk_size)  # type: ignore[attr-defined]
