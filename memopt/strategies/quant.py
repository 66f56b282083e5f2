"""Weight-only quantization of the Linear layers (and optionally the embedding), QLoRA style.

Base weights are frozen and stored packed (int8, int4 or nf4, one scale per group of ``group_size``
inputs; a width the group size does not divide is padded with zeros to whole groups, and the padding
counts in the bytes). With
``lora: {rank, alpha, targets}`` only the adapters train (QLoRA); without it the remaining float
parameters (embeddings, norms, biases, the float output layer) train.
``torch.ao.quantization.quantize_dynamic`` is no substitute: it gives no gradient.

``backend: bitsandbytes`` swaps in bitsandbytes' own layers instead of memopt's packing (the layers
QLoRA fine-tuning runs on): 4 bits -> ``bnb.nn.Linear4bit`` (``format: nf4`` -> nf4, ``int`` -> bnb's fp4,
the nearest 4-bit format it has; blocks of ``group_size`` weights over the flattened matrix, their absmax
double-quantized to 8 bits as in QLoRA), 8 bits -> ``bnb.nn.Linear8bitLt`` (LLM.int8: one float32 scale per
output row, so no groups). bitsandbytes keeps the quantization statistics beside the weight, outside the
module's parameters; they are registered on the layer as frozen parameters (``bnb_absmax``, ...) so that
the tracker counts them with the weights, as it counts memopt's scales. The ``lora`` option wraps each
bitsandbytes layer in memopt's LoRA (``memopt.model.quantize.LoraLinear``, the same adapters as with the memopt
backend); peft's own QLoRA layers are the ``lora`` strategy with ``backend: peft``. bitsandbytes'
parameters cannot wrap fake tensors, so this backend is profiled, never estimated.

A Keras model (PyTorch backend) is quantized Keras's own way: ``layer.quantize("int8" | "int4")`` on the Dense
and EinsumDense layers inside its blocks (one scale per output unit, the kernel frozen), and ``lora`` is Keras's
``enable_lora`` on them; group sizes, nf4, bitsandbytes, the embedding and the head are refused there.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import logging
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator
from torch import nn

from memopt.adapters import ModelAdapter
from memopt.adapters.keras import KerasAdapter
from memopt.core._torch_private import in_fake_mode
from memopt.core.errors import StrategyError
from memopt.model.quantize import LoraLinear, QuantLinear, dequantize, packed_parameters
from memopt.strategies import register
from memopt.strategies.base import ADAPTERS_NOTE, Options, StepPlan, Strategy

BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit quantization accepts
DEFAULT_GROUP = 64
HF_EXTRA = "pip install 'memopt[hf]'"


@contextlib.contextmanager
def quiet(logger: str) -> Iterator[None]:
    """A library logger's warnings silenced (errors still shown) while the block runs."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def quiet_bitsandbytes_matmul() -> contextlib.AbstractContextManager[None]:
    """bitsandbytes' 8-bit matmul logs a warning on every call whose input is not float16 (it casts to quantize,
    by design); the run's notes say it once instead."""
    return quiet("bitsandbytes.autograd._functions")


def require(module: str, what: str) -> Any:
    """Import an optional library (bitsandbytes, peft) or refuse ``what`` with the install command."""
    # bitsandbytes warns at import that an optional CPU inference kernel is missing: a path memopt turns off
    with quiet("bitsandbytes.backends.cpu.ops"):
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            raise StrategyError(f"{what} needs {module}, which is not installed here ({exc}): {HF_EXTRA}") from None


