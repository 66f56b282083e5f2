"""Output projection + cross-entropy in chunks of tokens, each chunk recomputed in backward.

The batch x seq x vocab logits, their log-probabilities and their gradient never exist whole: only
one chunk's (the idea of Liger Kernel's fused linear cross-entropy and Cut Cross-Entropy, in plain
PyTorch). Forward keeps only the hidden states; backward recomputes each chunk's logits and writes
the weight gradient into one buffer in place, so not even two weight-sized gradients coexist.

The default chunk comes from the shapes the loss actually sees (per micro-batch under accum), by
``auto_chunk_size``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from memopt.adapters import AdapterError, ModelAdapter
from memopt.core.errors import StrategyError
from memopt.strategies import register
from memopt.strategies.base import Options, Strategy

MIN_AUTO_CHUNK = 64


def auto_chunk_size(tokens: int, d_model: int, vocab: int) -> int:
    """Tokens per chunk: the smallest power of two whose logits (chunk x vocab) are at least the hidden
    states plus their gradient that the loss holds anyway (2 x tokens x d_model); at least 64 tokens and
    at most ``tokens``.

    Liger Kernel's fused-linear-cross-entropy rule sizes one chunk's logits like the hidden input
    (next power of two of ceil(tokens / ceil(vocab / d_model))); this one counts the input's gradient
    too, so chunks are about twice as large: 256 on the seed shape (4096 tokens, d_model 512, vocab
    32000), where Liger's gives 128. The floor of 64 keeps a chunk's logits (64 x vocab) within the
    output weight (vocab x d_model, for d_model >= 64), which the step holds four times anyway (weight,
    gradient, two Adam moments); smaller chunks would save little and add per-chunk overhead.
    """
    need = math.ceil(2 * tokens * d_model / vocab)
    return min(tokens, max(MIN_AUTO_CHUNK, 1 << max(need - 1, 0).bit_length()))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(hidden_i @ W^T + b, target_i), chunk by chunk in forward and in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for h, t in zip(hidden.split(chunk), targets.split(chunk)):
            logits = F.linear(h, weight, bias).float()                              # chunk, vocab
            total += F.cross_entropy(logits, t, reduction="sum")
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk = chunk
        return total / targets.numel()

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, targets = ctx.saved_tensors
        scale = grad_loss / targets.numel()
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        for start in range(0, targets.numel(), ctx.chunk):
            h, t = hidden[start:start + ctx.chunk], targets[start:start + ctx.chunk]
            probs = F.linear(h, weight, bias).float()                                # chunk, vocab
            probs.sub_(probs.amax(-1, keepdim=True)).exp_()                          # softmax, in place:
            probs.div_(probs.sum(-1, keepdim=True))                                  # one chunk buffer
            probs[torch.arange(t.numel(), device=t.device), t] -= 1.0               # dCE/dlogits
            g = probs.mul_(scale).to(weight.dtype)
            if grad_hidden is not None:
                torch.mm(g, weight, out=grad_hidden[start:start + ctx.chunk])
            if grad_weight is not None:
                grad_weight.addmm_(g.t(), h)
            if grad_bias is not None:
                grad_bias += g.sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None


class ChunkedCrossEntropyHead(nn.Module):
    """Same loss as CrossEntropyHead (mean over tokens), computed ``chunk_size`` tokens at a time
    (None: ``auto_chunk_size`` of the hidden states this call gets)."""

    def __init__(self, chunk_size: int | None):
        super().__init__()
        self.chunk_size = chunk_size
        # set by offload_states:params when it streams the head's weight in chunks of vocabulary rows
        self.streamed_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def forward(self, hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
        if self.streamed_loss is not None:
            return self.streamed_loss(hidden, head.weight, targets)
        flat = hidden.flatten(0, -2)
        chunk = self.chunk_size or auto_chunk_size(flat.shape[0], flat.shape[1], head.weight.shape[0])
        return _ChunkedLinearCrossEntropy.apply(flat, head.weight, head.bias, targets.flatten(), chunk)


class ChunkedCeOptions(Options):
    chunk_size: int | None = Field(None, ge=1, le=2**24, description=(
        "tokens per chunk; default (auto): the smallest power of two whose logits (chunk x vocab) are at "
        "least 2 x tokens x d_model (the hidden states and their gradient), at least 64, at most the "
        "micro-batch's tokens"))


@register
class ChunkedCe(Strategy[ChunkedCeOptions]):
    name = "chunked_ce"
    Options = ChunkedCeOptions
    summary = "output projection + cross-entropy in chunks of tokens, recomputed chunk by chunk in backward"
    saves = "the b x s x vocab logits, log-probs and their gradient (3 x b*s*V floats)"
    order = 20
    needs_to_know = "final hidden states and output head"

    def check(self) -> None:
        quant = next((s.options for s in self.spec.strategies if s.name == "quant"), None)
        if quant is not None and getattr(quant, "head", False):
            raise StrategyError("chunked_ce+quant: refused with quant.head: true (the chunked loss needs the "
                                "output layer's float weight); keep quant.head: false")

    def apply(self, model: ModelAdapter) -> None:
        if model.head() is None:
            raise AdapterError("chunked_ce: this model has no separable output head")
        model.replace_loss(ChunkedCrossEntropyHead(self.options.chunk_size), "loss_head")
