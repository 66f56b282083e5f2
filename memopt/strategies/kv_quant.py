"""kv_quant: the KV cache stored as int8, or int4 packed two to a byte, with a float16 scale per token and head."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from memopt.core.errors import StrategyError
from memopt.model.kv_plan import KvPlan
from memopt.strategies import register
from memopt.strategies.base import Options, StepPlan, Strategy


class KvQuantOptions(Options):
    bits: Literal[8, 4] = Field(8, description="8: int8 codes; 4: int4 codes packed two per byte")


@register
class KvQuant(Strategy[KvQuantOptions]):
    name = "kv_quant"
    Options = KvQuantOptions
    summary = "KV cache as int8 / packed int4 with a float16 absmax scale per token and head"
    saves = "kv_cache: ~2x (int8) or ~4x (int4) smaller than 16-bit keys/values, scales included"
    lossy = True
    order = 20
    modes = ("generate",)
    refuses = {"kv_window": "kv_window keeps its own float ring of the last W positions"}
    candidates = ({"bits": 8}, {"bits": 4})

    def check(self) -> None:
        if self.spec.model.kind not in ("builtin", "hf"):
            raise StrategyError("kv_quant: memopt's quantized cache works on memopt's decoder and Hugging Face causal "
                                "LMs; a Python factory's model keeps its own cache")
        if self.spec.generate.cache == "dynamic":
            raise StrategyError("kv_quant: the quantized cache is preallocated; it needs generate.cache: static")

    def configure(self, plan: StepPlan) -> None:
        plan.kv = KvPlan("quant", bits=self.options.bits)

    def report(self) -> dict[str, Any]:
        return {"bits": self.options.bits}
