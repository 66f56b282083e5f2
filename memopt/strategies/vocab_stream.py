"""The embedding and the output head read from a tier in chunks of vocabulary rows (``offload_states:params``).

A vocabulary matrix (vocab x d_model) is the largest single unit a model has: 62.5 MiB each at vocab 32000,
d_model 512, fp32. Brought in whole, it sets the floor of parameter streaming, and its gradient doubles it.
Here neither ever exists whole on the device:

- the embedding gathers each token's row chunk by chunk; its gradient is built and written out chunk by chunk;
- the output head and the cross-entropy run with the vocabulary as the outer loop: the log-sum-exp of each
  token's logits accumulates over the chunks (the online softmax of Flash Attention and Cut Cross-Entropy),
  and backward recomputes each chunk's logits from the saved log-sum-exp, adds that chunk's share to the
  hidden states' gradient and writes that chunk's weight gradient out;
- logits asked for outside training (drift, generation) are computed chunk by chunk into the output.

Every operation keeps its shapes independent of the data (masks and clamped indices, no boolean indexing), so
the same code traces under fake tensors for ``estimate``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from memopt.core.results import Category
from memopt.strategies.base import SavedTensors
from memopt.strategies.chunked_ce import auto_chunk_size
from memopt.strategies.tiers import Tier

CHUNK_ELEMENTS = 2**20  # elements of a vocabulary matrix per chunk (4 MiB in fp32)
IGNORE_INDEX = -100     # cross-entropy's default: targets with this value add nothing


class StreamedGradients(Protocol):
    """Where a streamed matrix's gradient goes, chunk by chunk (the offloaded optimizer)."""

    def add_streamed_grad(self, p: nn.Parameter, start_row: int, grad: torch.Tensor) -> None: ...

    def streamed_grad_done(self, p: nn.Parameter) -> None: ...


