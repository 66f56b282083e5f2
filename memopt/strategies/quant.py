"""Weight-only quantization of the Linear layers (and optionally the embedding), QLoRA style.

Base weights are frozen and stored packed (int8, int4 or nf4, one scale per group of ``group_size``
inputs; a width the group size does not divide is padded with zeros to whole groups, and the padding
counts in the bytes). With
``lora: {rank, alpha, targets}`` only the adapters train (QLoRA); without it the remaining float
parameters (embeddings, norms, biases, the float output layer) train.
``torch.ao.quantization.quantize_dynamic`` is no substitute: it gives no gradient.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from memopt.adapters import ModelAdapter
from memopt.quantize import QuantLinear, dequantize, packed_parameters
from memopt.strategies import register
from memopt.strategies.base import Options, Strategy


class LoraOptions(Options):
    rank: int = Field(8, ge=1, le=4096)
    alpha: float = Field(16.0, gt=0)
    targets: list[str] = Field(default_factory=lambda: ["*"],
                               description="qualified Linear names (fnmatch patterns, e.g. *.self_attn.*) that get "
                               "adapters; default every quantized Linear")


class QuantOptions(Options):
    bits: Literal[8, 4] = 8
    format: Literal["int", "nf4"] = "int"
    group_size: int = Field(64, ge=2, le=2**16, description=(
        "inputs per scale; any width works: the last group of a row is padded with zeros (stored, so counted)"))
    embedding: bool = Field(False, description="also quantize (and freeze) the token embedding")
    head: bool = Field(False, description="also quantize the output projection (bitsandbytes keeps it in float)")
    lora: LoraOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _lora_shorthand(cls, data: Any) -> Any:
        """``lora: 8`` means rank 8; ``lora: true`` the defaults."""
        if isinstance(data, dict):
            lora = data.get("lora")
            if lora is True:
                data = {**data, "lora": {}}
            elif type(lora) is int:
                data = {**data, "lora": {"rank": lora}}
            elif lora is False:
                data = {**data, "lora": None}
        return data

    @model_validator(mode="after")
    def _nf4_is_4_bits(self) -> QuantOptions:
        if self.format == "nf4" and self.bits != 4:
            raise ValueError("format: nf4 is a 4-bit format; set bits: 4")
        return self


class QuantEmbedding(nn.Module):
    """A frozen, packed embedding table; rows are dequantized after the lookup."""

    def __init__(self, embedding: nn.Embedding, bits: int, fmt: str, group_size: int):
        super().__init__()
        self.bits, self.fmt, self.dim = bits, fmt, embedding.embedding_dim
        self.codes, self.scales = packed_parameters(embedding.weight, bits, fmt, group_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = dequantize(F.embedding(tokens.flatten(), self.codes), F.embedding(tokens.flatten(), self.scales),
                          self.bits, self.fmt, self.scales.dtype, self.dim)
        return rows.view(*tokens.shape, self.dim)


@register
class Quant(Strategy[QuantOptions]):
    name = "quant"
    Options = QuantOptions
    summary = "weight-only int8 / int4 / nf4 (group-wise scales) frozen base weights, optional LoRA adapters"
    saves = "Linear weights 4-8x smaller; grads and optimizer state only for what still trains"
    lossy = True
    order = 5
    # lightest first, most saving last: group_size=128 halves the scales of the strongest setting (on widths
    # that are multiples of 128; on narrower ones its padding costs more than the scales it saves)
    candidates = ({"bits": 8, "lora": 8}, {"bits": 4, "format": "nf4", "lora": 8}, {"bits": 4, "lora": 8},
                  {"bits": 4, "lora": 8, "group_size": 128})

    def apply(self, model: ModelAdapter) -> None:
        opts = self.options
        targets = list(model.linears().items())
        head = model.head()
        if opts.head and head is not None and not model.tied_embeddings():
            targets.append(head)
        for name, linear in targets:
            quantized = QuantLinear(linear, opts.bits, opts.format, opts.group_size)
            if opts.lora and any(fnmatch.fnmatch(name, pattern) for pattern in opts.lora.targets):
                quantized.add_lora(opts.lora.rank, opts.lora.alpha)
            model.model.set_submodule(name, quantized)
        embedding = model.embedding()
        if opts.embedding and embedding is not None and not model.tied_embeddings():
            model.model.set_submodule(embedding[0], QuantEmbedding(embedding[1], opts.bits, opts.format,
                                                                   opts.group_size))
        if opts.lora:
            for name, p in model.model.named_parameters():
                p.requires_grad_(name.rsplit(".", 1)[-1] in ("lora_a", "lora_b"))
