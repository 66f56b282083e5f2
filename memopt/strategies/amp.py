"""Mixed precision: autocast to bf16 or fp16 around forward and backward; fp32 master weights stay."""

from __future__ import annotations

import re
from typing import Literal

import torch

from memopt._torch_private import saved_tensors_by_node
from memopt.errors import StrategyError
from memopt.spec import Spec
from memopt.strategies import register
from memopt.strategies.base import Options, StepPlan, Strategy

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Autograd nodes of the ops autocast runs in 16 bits on CPU and CUDA (matmuls, convolutions, attention).
SIXTEEN_BIT_NODES = re.compile(r"(Mm|Addmm|Bmm|Baddbmm|Addbmm|Convolution|ScaledDotProduct\w*)Backward\d+")


def expected_saving(spec: Spec) -> int:
    """Bytes of saved activations amp should save on ``spec`` (run without amp, in float32).

    From one forward's autograd graph: every non-parameter tensor a 16-bit op saves for backward is
    stored in half the bytes under autocast; every parameter such an op saves costs a cached 16-bit copy.
    Ops outside autocast's 16-bit list are counted as unchanged, so where their inputs are 16-bit
    matmul outputs (SwiGLU's SiLU, say) the real saving is larger: this is a lower bound there.
    The rule is CPU autocast's; on CUDA softmax runs in fp32, which it does not model.
    """
    from memopt.runner import make_batch, prepare  # the runner imports the strategies

    session = prepare(spec)
    tokens, targets = make_batch(spec, session.device)
    loss = session.model(tokens, targets)
    params = {p.untyped_storage()._cdata for p in session.model.parameters()}
    halved: dict[int, int] = {}
    copies: dict[int, int] = {}
    for node, tensor in saved_tensors_by_node(loss):
        if SIXTEEN_BIT_NODES.fullmatch(node) and tensor.dtype == torch.float32:
            storage = tensor.untyped_storage()
            (copies if storage._cdata in params else halved)[storage._cdata] = storage.nbytes() // 2
    return sum(halved.values()) - sum(copies.values())


class AmpOptions(Options):
    dtype: Literal["bf16", "fp16"] = "bf16"


@register
class Amp(Strategy):
    name = "amp"
    Options = AmpOptions
    summary = "autocast matmuls to bf16/fp16 (fp32 master weights, fp16 without loss scaling)"
    saves = "activations saved by matmuls halve; a low-precision copy of each weight is cached per step"
    lossy = True  # 16-bit matmuls change the numbers: the report shows the drift
    order = 40
    candidates = ("amp:dtype=bf16",)

    def check(self, device: str) -> None:
        if self.spec.run.dtype != "float32":
            raise StrategyError(f"amp: needs fp32 master weights but run.dtype is {self.spec.run.dtype}; "
                                "pure low-precision training is run.dtype alone")
        self.device = device

    def configure(self, plan: StepPlan) -> None:
        dtype = AMP_DTYPES[self.options.dtype]  # type: ignore[attr-defined]
        plan.contexts.append(lambda: torch.autocast(self.device, dtype=dtype))