def auto_rows(d_model: int) -> int:
    """Vocabulary rows per chunk: CHUNK_ELEMENTS elements, at least one row."""
    return max(1, CHUNK_ELEMENTS // max(d_model, 1))


class VocabRows:
    """One vocabulary matrix kept in a tier under ``key``: its rows read ``rows`` at a time, its gradient handed
    to the optimizer chunk by chunk."""

    def __init__(self, param: nn.Parameter, key: str, tier: Tier, rows: int, saved: SavedTensors):
        self.param, self.key, self.tier, self.saved = param, key, tier, saved
        self.vocab, self.d_model = param.shape
        self.rows = min(rows, self.vocab)
        self.gradients: StreamedGradients | None = None  # set when the optimizer is attached

    def starts(self) -> Iterator[int]:
        return iter(range(0, self.vocab, self.rows))

    def load(self, start: int) -> torch.Tensor:
        """Rows ``start`` to ``start + rows`` of the matrix, on the device (counted as parameters)."""
        n = min(self.rows, self.vocab - start)
        chunk = torch.empty((n, self.d_model), dtype=self.param.dtype, device=self.param.device)
        self.saved.mark(chunk, Category.PARAMS)
        self.tier.read_into(self.key, chunk, start * self.d_model * chunk.element_size())
        return chunk

    def new_grad(self, start: int) -> torch.Tensor:
        n = min(self.rows, self.vocab - start)
        grad = torch.zeros((n, self.d_model), dtype=self.param.dtype, device=self.param.device)
        self.saved.mark(grad, Category.GRADS)
        return grad

    def wants_grad(self) -> bool:
        return self.param.requires_grad and self.gradients is not None

    def add_grad(self, start: int, grad: torch.Tensor) -> None:
        assert self.gradients is not None
        self.gradients.add_streamed_grad(self.param, start, grad)

    def grad_done(self) -> None:
        assert self.gradients is not None
        self.gradients.streamed_grad_done(self.param)


def _in_chunk(ids: torch.Tensor, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk-local row of every id (clamped into the chunk) and whether the id lies in the chunk."""
    local = ids - start
    inside = (local >= 0) & (local < n)
    return local.clamp_(0, n - 1), inside


class _StreamedEmbedding(torch.autograd.Function):
    """weight[ids] with the weight read chunk by chunk; the weight's gradient goes to ``source`` chunk by chunk
    (autograd gets None for it, so no vocab-sized gradient is ever made)."""

    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, weight: torch.Tensor, source: VocabRows,
                padding_idx: int | None) -> torch.Tensor:
        out = torch.zeros((*ids.shape, source.d_model), dtype=weight.dtype, device=ids.device)
        for start in source.starts():
            chunk = source.load(start)
            local, inside = _in_chunk(ids, start, chunk.shape[0])
            rows = F.embedding(local, chunk).mul_(inside.unsqueeze(-1))
            out.add_(rows)
            del chunk, rows, local, inside
        ctx.save_for_backward(ids)
        ctx.source, ctx.padding_idx = source, padding_idx
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[None, None, None, None]:
        (ids,) = ctx.saved_tensors
        source: VocabRows = ctx.source
        if not source.wants_grad():
            return None, None, None, None
        flat_ids, flat_grad = ids.reshape(-1), grad_out.reshape(-1, source.d_model)
        if ctx.padding_idx is not None:  # nn.Embedding: the padding row gets no gradient
            flat_grad = flat_grad * (flat_ids != ctx.padding_idx).unsqueeze(-1).to(flat_grad.dtype)
        for start in source.starts():
            grad = source.new_grad(start)
            local, inside = _in_chunk(flat_ids, start, grad.shape[0])
            grad.index_add_(0, local, flat_grad * inside.unsqueeze(-1).to(flat_grad.dtype))
            source.add_grad(start, grad)
            del grad, local, inside
        source.grad_done()
        return None, None, None, None


def embedding_forward(module: nn.Embedding, source: VocabRows) -> Any:
    """A forward for ``module`` that streams its weight from ``source``."""
    def forward(ids: torch.Tensor) -> torch.Tensor:
        return _StreamedEmbedding.apply(ids, module.weight, source, module.padding_idx)
    return forward


class _StreamedLinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(hidden_i @ W^T, target_i) with W read from ``source`` a chunk of vocabulary rows at a time."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, source: VocabRows,
                chunk: int) -> torch.Tensor:
        tokens = targets.numel()
        lse = torch.full((tokens,), float("-inf"), dtype=torch.float32, device=hidden.device)
        target_logit = torch.zeros((tokens,), dtype=torch.float32, device=hidden.device)
        for start in source.starts():
            rows = source.load(start)
            for t0 in range(0, tokens, chunk):
                logits = F.linear(hidden[t0:t0 + chunk], rows).float()                # chunk, rows
                torch.logaddexp(lse[t0:t0 + chunk], logits.logsumexp(-1), out=lse[t0:t0 + chunk])
                local, inside = _in_chunk(targets[t0:t0 + chunk], start, rows.shape[0])
                target_logit[t0:t0 + chunk] += logits.gather(1, local.unsqueeze(1)).squeeze(1) * inside
                del logits, local, inside
            del rows
        valid = targets != IGNORE_INDEX
        ctx.save_for_backward(hidden, targets, lse)
        ctx.source, ctx.chunk = source, chunk
        return ((lse - target_logit) * valid).sum() / tokens

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, None, None, None, None]:
        hidden, targets, lse = ctx.saved_tensors
        source: VocabRows = ctx.source
        chunk, tokens = ctx.chunk, targets.numel()
        weights = (targets != IGNORE_INDEX).float() * (grad_loss / tokens)            # d loss / d CE_i
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        wants_grad = source.wants_grad()
        for start in source.starts():
            rows = source.load(start)
            grad_rows = source.new_grad(start) if wants_grad else None
            for t0 in range(0, tokens, chunk):
                h = hidden[t0:t0 + chunk]
                probs = F.linear(h, rows).float()
                probs.sub_(lse[t0:t0 + chunk].unsqueeze(1)).exp_()                     # softmax, this chunk
                local, inside = _in_chunk(targets[t0:t0 + chunk], start, rows.shape[0])
                probs.scatter_add_(1, local.unsqueeze(1), -inside.unsqueeze(1).float())  # minus the one-hot
                g = probs.mul_(weights[t0:t0 + chunk].unsqueeze(1)).to(rows.dtype)
                if grad_hidden is not None:
                    grad_hidden[t0:t0 + chunk].addmm_(g, rows)
                if grad_rows is not None:
                    grad_rows.addmm_(g.t(), h)
                del probs, g, local, inside
            if grad_rows is not None:
                source.add_grad(start, grad_rows)
            del rows, grad_rows
        if wants_grad:
            source.grad_done()
        return grad_hidden, None, None, None, None


def streamed_cross_entropy(source: VocabRows, hidden: torch.Tensor, weight: torch.Tensor,
                           targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of ``hidden @ weight^T`` against ``targets``, the weight streamed from ``source``."""
    flat = hidden.flatten(0, -2)
    chunk = auto_chunk_size(flat.shape[0], source.d_model, source.rows)  # chunked_ce's rule, rows for vocab
    return _StreamedLinearCrossEntropy.apply(flat, weight, targets.flatten(), source, chunk)


def logits_forward(source: VocabRows) -> Any:
    """A forward for the head that computes its logits a chunk of vocabulary rows at a time (no gradient: the
    training loss goes through ``streamed_cross_entropy``)."""
    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and hidden.requires_grad:
            raise RuntimeError("offload_states streams the output head's weight: logits with a gradient go through "
                               "the chunked loss (chunked_ce)")
        out = torch.empty((*hidden.shape[:-1], source.vocab), dtype=hidden.dtype, device=hidden.device)
        for start in source.starts():
            rows = source.load(start)
            out[..., start:start + rows.shape[0]] = F.linear(hidden, rows)
            del rows
        return out
    return forward
