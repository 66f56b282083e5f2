"""Gradient accumulation: the same global batch as k micro-batches."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from memopt.core.errors import StrategyError
from memopt.strategies import register
from memopt.strategies.base import Options, StepPlan, Strategy


class AccumOptions(Options):
    micro_batches: int = Field(2, ge=1, le=4096)


@register
class Accum(Strategy[AccumOptions]):
    name = "accum"
    Options = AccumOptions
    summary = "split the batch into k micro-batches and accumulate gradients"
    saves = "activations scale with the micro-batch: ~1/k of the baseline's"
    order = 60
    candidates = ({"micro_batches": 2}, {"micro_batches": 4}, {"micro_batches": 8})

    @classmethod
    def micro_batches(cls, options: Any) -> int:
        return int(options.micro_batches)

    def check(self) -> None:
        k = self.options.micro_batches
        if self.spec.train.batch_size % k:
            raise StrategyError(f"accum.micro_batches: {k} does not divide train.batch_size "
                                f"{self.spec.train.batch_size}")

    def configure(self, plan: StepPlan) -> None:
        plan.micro_batches = self.options.micro_batches
