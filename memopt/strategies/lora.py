"""LoRA on its own: low-rank adapters on the Linears inside the blocks, everything else frozen.

Each targeted Linear y = W x (+ b) becomes y = W x (+ b) + (x A^T) B^T * alpha/rank with A (rank x in,
kaiming-uniform) and B (out x rank, zeros) the only parameters that train: gradients and optimizer state
exist for them alone. Embedding, norms, biases and the output head are frozen too.

Backends: ``memopt`` (default) wraps each Linear in ``memopt.model.quantize.LoraLinear``; ``peft`` injects
peft's own LoRA layers in place (``peft.inject_adapter_in_model``, no PeftModel wrapper), with the same
A/B shapes and initialisation. After ``quant`` (applied first) the adapters go on the quantized layers:
memopt's backend calls ``QuantLinear.add_lora`` on memopt's packed layers and wraps bitsandbytes' layers;
peft wraps bitsandbytes' layers with its QLoRA layers (it does not know memopt's, so that pair is refused).
A Keras model (PyTorch backend) gets Keras's own LoRA: ``enable_lora`` on the Dense and EinsumDense layers
inside its blocks, targets matched against Keras's layer paths (e.g. ``*/query``).
``quant``'s own ``lora`` option and this strategy both add adapters: naming both is refused.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import torch
from pydantic import Field
from torch import nn

from memopt.adapters import ModelAdapter
from memopt.adapters.keras import KerasAdapter
from memopt.core._torch_private import in_fake_mode
from memopt.core.errors import MemoptError, StrategyError
from memopt.core.files import read_input
from memopt.model.quantize import LoraLinear, QuantLinear
from memopt.strategies import register
from memopt.strategies.base import ADAPTERS_NOTE, StepPlan, Strategy
from memopt.strategies.quant import LoraOptions, float_dtype, require


class LoraStrategyOptions(LoraOptions):
    targets: list[str] = Field(["*"], description="qualified Linear names (fnmatch patterns, e.g. *.self_attn.*) "
                               "that get adapters; default every Linear inside the blocks")
    backend: Literal["memopt", "peft"] = Field("memopt", description=(
        "memopt: memopt's LoRA layer; peft: peft.inject_adapter_in_model (pip install 'memopt[hf]')"))
    peft_config: str | None = Field(None, description=(
        "a peft adapter_config.json (or its folder): its r, lora_alpha, target_modules (peft's suffix matching) "
        "and modules_to_save, instead of rank/alpha/targets"))


PEFT_CONFIG_LIMIT_BYTES = 2**20


def read_peft_config(source: str) -> dict[str, Any]:
    """rank, alpha, targets (fnmatch patterns: peft matches a name equal to a target or ending in ".target") and
    modules_to_save from a peft adapter_config.json; StrategyError naming lora.peft_config when it is unusable."""
    path = Path(source)
    path = path / "adapter_config.json" if path.is_dir() else path
    try:
        data = json.loads(read_input(path, "peft adapter config", PEFT_CONFIG_LIMIT_BYTES))
    except MemoptError as exc:
        raise StrategyError(f"lora.peft_config: {exc}") from None
    except json.JSONDecodeError as exc:
        raise StrategyError(f"lora.peft_config: {path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise StrategyError(f"lora.peft_config: {path}: expected a JSON object")
    rank, alpha, targets = data.get("r", 8), data.get("lora_alpha", 8), data.get("target_modules")
    if type(rank) is not int or rank < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise StrategyError(f"lora.peft_config: {path}: r must be a whole number >= 1 and lora_alpha > 0, got "
                            f"r={rank!r}, lora_alpha={alpha!r}")
    if targets == "all-linear" or targets is None:
        patterns = ["*"]
    elif isinstance(targets, str):
        raise StrategyError(f"lora.peft_config: {path}: target_modules as a regular expression is not supported; "
                            "list the module names")
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        patterns = [p for t in targets for p in (t, f"*.{t}")]
    else:
        raise StrategyError(f"lora.peft_config: {path}: target_modules must be a list of module names")
    saved = data.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
        raise StrategyError(f"lora.peft_config: {path}: modules_to_save must be a list of module names")
    return {"rank": rank, "alpha": float(alpha), "targets": patterns, "modules_to_save": saved}


def _suffix_match(name: str, wanted: list[str]) -> bool:
    return any(name == w or name.endswith(f".{w}") for w in wanted)


def _block_prefix(model: ModelAdapter) -> str:
    blocks = model.blocks()
    return next(name for name, module in model.model.named_modules() if module is blocks) + "."


def lora_targets(model: ModelAdapter, patterns: list[str]) -> dict[str, nn.Module]:
    """Qualified name -> the linear layer inside the blocks that gets adapters: the adapter's Linears (float,
    or bitsandbytes' layers, which are nn.Linears) and memopt's QuantLinears, filtered by ``patterns``."""
    found: dict[str, nn.Module] = dict(model.linears())
    prefix = _block_prefix(model)
    found.update({name: module for name, module in model.model.named_modules()
                  if name.startswith(prefix) and isinstance(module, QuantLinear)})
    chosen = {name: module for name, module in found.items()
              if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)}
    if not chosen:
        some = ", ".join(sorted(found)[:3]) or "none"
        raise StrategyError(f"lora.targets: {patterns} match no Linear inside the blocks (e.g. {some})")
    return dict(sorted(chosen.items()))


@register
class Lora(Strategy[LoraStrategyOptions]):
    """Lossy in what training does, as ``optim8bit``: at initialisation B = 0, so the forward is the unchanged
    model's to the bit, but only the adapters train (every other parameter is frozen): the same steps lead
    elsewhere than full fine-tuning. So ``lossy = True`` with ``drift_shows_in_training``: the drift reported
    (and capped by ``optimize --max-drift``) is the logits' distance from the fully trained model after the
    same identical steps, and ``optimize`` only picks LoRA with ``--allow-lossy``; a search that took it
    silently would trade a full fine-tune for an adapter fine-tune under the name of a memory saving."""

    name = "lora"
    Options = LoraStrategyOptions
    summary = ("LoRA adapters (rank x (in + out) each) on the Linears inside the blocks; every other parameter "
               "frozen; after quant, on the quantized layers")
    saves = "gradients and optimizer state of everything but the adapters"
    lossy = True
    drift_shows_in_training = True
    order = 6  # after prune (1) and quant (5): adapters go on the layers they leave
    candidates = ({"rank": 8},)

    def check(self) -> None:
        if getattr(self.spec.model, "kind", None) == "keras" and (
                self.options.backend == "peft" or self.options.peft_config is not None):
            raise StrategyError("lora: a Keras model takes Keras's own LoRA (enable_lora), not peft's: drop "
                                "backend and peft_config")
        self._from_peft()  # a peft_config that cannot be read or clashes: refused before anything runs
        quant = next((s for s in self.spec.strategies if s.name == "quant"), None)
        if quant is not None and getattr(quant.options, "lora", None) is not None:
            raise StrategyError("lora+quant: refused: quant's own lora option already adds adapters; drop one "
                                "(quant:lora=8, or quant with the lora strategy)")
        if self.options.backend == "peft":
            require("peft", "lora.backend peft")
            if quant is not None and getattr(quant.options, "backend", "memopt") == "memopt":
                raise StrategyError("lora.backend peft: peft cannot wrap memopt's quantized layers; use "
                                    "lora backend memopt, or quant:backend=bitsandbytes (peft's QLoRA layers)")

    def configure(self, plan: StepPlan) -> None:
        plan.notes.append(ADAPTERS_NOTE.format(name="lora"))

    def _from_peft(self) -> tuple[LoraStrategyOptions, list[str]]:
        """The options with a peft_config's r, lora_alpha and target_modules, and its modules_to_save."""
        if self.options.peft_config is None:
            return self.options, []
        given = self.options.model_fields_set & {"rank", "alpha", "targets"}
        if given:
            raise StrategyError(f"lora.peft_config: the adapter config sets r, lora_alpha and target_modules; "
                                f"drop {', '.join(sorted(given))}")
        read = read_peft_config(self.options.peft_config)
        saved = read.pop("modules_to_save")
        return self.options.model_copy(update=read), saved

    def apply(self, model: ModelAdapter) -> None:
        opts, modules_to_save = self._from_peft()
        if isinstance(model, KerasAdapter):
            model.enable_lora(opts.rank, opts.alpha, opts.targets)
            return
        targets = lora_targets(model, opts.targets)
        if opts.backend == "peft":
            adapters = self._inject_peft(model, list(targets))
        else:
            adapters = set()
            for name, layer in targets.items():
                if isinstance(layer, QuantLinear):
                    layer.add_lora(opts.rank, opts.alpha)
                    wrapped: nn.Module = layer
                else:
                    device = next(layer.parameters()).device
                    wrapped = LoraLinear(layer, opts.rank, opts.alpha, float_dtype(layer, model.model), device)
                    model.model.set_submodule(name, wrapped)
                adapters |= {id(wrapped.lora_a), id(wrapped.lora_b)}
        for name, module in model.model.named_modules():  # peft trains these whole (its modules_to_save)
            if modules_to_save and _suffix_match(name, modules_to_save):
                adapters |= {id(p) for p in module.parameters()}
        for p in model.model.parameters():
            p.requires_grad_(id(p) in adapters)

    def _inject_peft(self, model: ModelAdapter, names: list[str]) -> set[int]:
        peft = require("peft", "lora.backend peft")
        opts, _ = self._from_peft()
        config = peft.LoraConfig(r=opts.rank, lora_alpha=opts.alpha, target_modules=names, lora_dropout=0.0,
                                 bias="none")
        if not in_fake_mode():
            peft.inject_adapter_in_model(config, model.model)
        else:
            # peft moves each new adapter to its base layer's device and dtype with Module.to, which cannot swap
            # fake parameters; on fake tensors everything is traced on the CPU already, so the moves are skipped
            # and each adapter is then given its base layer's dtype directly (only shapes and dtypes count here)
            with mock.patch.object(nn.Module, "to", _stay):
                peft.inject_adapter_in_model(config, model.model)
            _adapters_like_their_base(model.model)
        return {id(p) for name, p in model.model.named_parameters() if ".lora_A." in name or ".lora_B." in name}


def _stay(module: nn.Module, *_args: object, **_kwargs: object) -> nn.Module:
    """Module.to while peft injects on fake tensors: the module stays as it is (see _inject_peft)."""
    return module


def _adapters_like_their_base(model: nn.Module) -> None:
    """Each peft adapter's parameters in its base layer's float dtype and device, as peft would have moved them."""
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if base is None:
            continue
        weight = base.weight
        for child_name, child in module.named_children():
            if child_name not in ("lora_A", "lora_B"):
                continue
            for sub in child.modules():
                for pname, p in list(sub.named_parameters(recurse=False)):
                    if (p.dtype, p.device) != (weight.dtype, weight.device) and weight.is_floating_point():
                        setattr(sub, pname, nn.Parameter(torch.empty(p.shape, dtype=weight.dtype,
                                                                     device=weight.device)))
