"""kv_window: keep the keys and values of the last W positions only (a sliding window over the cache)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from memopt.core.errors import StrategyError
from memopt.model.kv_plan import KvPlan
from memopt.spec import Spec
from memopt.strategies import register
from memopt.strategies.base import Options, StepPlan, Strategy


class KvWindowOptions(Options):
    window: int = Field(1024, gt=0, le=2**20, description="positions kept: each token attends to at most these "
                        "cached positions (plus the tokens of its own step)")


@register
class KvWindow(Strategy[KvWindowOptions]):
    name = "kv_window"
    Options = KvWindowOptions
    summary = ("sliding-window KV cache: a preallocated ring of the last W positions; older ones are dropped "
               "(memopt's decoder)")
    saves = "kv_cache: W instead of prompt_len + new_tokens positions; attention over at most W cached keys"
    lossy = True
    order = 20
    modes = ("generate",)
    candidates = ({"window": 4096}, {"window": 1024}, {"window": 256})

    @classmethod
    def idle_at(cls, options: Any, spec: Spec) -> bool:
        """A window that holds every position drops nothing: it is a static cache."""
        return bool(options.window >= spec.generate.positions)

    def check(self) -> None:
        if self.spec.model.kind != "builtin":
            raise StrategyError("kv_window: memopt's windowed cache works on memopt's decoder; a Hugging Face model "
                                "with a sliding window (Mistral) has its own in transformers' cache")
        if self.spec.generate.cache == "dynamic":
            raise StrategyError("kv_window: the window is a preallocated ring; it needs generate.cache: static")
        if self.idle_at(self.options, self.spec):
            raise StrategyError(f"kv_window.window: {self.options.window} keeps every one of the "
                                f"{self.spec.generate.positions} positions, so nothing is dropped; make it smaller")

    def configure(self, plan: StepPlan) -> None:
        plan.kv = KvPlan("window", window=self.options.window)

    def report(self) -> dict[str, Any]:
        return {"window": self.options.window}
