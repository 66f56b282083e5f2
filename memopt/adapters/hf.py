"""The adapter of a Hugging Face causal LM (``*ForCausalLM``: Llama, Mistral, Qwen2, Gemma, GPT-2, ...).

The objective is what transformers computes for ``labels``: the base model's last hidden states, the output
head, logits upcast to float32 (soft-capped where the config says), cross-entropy; split at the hidden states
so that a chunked loss can replace the second half. GPT-2's ``Conv1D`` layers (a Linear with its weight
transposed) become ``nn.Linear``s holding the same weights when a strategy asks for the Linears.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
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
from memopt.adapters.hf_cache import quantized_cache
from memopt.adapters.module import ModuleAdapter
from memopt.core._torch_private import is_fake
from memopt.model.hf import unpacked_positions
from memopt.model.kv_cache import KvPlan, OnNew

FFN_NAMES = ((("gate_proj", "up_proj"), "down_proj"), (("c_fc",), "c_proj"), (("fc1",), "fc2"),
             (("up_proj",), "down_proj"))


class CausalLmLoss(nn.Module):
    """transformers' causal-LM loss from the hidden states: head, float32 logits (soft-capped), cross-entropy."""

    def __init__(self, softcap: float | None = None):
        super().__init__()
        self.softcap = softcap

    def forward(self, hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


class _Projections:
    """One HF attention module's q/k/v/o Linears as AttentionProjections (setting one replaces it)."""

    NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}

    def __init__(self, attn: nn.Module, n_heads: int, n_kv_heads: int, head_dim: int):
        self.__dict__["_attn"] = attn
        self.__dict__.update(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._attn, self.NAMES[name])

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.NAMES:
            setattr(self._attn, self.NAMES[name], value)
        else:
            self.__dict__[name] = value


