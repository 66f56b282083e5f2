"""The strategy registry: name -> Strategy class. Adding a strategy means adding a module to this package.

Importing it does not import torch (the strategy modules load on the first ``registry()``). A name registered
twice is refused. The registry is the spec's strategy catalog (memopt.spec.strategy_spec.provide_catalog).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from memopt.core.errors import StrategyError
from memopt.spec.strategy_spec import Catalog, Options, StrategySpec, provide_catalog, strategy_spec
from memopt.strategies.base import SavedTensors, StepPlan, Strategy

REGISTRY: dict[str, type[Strategy[Any]]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: add a strategy under its ``name``; a name taken by another class is refused."""
    known = REGISTRY.get(cls.name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise StrategyError(f"strategy {cls.name!r} is registered twice: by {known.__module__}.{known.__qualname__} "
                            f"and by {cls.__module__}.{cls.__qualname__}")
    REGISTRY[cls.name] = cls
    return cls


NOT_STRATEGIES = {"base", "tiers"}  # the package's modules that hold no strategy


def _load_all() -> None:
    """Import every strategy module of this package, each registering itself: adding a strategy is adding its
    module (memopt/strategies/NAME.py with a ``@register``-ed class), nothing else."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in NOT_STRATEGIES:
            importlib.import_module(f"{__name__}.{info.name}")


def registry() -> dict[str, type[Strategy]]:
    _load_all()
    return dict(sorted(REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))


def candidate_specs(name: str, mode: str = "train") -> tuple[StrategySpec, ...]:
    """The strategy's typical settings for run.mode ``mode`` (its class's ``candidates``, or
    ``inference_candidates`` outside training; none: just the name), lightest first."""
    cls = registry()[name]
    settings = cls.inference_candidates if mode != "train" and cls.inference_candidates is not None else cls.candidates
    return tuple(strategy_spec(name, options) for options in settings or ({},))


def lossy(spec: Any) -> bool:
    """Whether any of the spec's strategies changes the numbers (its accuracy drift is then measured)."""
    known = registry()
    return any(known[s.name].lossy for s in spec.strategies)


def shards_model_states(spec: Any) -> bool:
    """Whether the spec's ranks each hold 1/N of the model states (FSDP), rather than all of them or no ranks."""
    known = registry()
    return any(known[s.name].shards_model_states for s in spec.strategies)


def set_up_process(spec: Any) -> None:
    """Each of the spec's strategies prepares the run's process, before any device is initialised there."""
    known = registry()
    for setting in spec.strategies:
        known[setting.name].set_up_process(setting.options)


def allocated_view(spec: Any) -> Any:
    """``spec`` without the strategies that change only what the allocator reserves: what a trace can measure (the
    preflight's estimate of a run with ``allocator`` settings)."""
    known = registry()
    return spec.with_strategies([s for s in spec.strategies if known[s.name].changes_allocated])


def build_strategies(spec: Any, device: str, saved: SavedTensors | None = None) -> list[Strategy[Any]]:
    """Instantiate the spec's strategies for ``device`` in composition order, refusing combinations that
    cannot work; ``saved`` is where they report tensors they keep for backward (the runner's tracker)."""
    known = registry()
    chosen = [known[s.name](s.options, spec, device, saved) for s in spec.strategies]
    names = {s.name for s in chosen}
    for strategy in chosen:
        for other, why in strategy.refuses.items():
            if other in names:
                raise StrategyError(f"{strategy.name}+{other}: refused: {why}")
        if device not in strategy.devices:
            raise StrategyError(f"{strategy.name}: works only on {', '.join(strategy.devices)}, "
                                f"not on {device}")
        mode = spec.run.mode
        if mode not in strategy.modes:
            where = ", ".join(f"--mode {m}" for m in strategy.modes)
            raise StrategyError(f"{strategy.name}: applies to {where}, not to run.mode {mode}"
                                + ("" if mode == "train" else " (nothing is trained or saved for backward)"))
        kind = getattr(spec.model, "kind", "builtin")
        if kind == "keras":
            _check_keras(strategy.name, getattr(spec.model, "backend", "torch"))
        if strategy.needs_to_know and kind == "python":
            raise StrategyError(f"{strategy.name}: needs to know the model's {strategy.needs_to_know}, which memopt "
                                "cannot for a model from a Python factory")
        strategy.check()
    return sorted(chosen, key=lambda s: s.order)


KERAS_STRATEGIES = ("accum", "ckpt", "offload", "lora", "quant")  # act on a Keras model on the PyTorch backend: the
# step's batches, its blocks' calls, the tensors saved for backward, Keras's own LoRA and quantization


def _check_keras(name: str, backend: str) -> None:
    """A Keras model takes the strategies that act on the step, not on torch modules (it has none to wrap or swap)."""
    if backend != "torch":
        raise StrategyError(f"{name}: memopt applies strategies on Keras's PyTorch backend (--backend torch); on "
                            f"{backend} it measures the model as it is")
    if name not in KERAS_STRATEGIES:
        hint = (" (Keras's own: keras.config.set_dtype_policy('mixed_bfloat16') in the factory)"
                if name == "amp" else "")
        raise StrategyError(f"{name}: not for a Keras model: its layers are Keras layers, not the torch modules "
                            f"{name} rewrites; a Keras model takes {', '.join(KERAS_STRATEGIES)}{hint}")


def _options_models() -> dict[str, type[Options]]:
    return {name: cls.Options for name, cls in registry().items()}


provide_catalog(Catalog(options=_options_models, on_ranks="fsdp"))

__all__ = ["REGISTRY", "Options", "StepPlan", "Strategy", "StrategySpec", "allocated_view", "build_strategies",
           "candidate_specs", "lossy", "register", "registry", "set_up_process", "shards_model_states", "strategy_spec"]
