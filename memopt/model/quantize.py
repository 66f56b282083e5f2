"""Weight-only group-wise quantization (int8, int4, nf4) and LoRA adapters, on plain PyTorch tensors.

LoRA is one set of pieces for every frozen base: ``lora_parameters`` (A kaiming-uniform as nn.Linear and peft
initialise it, B zeros) and ``lora_delta`` (x A^T B^T * alpha/rank), used by ``QuantLinear.add_lora`` (memopt's
packed weights) and by ``LoraLinear``, which wraps any other frozen linear map (an nn.Linear, a bitsandbytes layer).

Weights are stored packed (int4/nf4: two 4-bit codes per byte) with one scale per group of
``group_size`` inputs; a row the group size does not divide is padded with zeros to whole groups.
``QuantLinear`` runs through a custom autograd Function that saves only the packed weight and its
scales and dequantizes again in backward: a plain ``x @ dequant(w).t()`` under
autograd would keep every dequantized weight alive until backward and lose the saving.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The 16 NF4 levels: quantiles of a standard normal, scaled to [-1, 1] (Dettmers et al. 2023, QLoRA).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


def padded_width(in_features: int, group_size: int) -> int:
    """Inputs one row of codes stands for: ``in_features`` rounded up to whole groups."""
    return -(-in_features // group_size) * group_size


def quantize(weight: torch.Tensor, bits: int, fmt: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (packed codes, scales (out, ceil(in / group_size))), symmetric per group.

    Any width works: a row is padded with zeros to whole groups (as bitsandbytes' blockwise format
    does), and 4-bit codes of an odd padded width get one filler code so that they pack two to a byte.
    The padding is stored, so it counts in the bytes: codes are out x padded_width x bits / 8 bytes
    (4 bits: rounded up to whole bytes per row), scales out x groups. Where the group size divides
    ``in``, nothing is padded.
    """
    out_f, in_f = weight.shape
    width = padded_width(in_f, group_size)
    w = weight.detach().float()
    if width != in_f:
        w = F.pad(w, (0, width - in_f))                                          # zeros: absmax unchanged
    groups = w.reshape(out_f, width // group_size, group_size)
    absmax = groups.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)          # out, g, 1
    if fmt == "nf4":
        levels = torch.tensor(NF4_LEVELS, device=weight.device)
        codes = torch.bucketize(groups / absmax, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)  # nearest
        scales = absmax
    else:
        qmax = 2 ** (bits - 1) - 1                                               # 127 or 7
        scales = absmax / qmax
        codes = (groups / scales).round().clamp(-qmax, qmax).to(torch.int8)
        if bits == 4:
            codes = (codes + 8).to(torch.uint8)                                  # 1..15 in a nibble
    codes = codes.reshape(out_f, width)
    if bits == 4:
        if width % 2:
            codes = F.pad(codes, (0, 1))                                         # filler, never read
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)                           # out, width/2: two per byte
    return codes.contiguous(), scales.squeeze(-1).to(weight.dtype).contiguous()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, fmt: str, dtype: torch.dtype,
               in_features: int) -> torch.Tensor:
    """Packed codes + scales -> the (out, in_features) weight in ``dtype``; one float tensor of the padded
    width alive (what is returned is a view of it without the padding)."""
    out_f, groups = scales.shape
    if bits == 4:
        codes = torch.stack((codes & 15, codes >> 4), dim=-1).reshape(out_f, -1)  # out, in (uint8)
    width = codes.shape[1] // groups * groups  # drops the 4-bit filler code of an odd padded width
    if width != codes.shape[1]:
        codes = codes[:, :width]
    if bits == 4:
        if fmt == "nf4":
            w = torch.tensor(NF4_LEVELS, dtype=dtype, device=codes.device)[codes.int()]
        else:
            w = codes.to(dtype).sub_(8)
    else:
        w = codes.to(dtype)
    w = w.view(out_f, groups, -1).mul_(scales.to(dtype).unsqueeze(-1)).view(out_f, -1)
    return w if width == in_features else w[:, :in_features]


