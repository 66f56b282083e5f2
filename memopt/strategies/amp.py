"""Mixed precision: autocast to bf16 or fp16 around forward and backward; fp32 master weights stay."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import field_validator

from memopt.core._torch_private import in_fake_mode
from memopt.core.errors import StrategyError
from memopt.strategies import register
from memopt.strategies.base import Options, StepPlan, Strategy

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class AmpOptions(Options):
    dtype: Literal["bf16", "fp16"] = "bf16"

    @field_validator("dtype", mode="before")
    @classmethod
    def _spelled(cls, value: Any) -> Any:
        """bfloat16, float16 and half as users write them."""
        aliases = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
        return aliases.get(value.strip().lower(), value.strip().lower()) if isinstance(value, str) else value


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
        # an estimate traces on the CPU whatever the device (autocast for a CUDA this build may lack is disabled)
        plan.contexts.append(lambda: torch.autocast("cpu" if in_fake_mode() else self.device, dtype=dtype))
