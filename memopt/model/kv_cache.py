"""KV caches for memopt's decoder: each layer's keys and values of the positions seen so far.

Every cache takes a layer's new keys/values (b, kv_heads, s, head_dim), already rotated, and returns what
that layer attends to, in position order, with the position of its first entry:

- ``StaticCache``: preallocated for every position of the longest sequence; new entries are written in place.
- ``DynamicCache``: grows by concatenation each step (as Hugging Face's DynamicCache does): for a moment the
  layer's old and grown tensors are both alive, which is what growth costs at the peak.
- ``QuantizedCache`` (kv_quant): preallocated int8 codes, or int4 codes packed two to a byte, with one float16
  scale per token and head (symmetric absmax); a layer's keys/values are dequantized when it attends.
- ``WindowCache`` (kv_window): the last W positions in a preallocated ring; older positions are dropped.

``on_new`` is told of every tensor the cache allocates to hold keys/values (the tracker's kv_cache category).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from memopt.model.kv_plan import KvPlan

Layout = Sequence[tuple[int, int]]  # per layer: (kv_heads, head_dim)
OnNew = Callable[[torch.Tensor], None]
SCALE_DTYPE = torch.float16


class KVCache:
    """The base: ``length`` positions seen so far; ``update`` per layer, ``advance`` once all layers saw a step."""

    def __init__(self, on_new: OnNew | None = None):
        self.length = 0
        self._on_new = on_new or (lambda _t: None)

    def _new(self, t: torch.Tensor) -> torch.Tensor:
        self._on_new(t)
        return t

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Store this step's keys/values; return the keys and values to attend to and the first one's position."""
        raise NotImplementedError

    def advance(self, n: int) -> None:
        self.length += n

    def skip_to(self, length: int) -> None:
        """Stand for a cache that has seen ``length`` positions (estimates trace only the first and last steps)."""
        self.length = length

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError


class StaticCache(KVCache):
    def __init__(self, layout: Layout, batch: int, positions: int, dtype: torch.dtype, device: str | torch.device,
                 on_new: OnNew | None = None):
        super().__init__(on_new)
        self.k = [self._new(torch.zeros(batch, h, positions, d, dtype=dtype, device=device)) for h, d in layout]
        self.v = [self._new(torch.zeros(batch, h, positions, d, dtype=dtype, device=device)) for h, d in layout]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        end = self.length + k.shape[-2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], 0

    def tensors(self) -> list[torch.Tensor]:
        return [*self.k, *self.v]