def packed_parameters(weight: torch.Tensor, bits: int, fmt: str,
                      group_size: int) -> tuple[nn.Parameter, nn.Parameter]:
    """Frozen packed codes and scales of ``weight``; the codes count the parameters they stand for
    (``logical_numel``), the scales, being metadata, none."""
    codes, scales = quantize(weight, bits, fmt, group_size)
    codes_param = nn.Parameter(codes, requires_grad=False)
    scales_param = nn.Parameter(scales, requires_grad=False)
    codes_param.logical_numel = weight.numel()  # type: ignore[attr-defined]  # read by count_parameters
    scales_param.logical_numel = 0  # type: ignore[attr-defined]
    return codes_param, scales_param


def lora_parameters(rank: int, in_features: int, out_features: int, dtype: torch.dtype,
                    device: torch.device | str) -> tuple[nn.Parameter, nn.Parameter]:
    """LoRA's trainable pair: A (rank x in), kaiming-uniform as nn.Linear (and peft) initialise a weight, and
    B (out x rank), zeros, so that the adapted layer computes exactly what its base does until B trains."""
    with torch.no_grad():
        a = torch.empty(rank, in_features, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return nn.Parameter(a), nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """What LoRA adds to a layer's output: (x A^T) B^T * alpha/rank."""
    return F.linear(F.linear(x, a), b) * scale


class _QuantMatmul(torch.autograd.Function):
    """y = x @ dequant(W)^T, saving only the packed weight; backward dequantizes again."""

    @staticmethod
    def forward(ctx, x, codes, scales, bits, fmt, in_features):
        ctx.save_for_backward(codes, scales)
        ctx.bits, ctx.fmt, ctx.in_features = bits, fmt, in_features
        w = dequantize(codes, scales, bits, fmt, x.dtype, in_features)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, grad_out):
        codes, scales = ctx.saved_tensors
        w = dequantize(codes, scales, ctx.bits, ctx.fmt, grad_out.dtype, ctx.in_features)
        return grad_out @ w, None, None, None, None, None


class QuantLinear(nn.Module):
    """A frozen, packed Linear; ``lora_a``/``lora_b`` adapters train when given a rank."""

    def __init__(self, linear: nn.Linear, bits: int, fmt: str, group_size: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.fmt, self.group_size = bits, fmt, group_size
        self.codes, self.scales = packed_parameters(linear.weight, bits, fmt, group_size)
        self.bias = linear.bias
        self.lora_a: nn.Parameter | None = None
        self.lora_b: nn.Parameter | None = None
        self.lora_scale = 0.0

    def add_lora(self, rank: int, alpha: float) -> None:
        """LoRA: y += (x A^T) B^T * alpha/rank; B starts at zero so the output is unchanged at first."""
        ref = self.scales
        self.lora_a, self.lora_b = lora_parameters(rank, self.in_features, self.out_features, ref.dtype, ref.device)
        self.lora_scale = alpha / rank

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) float weight the packed codes stand for (padding dropped)."""
        return dequantize(self.codes, self.scales, self.bits, self.fmt, dtype or self.scales.dtype,
                          self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _QuantMatmul.apply(x, self.codes, self.scales, self.bits, self.fmt, self.in_features)
        if self.bias is not None:
            y = y + self.bias
        if self.lora_a is not None and self.lora_b is not None:
            y = y + lora_delta(x, self.lora_a, self.lora_b, self.lora_scale)
        return y

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.fmt}{self.bits}, group_size={self.group_size}"


class LoraLinear(nn.Module):
    """LoRA around a frozen linear map: ``base`` (an nn.Linear, a bitsandbytes Linear4bit/Linear8bitLt, anything
    with ``in_features``/``out_features`` that maps the last dimension) plus trainable ``lora_a``/``lora_b``;
    y = base(x) + (x A^T) B^T * alpha/rank. The base is not copied: its parameters stay where they are."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)  # type: ignore[arg-type]
        self.lora_a, self.lora_b = lora_parameters(rank, self.in_features, self.out_features, dtype, device)
        self.lora_scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + lora_delta(x, self.lora_a, self.lora_b, self.lora_scale)

    def extra_repr(self) -> str:
        return f"rank={self.lora_a.shape[0]}, scale={self.lora_scale:g}"
