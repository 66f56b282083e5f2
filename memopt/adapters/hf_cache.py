"""kv_quant for Hugging Face models: a transformers ``Cache`` whose layers keep memopt's quantized KV codes.

Each layer preallocates, on its first update, int8 codes (int4: two per byte) and a float16 absmax scale per token
and head for ``positions`` positions, exactly as memopt's own ``QuantizedCache`` does for its decoder, and hands
attention the dequantized keys and values of the positions seen so far. transformers is imported only here, when
such a cache is made.
"""

from __future__ import annotations

from typing import Any

import torch

from memopt.adapters import AdapterError
from memopt.model.kv_cache import SCALE_DTYPE, OnNew, dequantize, quantize


def sliding_layers(config: Any) -> bool:
    """Whether the model has sliding-window attention layers (which keep only their window of positions)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return any("sliding" in str(kind) for kind in layer_types)
    return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True)


def refuse_sliding(config: Any) -> None:
    if sliding_layers(config):
        raise AdapterError("kv_quant: this model has sliding-window attention layers; memopt's quantized cache keeps "
                           "every position (use transformers' static cache without kv_quant)")


def _storage(x: torch.Tensor, positions: int, bits: int, on_new: OnNew) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales for ``positions`` positions of tensors shaped like ``x`` (batch, heads, seq, head_dim)."""
    batch, heads, _, dim = x.shape
    if bits == 4 and dim % 2:
        raise AdapterError(f"kv_quant:bits=4 packs two codes per byte; head_dim {dim} is odd")
    codes = torch.zeros(batch, heads, positions, dim if bits == 8 else dim // 2,
                        dtype=torch.int8 if bits == 8 else torch.uint8, device=x.device)
    scale = torch.zeros(batch, heads, positions, 1, dtype=SCALE_DTYPE, device=x.device)
    on_new(codes)
    on_new(scale)
    return codes, scale


def quantized_cache(config: Any, positions: int, bits: int, on_new: OnNew) -> Any:
    """A transformers Cache of ``config.num_hidden_layers`` quantized layers for ``positions`` positions."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    refuse_sliding(config)

    class QuantizedLayer(CacheLayerMixin):
        """Codes and scales for ``positions`` positions; attention gets the dequantized ones seen so far."""

        def __init__(self) -> None:
            super().__init__()
            self.length = 0
            self.stored: list[tuple[torch.Tensor, torch.Tensor]] = []

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.stored = [_storage(x, positions, bits, on_new) for x in (key_states, value_states)]
            self.device = key_states.device
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            out = []
            for (codes, scale), x in zip(self.stored, (key_states, value_states)):
                codes[:, :, self.length:end], scale[:, :, self.length:end] = quantize(x, bits)
                out.append(dequantize(codes[:, :, :end], scale[:, :, :end], bits, x.dtype))
            self.length = end
            return out[0], out[1]

        def get_mask_sizes(self, query_length: Any) -> tuple[int, int]:
            n = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
            return self.length + n, 0

        def get_seq_length(self) -> int:
            return self.length

        def get_max_length(self) -> int:
            return positions

        def reset(self) -> None:
            self.length = 0

    return Cache(layers=[QuantizedLayer() for _ in range(config.num_hidden_layers)])