def as_root_forward(model: nn.Module, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()`` run as ``model``'s forward: the hooks on ``model`` run around it."""
    model.forward = compute  # the instance's attribute, in front of the class's forward for this one call
    try:
        return model()
    finally:
        del model.forward


def _conv1d_to_linear(conv: Any) -> nn.Linear:
    """transformers' Conv1D (y = x W + b, W: in x out) as an nn.Linear with the same numbers."""
    n_in, n_out = conv.weight.shape
    linear = nn.Linear(n_in, n_out, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    linear.weight.requires_grad_(conv.weight.requires_grad)
    linear.bias.requires_grad_(conv.bias.requires_grad)
    return linear


def _reporting_growth(layer: Any, on_new: OnNew) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """DynamicLayer.update (concatenate, then let the old tensor go) that reports each grown tensor while the old
    one is still alive: the moment growth costs both."""
    def update(key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        keys = torch.cat([layer.keys, key_states], dim=-2)
        on_new(keys)
        layer.keys = keys
        values = torch.cat([layer.values, value_states], dim=-2)
        on_new(values)
        layer.values = values
        return keys, values
    return update


class HfAdapter(ModuleAdapter):
    """``ModelAdapter`` for a transformers ``PreTrainedModel`` with a causal-LM head."""

    _through_root = False

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.config: Any = model.config
        self.model.loss_head = CausalLmLoss(getattr(self.config, "final_logit_softcapping", None))

    def _inner(self, block: nn.Module) -> nn.Module:
        return getattr(block, "inner", block)  # a checkpointed block's original

    def linears(self, keep: LinearFilter | None = None) -> dict[str, nn.Linear]:
        prefix = self._blocks()[0] + "."
        convs = [name for name, m in self.model.named_modules()
                 if name.startswith(prefix) and type(m).__name__ == "Conv1D" and hasattr(m, "nf")]
        for name in convs:
            self.model.set_submodule(name, _conv1d_to_linear(self.model.get_submodule(name)))
        return super().linears(keep)

    def attention_kind(self) -> str:
        return str(self.config._attn_implementation)

    def use_attention(self, kind: str) -> None:
        if kind == "sdpa" and not getattr(self.model, "_supports_sdpa", True):  # transformers would raise ValueError
            raise AdapterError(f"sdpa: transformers has no sdpa attention for {type(self.model).__name__}")
        self.model.set_attn_implementation(kind)  # type: ignore[operator]

    def attention_projections(self) -> list[AttentionProjections]:
        c = self.config
        heads = c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        out = []
        for block in self.blocks():
            attn = getattr(self._inner(block), "self_attn", None) or getattr(self._inner(block), "attn", None)
            names = _Projections.NAMES.values()
            if attn is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in names):
                raise AdapterError(f"{type(attn).__name__} has no separate q_proj/k_proj/v_proj/o_proj Linears "
                                   "(e.g. GPT-2 packs them in c_attn)")
            out.append(_Projections(attn, heads, kv, head_dim))
        return out  # type: ignore[return-value]

    def feed_forwards(self) -> list[FeedForward]:
        self.linears()  # Conv1D -> Linear first
        names = {id(m): name for name, m in self.model.named_modules()}
        out = []
        for block in self.blocks():
            mlp = getattr(self._inner(block), "mlp", None)
            found = next(((ups, down) for ups, down in FFN_NAMES if mlp is not None
                          and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in (*ups, down))), None)
            if mlp is None or found is None:
                raise AdapterError(f"{type(self._inner(block)).__name__}'s feed-forward is not gate/up/down or "
                                   "fc/proj Linears")
            prefix = names[id(mlp)] + "."
            out.append(FeedForward(tuple(prefix + u for u in found[0]), prefix + found[1]))
        return out

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        base = self.model.base_model
        with unpacked_positions() if is_fake(batch[0]) else contextlib.nullcontext():
            return base(input_ids=batch[0], use_cache=False).last_hidden_state  # type: ignore[operator]

    def loss_from_hidden(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        head = self.head()
        if head is None:
            raise AdapterError(f"{type(self.model).__name__} has no Linear output head")
        return self.model.loss_head(hidden, head[1], batch[1])  # type: ignore[operator]

    def replace_loss(self, loss: LossFromHidden, name: str = "loss_head") -> None:
        if getattr(self.config, "final_logit_softcapping", None):
            raise AdapterError(f"{type(self.model).__name__} soft-caps its logits (final_logit_softcapping), which "
                               "the chunked loss does not")
        self.model.loss_head = loss if isinstance(loss, nn.Module) else LossModule(loss)

    def loss(self, batch: Batch) -> torch.Tensor:
        if self._through_root:
            return as_root_forward(self.model, lambda: self.loss_from_hidden(self.hidden_states(batch), batch))
        return self.loss_from_hidden(self.hidden_states(batch), batch)

    def loss_through_root(self) -> None:
        """The loss is the base model plus memopt's loss head, not the root's own forward: run it as the root's
        forward from now on."""
        self._through_root = True

    def logits(self, batch: Batch) -> torch.Tensor:
        head = self.head()
        assert head is not None
        return head[1](self.hidden_states(batch))

    def make_cache(self, plan: KvPlan, batch: int, positions: int, on_new: OnNew) -> Any:
        """transformers' own StaticCache or DynamicCache, its layers' tensors reported after each update."""
        from transformers import DynamicCache, StaticCache
        from transformers.cache_utils import DynamicLayer

        if plan.layout == "quant":
            quantized: Any = quantized_cache(self.config, positions, plan.bits, on_new)
            quantized._memopt_on_new = on_new
            return quantized
        if plan.layout not in ("static", "dynamic"):
            raise AdapterError(f"the {plan.layout} KV cache is memopt's own (kv_window) and works on memopt's "
                               "decoder; a Hugging Face model generates with transformers' static or dynamic cache")
        cache: Any = (StaticCache(config=self.config, max_cache_len=positions) if plan.layout == "static"
                      else DynamicCache(config=self.config))
        update = cache.update

        def reporting_update(key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
                             **kwargs: Any) -> Any:
            out = update(key_states, value_states, layer_idx, *args, **kwargs)
            layer: Any = cache.layers[layer_idx]
            on_new(layer.keys)
            on_new(layer.values)
            return out

        cache.update = reporting_update
        cache._memopt_on_new = on_new
        for layer in cache.layers:
            if type(layer) is DynamicLayer:
                layer.update = _reporting_growth(layer, on_new)  # type: ignore[method-assign]
        return cache

    def next_logits(self, tokens: torch.Tensor, cache: Any | None, start: int) -> torch.Tensor:
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        with unpacked_positions() if is_fake(tokens) else contextlib.nullcontext():
            out = self.model(input_ids=tokens, use_cache=cache is not None, logits_to_keep=1,
                             cache_position=positions if cache is not None else None, **{cache_arg: cache})
        return out.logits[:, -1]

    def skip_cache_to(self, cache: Any, length: int) -> None:
        """A dynamic cache grown to ``length`` positions (a static one is indexed by position already)."""
        from transformers.cache_utils import DynamicLayer

        on_new = cache._memopt_on_new
        for layer in cache.layers:  # a static layer is indexed by position, a sliding static one counts
            if hasattr(layer, "stored"):  # kv_quant's layer: preallocated, it counts its positions
                layer.length = length
                continue
            if hasattr(layer, "cumulative_length_int"):
                layer.cumulative_length_int = length
            keys = getattr(layer, "keys", None)
            if not isinstance(layer, DynamicLayer) or keys is None:
                continue
            window = getattr(layer, "sliding_window", None)  # a sliding layer keeps window - 1 positions
            target = min(length, window - 1) if window else length
            if keys.shape[-2] < target:
                values: Any = layer.values
                layer.keys = keys.new_empty(*keys.shape[:-2], target, keys.shape[-1])
                layer.values = values.new_empty(*values.shape[:-2], target, values.shape[-1])
                on_new(layer.keys)
                on_new(layer.values)
            if window:
                layer.cumulative_length = length
