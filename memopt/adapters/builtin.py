"""The adapter of memopt's own LanguageModel (encoder or decoder, memopt/model.py)."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from memopt.adapters import (
    AdapterError,
    AttentionProjections,
    Batch,
    FeedForward,
    LinearFilter,
    LossFromHidden,
    LossModule,
)
from memopt.model.kv_cache import KVCache, KvPlan, OnNew, build_cache
from memopt.model.transformer import DecoderLayer, EncoderLayer, LanguageModel


class BuiltinAdapter:
    """``ModelAdapter`` for ``memopt.model.transformer.LanguageModel``."""

    def __init__(self, model: nn.Module):
        assert isinstance(model, LanguageModel)
        self.model: nn.Module = model
        self.lm: LanguageModel = model

    def blocks(self) -> nn.ModuleList:
        return self.lm.layers

    def _layers(self) -> list[EncoderLayer | DecoderLayer]:
        """The blocks without wrappers (a checkpointed block's ``inner``)."""
        return [cast(EncoderLayer | DecoderLayer, getattr(layer, "inner", layer)) for layer in self.lm.layers]

    def _split_attention(self) -> None:
        for layer in self._layers():
            if isinstance(layer, EncoderLayer):
                layer.split_attention()

    def linears(self, keep: LinearFilter | None = None) -> dict[str, nn.Linear]:
        self._split_attention()
        return {name: module for name, module in self.model.named_modules()
                if name.startswith("layers.") and isinstance(module, nn.Linear)
                and (keep is None or keep(module, name))}

    def head(self) -> tuple[str, nn.Linear] | None:
        return "head", self.lm.head

    def embedding(self) -> tuple[str, nn.Embedding] | None:
        return "tok", self.lm.tok

    def tied_embeddings(self) -> bool:
        return self.lm.spec.tie_embeddings

    def attention_kind(self) -> str:
        return str(self._layers()[0].attention) if self.lm.layers else str(self.lm.spec.attention)

    def use_attention(self, kind: str) -> None:
        for layer in self._layers():
            layer.attention = kind

    def attention_projections(self) -> list[AttentionProjections]:
        self._split_attention()
        return [layer.self_attn if isinstance(layer, EncoderLayer) else layer.attn  # type: ignore[misc]
                for layer in self._layers()]

    def feed_forwards(self) -> list[FeedForward]:
        out = []
        for i, layer in enumerate(self._layers()):
            prefix = f"layers.{i}." + ("inner." if layer is not self.lm.layers[i] else "")
            if isinstance(layer, DecoderLayer):
                out.append(FeedForward((prefix + "ffn.w1", prefix + "ffn.w3"), prefix + "ffn.w2"))
            else:
                out.append(FeedForward((prefix + "linear1",), prefix + "linear2"))
        return out

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        return self.lm.hidden(batch[0])

    def loss_from_hidden(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.lm.loss_head(hidden, self.lm.head, batch[1])

    def replace_loss(self, loss: LossFromHidden, name: str = "loss_head") -> None:
        assert name == "loss_head", "memopt's model calls its loss module loss_head"
        self.lm.loss_head = LossModule(loss) if not isinstance(loss, nn.Module) else loss

    def loss(self, batch: Batch) -> torch.Tensor:
        return self.lm(*batch)

    def own_optimizer(self) -> None:
        """None: memopt makes the spec's optimizer."""
        return None

    def loss_through_root(self) -> None:
        """Nothing to do: ``loss`` calls the root module."""

    def logits(self, batch: Batch) -> torch.Tensor:
        return self.lm.logits(batch[0])

    def make_cache(self, plan: KvPlan, batch: int, positions: int, on_new: OnNew) -> KVCache:
        if self.lm.spec.arch != "decoder":
            raise AdapterError("generation needs a causal decoder; this model is an encoder")
        layers = self._layers()
        layout = [(layer.attn.n_kv_heads, layer.attn.head_dim) for layer in layers if isinstance(layer, DecoderLayer)]
        weight = self.lm.tok.weight
        return build_cache(plan, layout, batch, positions, weight.dtype, weight.device, on_new)

    def next_logits(self, tokens: torch.Tensor, cache: KVCache | None, start: int) -> torch.Tensor:
        assert cache is None or cache.length == start, (cache.length if cache else None, start)
        return self.lm.next_logits(tokens, cache)

    def skip_cache_to(self, cache: KVCache, length: int) -> None:
        cache.skip_to(length)
