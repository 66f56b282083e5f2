"""AdamW with block-wise 8-bit optimizer states (after Dettmers et al. 2021, on plain PyTorch tensors).

Both moments are stored as one byte per element plus one float32 absmax per block of 256 and are
dequantized per parameter inside the step. The codes are companded (a square-root map) so that small
moments keep relative precision: m = absmax * sign * (q/127)^2, v = absmax * (q/255)^4.
State: ~2.03 bytes per parameter instead of AdamW's 8.

``backend: bitsandbytes`` uses ``bnb.optim.AdamW8bit`` instead (the same defaults: betas, eps, weight decay
0.01): its dynamic 8-bit code (a 256-entry map per moment, shared by all parameters), blocks of 256 with a
float32 absmax each, and, as bitsandbytes does by default, 32-bit moments for tensors under 4096 elements.
Its state is ordinary tensors in ``optimizer.state`` (counted as optimizer memory) and its update runs on
fake tensors too, so it is estimated as well as profiled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field

from memopt.adapters import ModelAdapter
from memopt.core._torch_private import in_fake_mode
from memopt.core.errors import StrategyError
from memopt.strategies import register
from memopt.strategies.base import Strategy
from memopt.strategies.quant import BackendOptions, require

BLOCK = 256


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """Flat view padded to whole blocks: (n_blocks, BLOCK)."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % BLOCK
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)


def encode(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Float tensor -> (uint8/int8 codes of the same numel, float32 absmax per block)."""
    blocks = _blocks(x.float())
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    unit = blocks / absmax                                                     # in [-1, 1]
    if signed:
        codes = (unit.sign() * unit.abs().sqrt() * 127).round().to(torch.int8)
    else:
        codes = (unit.clamp_min(0).pow(0.25) * 255).round().to(torch.uint8)
    return codes.view(-1)[: x.numel()].clone(), absmax.view(-1)


def decode(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, like: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(codes.float())
    if signed:
        unit = blocks / 127
        unit = unit.sign() * unit.square()
    else:
        unit = (blocks / 255).pow(4)
    return (unit * absmax[:, None]).view(-1)[: like.numel()].view_as(like).to(like.dtype)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose exp_avg / exp_avg_sq live in 8 bits between steps."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0  # a Python int: no tensor, and no .item() under fake tensors
                    zeros = torch.zeros_like(p, dtype=torch.float32)
                    state["m_codes"], state["m_absmax"] = encode(zeros, signed=True)
                    state["v_codes"], state["v_absmax"] = encode(zeros, signed=False)
                state["step"] += 1
                t = state["step"]
                g = p.grad.float()
                m = decode(state["m_codes"], state["m_absmax"], True, g).mul_(b1).add_(g, alpha=1 - b1)
                v = decode(state["v_codes"], state["v_absmax"], False, g).mul_(b2).addcmul_(g, g, value=1 - b2)
                update = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_().add_(group["eps"]))
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update.to(p.dtype), alpha=-group["lr"])
                state["m_codes"], state["m_absmax"] = encode(m, signed=True)
                state["v_codes"], state["v_absmax"] = encode(v, signed=False)
        return loss


def bnb_adamw8bit(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit over ``params``. On fake tensors its two 256-entry quantization maps, which it
    computes with Python floats (impossible on fake tensors), are plain tensors of the same shape: the update
    reads them but only shapes and dtypes matter there."""
    bnb = require("bitsandbytes", "optim8bit.backend bitsandbytes")

    def fill_qmap(self: Any) -> None:
        if not in_fake_mode():
            bnb.optim.AdamW8bit.fill_qmap(self)
            return
        self.name2qmap["dynamic"] = torch.zeros(256, dtype=torch.float32)
        self.name2qmap["udynamic"] = torch.zeros(256, dtype=torch.float32)

    cls = type("FakeSafeAdamW8bit", (bnb.optim.AdamW8bit,), {"fill_qmap": fill_qmap})
    optimizer: torch.optim.Optimizer = cls(params, lr=lr)
    return optimizer


class Optim8bitOptions(BackendOptions):
    lr: float | None = Field(None, gt=0, description="default: train.lr")
    backend: Literal["memopt", "bitsandbytes"] = Field("memopt", description=(
        "memopt: memopt's AdamW8bit; bitsandbytes: bnb.optim.AdamW8bit (pip install 'memopt[hf]')"))


@register
class Optim8bit(Strategy[Optim8bitOptions]):
    name = "optim8bit"
    Options = Optim8bitOptions
    summary = ("AdamW with block-wise 8-bit states (block 256, absmax per block), dequantized in the step; "
               "memopt's or bitsandbytes' AdamW8bit (backend)")
    saves = "Adam states 8 -> ~2.03 bytes per trainable parameter"
    lossy = True
    drift_shows_in_training = True
    order = 65
    refuses = {"optim_in_bwd": "both replace the optimizer; an 8-bit optimizer per parameter is not supported yet"}

    def check(self) -> None:
        if self.spec.train.optimizer != "adamw":
            raise StrategyError(f"optim8bit: replaces AdamW, but train.optimizer is {self.spec.train.optimizer}")
        if self.options.backend == "bitsandbytes":
            require("bitsandbytes", "optim8bit.backend bitsandbytes")

    def attach_optimizer(self, model: ModelAdapter, make_optimizer: Callable[..., Any]) -> Any:
        params = [p for p in model.model.parameters() if p.requires_grad]
        if not params:
            return None
        lr = self.options.lr or self.spec.train.lr
        return bnb_adamw8bit(params, lr) if self.options.backend == "bitsandbytes" else AdamW8bit(params, lr=lr)
