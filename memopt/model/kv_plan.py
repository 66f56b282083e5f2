"""Which KV cache a generation uses: a plain value (no torch), so that the strategies' step plan can hold it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KvPlan:
    """Which KV cache a generation uses: the spec's layout (static/dynamic), or what a kv strategy made it."""

    layout: str = "static"       # static | dynamic | quant | window
    bits: int = 8                # quant
    window: int = 0              # window
