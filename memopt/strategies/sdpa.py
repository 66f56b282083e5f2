"""Memory-efficient attention: F.scaled_dot_product_attention instead of materialising the s*s scores."""

from __future__ import annotations

from memopt.adapters import ModelAdapter
from memopt.core.errors import StrategyError
from memopt.strategies import register
from memopt.strategies.base import Options, StepPlan, Strategy


class SdpaOptions(Options):
    pass


@register
class Sdpa(Strategy[SdpaOptions]):
    name = "sdpa"
    Options = SdpaOptions
    summary = "eager attention (softmax(QK^T) materialised) -> F.scaled_dot_product_attention"
    saves = "the b x heads x s x s score tensors: O(s^2) -> O(s) attention memory"
    order = 10
    needs_to_know = "attention kernel"
    modes = ("train", "infer", "generate")

    def check(self) -> None:
        if self.spec.model.attention == "sdpa":  # the built-in and Hugging Face models say so in the spec
            raise StrategyError("sdpa: model.attention is already sdpa, so this strategy would change nothing "
                                "(set model.attention: eager to compare)")

    def apply(self, model: ModelAdapter) -> None:
        model.use_attention("sdpa")

    def configure(self, plan: StepPlan) -> None:
        if self.spec.model.dropout > 0:
            plan.notes.append("sdpa: attention dropout > 0 keeps SDPA off its flash kernel on CPU (math kernel, "
                              "s^2 scores materialised); set model.dropout: 0 for the O(s) path")
