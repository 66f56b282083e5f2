"""Weight-only quantization (memopt/quantize.py): QuantLinear packs any width and computes with its
dequantized weight, in values and in gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memopt.model.quantize import QuantLinear, dequantize

from .helpers import packed_bytes


@pytest.mark.parametrize(("bits", "fmt"), [(8, "int"), (4, "int"), (4, "nf4")])
@pytest.mark.parametrize(("out_f", "in_f", "group"), [(96, 49, 32), (33, 49, 7), (7, 20, 64), (5, 3, 2)])
def test_quant_linear_on_any_width_pads_and_matches_its_dequantized_weight(bits, fmt, out_f, in_f, group):
    """Odd widths, a group size that does not divide, one larger than the width; (33, 49, 7) and (5, 3, 2)
    have an odd padded width, whose 4-bit codes take one filler nibble per row."""
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f)
    q = QuantLinear(linear, bits, fmt, group)
    assert (q.codes.nbytes, q.scales.nbytes) == packed_bytes(out_f, in_f, bits, group)
    assert q.scales.shape == (out_f, math.ceil(in_f / group))
    w = q.dequantized_weight()
    assert w.shape == (out_f, in_f)
    # the padding is zeros: the same as quantizing the zero-padded weight and dropping its padding
    width = math.ceil(in_f / group) * group
    wide = nn.Linear(width, out_f)
    with torch.no_grad():
        wide.weight.copy_(F.pad(linear.weight, (0, width - in_f)))
    assert torch.equal(QuantLinear(wide, bits, fmt, group).dequantized_weight()[:, :in_f], w)
    assert (w - linear.weight).norm() <= (0.02 if bits == 8 else 0.2) * linear.weight.norm()
    dense = nn.Linear(in_f, out_f)
    with torch.no_grad():
        dense.weight.copy_(w)
        dense.bias.copy_(linear.bias)
    x1 = torch.randn(5, in_f, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = q(x1), dense(x2)
    y1.square().sum().backward()
    y2.square().sum().backward()
    assert torch.allclose(y1, y2, atol=1e-5) and torch.allclose(x1.grad, x2.grad, atol=1e-5)


@pytest.mark.parametrize(("bits", "fmt"), [(8, "int"), (4, "int"), (4, "nf4")])
def test_quant_linear_matches_a_float_linear_with_the_dequantized_weight(bits, fmt):
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    q = QuantLinear(linear, bits, fmt, 64)
    dense = nn.Linear(128, 96)
    with torch.no_grad():
        dense.weight.copy_(dequantize(q.codes, q.scales, bits, fmt, torch.float32, 128))
        dense.bias.copy_(linear.bias)
    x1 = torch.randn(5, 128, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = q(x1), dense(x2)
    y1.square().sum().backward()
    y2.square().sum().backward()
    assert torch.allclose(y1, y2, atol=1e-5) and torch.allclose(x1.grad, x2.grad, atol=1e-5)
    assert q.codes.numel() == 96 * 128 * bits // 8
