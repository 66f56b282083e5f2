"""Structured pruning that really shrinks tensors: the weakest FFN channels and attention heads go.

Smaller Linear layers are rebuilt from the kept rows/columns. ``torch.nn.utils.prune`` is not offered:
it keeps a dense mask and the original beside the weight and *increases* memory (a 64 MiB Linear
becomes 192 MiB).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from memopt.adapters import AttentionProjections, ModelAdapter
from memopt.core.errors import StrategyError
from memopt.strategies import register
from memopt.strategies.base import Options, Strategy


def kept(n: int, fraction: float) -> int:
    """How many of ``n`` units survive pruning ``fraction`` of them (at least one)."""
    return max(1, n - round(n * fraction))


def _shrink(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new, smaller Linear holding the selected output rows / input columns of ``linear``."""
    w = linear.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach()[rows] if rows is not None else linear.bias.detach())
    return new


def _linear(model: nn.Module, name: str) -> nn.Linear:
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise StrategyError(f"prune: {name} is a {type(module).__name__}, not a Linear (prune before quant)")
    return module


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k).indices.sort().values


def prune_ffn(up: list[nn.Linear], down: nn.Linear, fraction: float) -> tuple[list[nn.Linear], nn.Linear]:
    """Keep the FFN channels with the largest weight norms (rows of ``up``, columns of ``down``)."""
    scores = sum(lin.weight.detach().float().norm(dim=1) for lin in up) + down.weight.detach().float().norm(dim=0)
    keep = _top(scores, kept(down.in_features, fraction))
    return [_shrink(lin, rows=keep) for lin in up], _shrink(down, cols=keep)


def prune_heads(attn: AttentionProjections, fraction: float) -> None:
    """Drop whole KV groups (a KV head and its query heads) with the smallest weight norms."""
    hd, groups, per = attn.head_dim, attn.n_kv_heads, attn.n_heads // attn.n_kv_heads

    def norms(t: torch.Tensor, dim: int, n: int) -> torch.Tensor:
        return t.detach().float().pow(2).sum(dim).view(n, -1).sum(1)

    scores = (norms(attn.q.weight, 1, groups) + norms(attn.k.weight, 1, groups) + norms(attn.v.weight, 1, groups)
              + norms(attn.o.weight, 0, groups))
    keep_groups = _top(scores, kept(groups, fraction))
    kv_rows = (keep_groups[:, None] * hd + torch.arange(hd, device=keep_groups.device)).flatten()
    q_rows = (keep_groups[:, None] * per * hd + torch.arange(per * hd, device=keep_groups.device)).flatten()
    attn.q, attn.o = _shrink(attn.q, rows=q_rows), _shrink(attn.o, cols=q_rows)
    attn.k, attn.v = _shrink(attn.k, rows=kv_rows), _shrink(attn.v, rows=kv_rows)
    attn.n_kv_heads = len(keep_groups)
    attn.n_heads = attn.n_kv_heads * per


class PruneOptions(Options):
    ffn: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of FFN channels to drop")
    heads: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of attention heads (KV groups) to drop")


@register
class Prune(Strategy[PruneOptions]):
    name = "prune"
    Options = PruneOptions
    summary = "structured pruning: drop the weakest FFN channels and attention heads, rebuild smaller Linears"
    saves = "params, grads and optimizer state of the dropped channels/heads (not torch.nn.utils.prune: " \
            "its dense masks add memory)"
    lossy = True
    order = 1
    needs_to_know = "feed-forward and attention layout"
    candidates = ({"ffn": 0.25}, {"ffn": 0.5})
    modes = ("train", "infer", "generate")

    def check(self) -> None:
        if self.options.ffn == 0 and self.options.heads == 0:
            raise StrategyError("prune: set ffn and/or heads to a fraction above 0, otherwise nothing is pruned")

    def apply(self, model: ModelAdapter) -> None:
        opts = self.options
        if opts.heads:
            for attn in model.attention_projections():
                prune_heads(attn, opts.heads)
        if opts.ffn:
            module = model.model
            for ffn in model.feed_forwards():
                ups, down = prune_ffn([_linear(module, name) for name in ffn.up], _linear(module, ffn.down),
                                      opts.ffn)
                for name, linear in zip((*ffn.up, ffn.down), (*ups, down)):
                    module.set_submodule(name, linear)
