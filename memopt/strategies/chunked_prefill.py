"""chunked_prefill: the prompt goes through the model C tokens at a time, each chunk attending to the cache."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from memopt.core.errors import StrategyError
from memopt.spec import Spec
from memopt.strategies import register
from memopt.strategies.base import Options, StepPlan, Strategy


class ChunkedPrefillOptions(Options):
    chunk: int = Field(512, gt=0, le=2**20, description="prompt tokens per prefill forward")


@register
class ChunkedPrefill(Strategy[ChunkedPrefillOptions]):
    name = "chunked_prefill"
    Options = ChunkedPrefillOptions
    summary = "prefill the prompt in chunks of C tokens, each attending to the cache (as vLLM's chunked prefill)"
    saves = "the prefill's working set: C instead of prompt_len tokens of activations, scores and FFN temporaries"
    order = 30
    modes = ("generate",)
    candidates = ({"chunk": 2048}, {"chunk": 512}, {"chunk": 128})

    @classmethod
    def idle_at(cls, options: Any, spec: Spec) -> bool:
        return bool(options.chunk >= spec.generate.prompt_len)  # the prompt in one chunk: an ordinary prefill

    def check(self) -> None:
        if self.idle_at(self.options, self.spec):
            raise StrategyError(f"chunked_prefill.chunk: {self.options.chunk} covers the whole prompt of "
                                f"{self.spec.generate.prompt_len} tokens, so nothing is chunked; make it smaller")

    def configure(self, plan: StepPlan) -> None:
        plan.prefill_chunk = self.options.chunk

    def report(self) -> dict[str, Any]:
        return {"chunk": self.options.chunk}
