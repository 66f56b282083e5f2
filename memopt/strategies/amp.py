"""Mixed precision: autocast to bf16 or fp16 around forward and backward; fp32 master weights stay."""

from __future__ import annotations

from typing import Literal

import torch

from memopt.core.errors import StrategyError
from memopt.strategies import register
from memopt.strategies.base import Options, StepPlan, Strategy

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class AmpOptions(Options):
    dtype: Literal["bf16", "fp16"] = "bf16"


@register
class Amp(Strategy[AmpOptions]):
    name = "amp"
    Options = AmpOptions
    summary = "autocast matmuls to bf16/fp16 (fp32 master weights, fp16 without loss scaling)"
    saves = "activations saved by matmuls halve; a low-precision copy of each weight is cached per step"
    lossy = True  # 16-bit matmuls change the numbers: the report shows the drift
    order = 40
    candidates = ({"dtype": "bf16"},)

    def check(self) -> None:
        if self.spec.run.dtype != "float32":
            raise StrategyError(f"amp: needs fp32 master weights but run.dtype is {self.spec.run.dtype}; "
                                "pure low-precision training is run.dtype alone")

    def configure(self, plan: StepPlan) -> None:
        dtype = AMP_DTYPES[self.options.dtype]
        plan.contexts.append(lambda: torch.autocast(self.device, dtype=dtype))