class DynamicCache(KVCache):
    def __init__(self, layout: Layout, on_new: OnNew | None = None):
        super().__init__(on_new)
        self.k: list[torch.Tensor | None] = [None] * len(layout)
        self.v: list[torch.Tensor | None] = [None] * len(layout)

    def _grow(self, old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        return self._new(new.clone() if old is None else torch.cat([old, new], dim=-2))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        self.k[layer] = grown_k = self._grow(self.k[layer], k)
        self.v[layer] = grown_v = self._grow(self.v[layer], v)
        return grown_k, grown_v, 0

    def skip_to(self, length: int) -> None:
        for cache in (self.k, self.v):
            for i, t in enumerate(cache):
                if t is not None and t.shape[-2] < length:
                    cache[i] = self._new(t.new_empty(*t.shape[:-2], length, t.shape[-1]))
        super().skip_to(length)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (*self.k, *self.v) if t is not None]


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., d) -> symmetric absmax codes (int8; int4 packed two per uint8 along d) and a float16 scale per row."""
    qmax = 127 if bits == 8 else 7
    scale = (x.detach().abs().amax(-1, keepdim=True).float() / qmax).clamp_min(1e-8)
    codes = (x.float() / scale).round_().clamp_(-qmax, qmax).to(torch.int8)
    if bits == 4:
        unsigned = (codes + 8).to(torch.uint8)
        codes = unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)
    return codes, scale.to(SCALE_DTYPE)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    if bits == 4:
        low = (codes & 0x0F).to(torch.int8) - 8
        high = (codes >> 4).to(torch.int8) - 8
        codes = torch.stack((low, high), dim=-1).flatten(-2)
    return (codes.to(dtype) * scale.to(dtype))


class QuantizedCache(KVCache):
    def __init__(self, layout: Layout, batch: int, positions: int, bits: int, dtype: torch.dtype,
                 device: str | torch.device, on_new: OnNew | None = None):
        super().__init__(on_new)
        self.bits, self.dtype = bits, dtype
        code_dtype = torch.int8 if bits == 8 else torch.uint8

        def store(h: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
            width = d if bits == 8 else d // 2
            return (self._new(torch.zeros(batch, h, positions, width, dtype=code_dtype, device=device)),
                    self._new(torch.zeros(batch, h, positions, 1, dtype=SCALE_DTYPE, device=device)))

        self.k = [store(h, d) for h, d in layout]
        self.v = [store(h, d) for h, d in layout]

    def _put(self, slot: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        codes, scale = slot
        end = self.length + x.shape[-2]
        codes[:, :, self.length:end], scale[:, :, self.length:end] = quantize(x, self.bits)
        return dequantize(codes[:, :, :end], scale[:, :, :end], self.bits, self.dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self._put(self.k[layer], k), self._put(self.v[layer], v), 0

    def tensors(self) -> list[torch.Tensor]:
        return [t for pair in (*self.k, *self.v) for t in pair]


class WindowCache(KVCache):
    """The last ``window`` positions; position p lives in slot p % window."""

    def __init__(self, layout: Layout, batch: int, window: int, dtype: torch.dtype, device: str | torch.device,
                 on_new: OnNew | None = None):
        super().__init__(on_new)
        self.window = window
        self.k = [self._new(torch.zeros(batch, h, window, d, dtype=dtype, device=device)) for h, d in layout]
        self.v = [self._new(torch.zeros(batch, h, window, d, dtype=dtype, device=device)) for h, d in layout]

    def _ordered(self, ring: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The kept positions in position order, and the first one's position."""
        if self.length <= self.window:
            return ring[:, :, :self.length], 0
        start = self.length % self.window
        return torch.cat([ring[:, :, start:], ring[:, :, :start]], dim=-2), self.length - self.window

    def _store(self, ring: torch.Tensor, x: torch.Tensor) -> None:
        """Write positions length .. length+s-1 (the last ``window`` of them) into their slots."""
        s = x.shape[-2]
        first = max(self.length, self.length + s - self.window)
        slots = torch.arange(first, self.length + s, device=ring.device) % self.window
        ring.index_copy_(2, slots, x[:, :, first - self.length:])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        s = k.shape[-2]
        if s == 1 and self.length >= self.window - 1:  # decode with a full ring: order does not matter, no mask
            self._store(self.k[layer], k)
            self._store(self.v[layer], v)
            return self.k[layer], self.v[layer], self.length + 1 - self.window
        out = []
        for ring, x in ((self.k[layer], k), (self.v[layer], v)):
            kept, first = self._ordered(ring)
            out.append(torch.cat([kept, x], dim=-2) if kept.shape[-2] else x)
            self._store(ring, x)
        return out[0], out[1], first

    def tensors(self) -> list[torch.Tensor]:
        return [*self.k, *self.v]


def build_cache(plan: KvPlan, layout: Layout, batch: int, positions: int, dtype: torch.dtype,
                device: str | torch.device, on_new: OnNew | None = None) -> KVCache:
    """The cache ``plan`` names, for a model whose layers have ``layout``, holding up to ``positions``."""
    if plan.layout == "dynamic":
        return DynamicCache(layout, on_new)
    if plan.layout == "quant":
        return QuantizedCache(layout, batch, positions, plan.bits, dtype, device, on_new)
    if plan.layout == "window":
        return WindowCache(layout, batch, min(plan.window, positions), dtype, device, on_new)
    return StaticCache(layout, batch, positions, dtype, device, on_new)