def float_dtype(module: nn.Module, model: nn.Module) -> torch.dtype:
    """The float dtype a layer computes in: its weight's, else bitsandbytes' compute dtype, else the model's."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    compute = getattr(module, "compute_dtype", None)
    if isinstance(compute, torch.dtype) and compute.is_floating_point:
        return compute
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())


class BackendOptions(Options):
    """``backend: memopt`` (the default) is left out when the options are written, so that specs and
    baselines written before there were backends read the same."""

    @model_serializer(mode="wrap")
    def _without_default_backend(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if isinstance(data, dict) and data.get("backend") == "memopt":
            data.pop("backend")
        return data


class LoraOptions(Options):
    rank: int = Field(8, ge=1, le=4096)
    alpha: float = Field(16.0, gt=0)
    targets: list[str] = Field(default_factory=lambda: ["*"],
                               description="qualified Linear names (fnmatch patterns, e.g. *.self_attn.*) that get "
                               "adapters; default every quantized Linear")


class QuantOptions(BackendOptions):
    bits: Literal[8, 4] = 8
    format: Literal["int", "nf4"] = Field("int", description=(
        "int: symmetric integers (bitsandbytes backend at 4 bits: its fp4); nf4: NormalFloat4"))
    group_size: int = Field(DEFAULT_GROUP, ge=2, le=2**16, description=(
        "inputs per scale; any width works: the last group of a row is padded with zeros (stored, so counted); "
        "bitsandbytes: its 4-bit blocksize (32..4096, powers of two), at 8 bits one scale per row (leave it)"))
    embedding: bool = Field(False, description="also quantize (and freeze) the token embedding")
    head: bool = Field(False, description="also quantize the output projection (bitsandbytes keeps it in float)")
    lora: LoraOptions | None = None
    backend: Literal["memopt", "bitsandbytes"] = Field("memopt", description=(
        "memopt: memopt's packed weights; bitsandbytes: bnb.nn.Linear4bit / Linear8bitLt "
        f"({HF_EXTRA}; profiled only, not estimated)"))

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


def bnb_linear(bnb: Any, linear: nn.Linear, bits: int, fmt: str, blocksize: int) -> nn.Linear:
    """``linear`` as a frozen bitsandbytes layer quantized on its device (4 bits: Linear4bit, nf4 or fp4, blocks
    of ``blocksize``, double-quantized absmax; 8 bits: Linear8bitLt, LLM.int8 without outlier columns). The bias
    is kept as it is; the quantization statistics become frozen parameters of the layer (counted as params)."""
    weight, device = linear.weight, linear.weight.device
    layer: Any  # bitsandbytes is untyped
    if bits == 4:
        quant_type = "nf4" if fmt == "nf4" else "fp4"
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=weight.dtype,
                                  quant_type=quant_type, device="meta")
        layer.weight = bnb.nn.Params4bit(weight.data, requires_grad=False, quant_type=quant_type, blocksize=blocksize,
                                         module=layer).to(device)  # quantizes
        # bnb repacks the weights for a bf16 CPU kernel the first time it runs in eval mode without gradients
        # (drift does): keep the one path that training takes
        layer.support_avx512bf16_for_cpu = False
        state = layer.weight.quant_state
        stats = {"absmax": state.absmax, "code": state.code, "offset": state.offset}
        if state.state2 is not None:
            stats.update(nested_absmax=state.state2.absmax, nested_code=state.state2.code)
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False,
                                    threshold=0.0, device="meta")
        # Int8Params quantizes when it moves from the CPU to a device (to the CPU too)
        layer.weight = bnb.nn.Int8Params(weight.data.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
        stats = {"SCB": layer.weight.SCB}
    layer.bias = linear.bias
    vars(layer.weight)["logical_numel"] = weight.numel()  # count_parameters: the parameters it stands for
    for key, tensor in stats.items():
        if isinstance(tensor, torch.Tensor):
            stat = nn.Parameter(tensor, requires_grad=False)
            vars(stat)["logical_numel"] = 0  # metadata, as memopt's scales
            layer.register_parameter(f"bnb_{key}", stat)
    return layer


@register
class Quant(Strategy[QuantOptions]):
    name = "quant"
    Options = QuantOptions
    summary = ("weight-only int8 / int4 / nf4 (group-wise scales) frozen base weights, optional LoRA adapters; "
               "memopt's packing or bitsandbytes' layers (backend)")
    saves = "Linear weights 4-8x smaller; grads and optimizer state only for what still trains"
    lossy = True
    order = 5
    # lightest first, most saving last: group_size=128 halves the scales of the strongest setting (on widths
    # that are multiples of 128; on narrower ones its padding costs more than the scales it saves)
    candidates = ({"bits": 8, "lora": 8}, {"bits": 4, "format": "nf4", "lora": 8}, {"bits": 4, "lora": 8},
                  {"bits": 4, "lora": 8, "group_size": 128})
    modes = ("train", "infer", "generate")
    inference_candidates = ({"bits": 8}, {"bits": 4, "format": "nf4"}, {"bits": 4})

    def check(self) -> None:
        opts = self.options
        if opts.lora and self.spec.run.mode != "train":
            raise StrategyError(f"quant.lora: adapters are for training; run.mode {self.spec.run.mode} runs the "
                                "quantized weights alone (leave lora out)")
        if getattr(self.spec.model, "kind", None) == "keras":
            refused = {"backend": opts.backend != "memopt", "format": opts.format != "int",
                       "group_size": "group_size" in opts.model_fields_set, "embedding": opts.embedding,
                       "head": opts.head}
            wrong = [name for name, given in refused.items() if given]
            if wrong:
                raise StrategyError(f"quant.{wrong[0]}: a Keras model is quantized Keras's own way (layer.quantize: "
                                    "int8 or int4, one scale per output unit, the blocks' Dense and EinsumDense "
                                    f"layers); leave {', '.join(wrong)} out")
            return
        if opts.backend != "bitsandbytes":
            return
        require("bitsandbytes", "quant.backend bitsandbytes")
        for option in ("embedding", "head"):
            if getattr(opts, option):
                raise StrategyError(f"quant.{option}: the bitsandbytes backend quantizes the Linears inside the "
                                    "blocks only (bitsandbytes keeps embeddings and the output head in float); "
                                    "use backend memopt to quantize it")
        if opts.bits == 4 and opts.group_size not in BNB_BLOCKSIZES:
            raise StrategyError(f"quant.group_size: bitsandbytes' 4-bit blocksize must be one of "
                                f"{', '.join(map(str, BNB_BLOCKSIZES))}, not {opts.group_size}")
        if opts.bits == 8 and opts.group_size != DEFAULT_GROUP:
            raise StrategyError("quant.group_size: bitsandbytes' 8-bit layer (LLM.int8) has one scale per output "
                                "row, no groups; leave group_size out")

    def apply(self, model: ModelAdapter) -> None:
        if isinstance(model, KerasAdapter):
            self._apply_keras(model)
            return
        if self.options.backend == "bitsandbytes":
            self._apply_bitsandbytes(model)
            return
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

    def configure(self, plan: StepPlan) -> None:
        if self.options.lora and self.spec.run.mode == "train":
            plan.notes.append(ADAPTERS_NOTE.format(name="quant.lora"))
        if self.options.backend == "bitsandbytes" and self.options.bits == 8:
            plan.contexts.append(quiet_bitsandbytes_matmul)
            plan.notes.append("quant: bitsandbytes' 8-bit layers (LLM.int8) quantize their inputs through float16 "
                              "in every matmul")

    def _apply_keras(self, model: KerasAdapter) -> None:
        """Keras's own quantization (int8, int4) of the blocks' Dense and EinsumDense layers, then Keras's LoRA on
        them (quant.lora); check() refused the options that mean nothing there."""
        opts = self.options
        model.quantize(f"int{opts.bits}")
        if opts.lora:
            model.enable_lora(opts.lora.rank, opts.lora.alpha, opts.lora.targets, option="quant.lora.targets")

    def _apply_bitsandbytes(self, model: ModelAdapter) -> None:
        opts = self.options
        if in_fake_mode():
            raise StrategyError("quant.backend bitsandbytes cannot be estimated on fake tensors (its quantized "
                                "parameters cannot wrap one); profile it")
        bnb = require("bitsandbytes", "quant.backend bitsandbytes")
        for name, linear in model.linears().items():
            layer: nn.Module = bnb_linear(bnb, linear, opts.bits, opts.format, opts.group_size)
            if opts.lora and any(fnmatch.fnmatch(name, pattern) for pattern in opts.lora.targets):
                layer = LoraLinear(layer, opts.lora.rank, opts.lora.alpha, float_dtype(layer, model.model),
                                   linear.weight.device)
            model.model.set_submodule(name, layer)
        if opts.lora:
            for name, p in model.model.named_parameters():
                p.requires_grad_(name.rsplit(".", 1)[-1] in ("lora_a", "lora_b"))
