"""The spec layer: what a run is (schema), how it is read (load), Hugging Face configs (hf_config), the strategy
grammar and a strategy's validated options (strategy_args, strategy_spec). Imports only memopt.core.

The names below are loaded on first use (PEP 562): ``import memopt`` provides the strategy catalog through
memopt.spec.strategy_spec, which must not pull in the pydantic models and the YAML loader (``memopt --help``).
The function ``strategy_spec`` is not re-exported here: its name is its module's, and once that submodule is imported
``memopt.spec.strategy_spec`` is the module (import it from memopt.spec.strategy_spec)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memopt.spec.load import (
        MODEL_OVERRIDES,
        OVERRIDE_PATHS,
        PRESETS,
        config_note,
        load_spec,
        read_yaml,
        spec_from_data,
    )
    from memopt.spec.schema import (
        DTYPE_ALIASES,
        DTYPE_BYTES,
        AnyModelSpec,
        GenerateSpec,
        HfModelSpec,
        KerasModelSpec,
        ModelSpec,
        PythonModelSpec,
        RunSpec,
        Spec,
        TrainSpec,
    )
    from memopt.spec.strategy_spec import Options, StrategySpec

_HOMES = {
    **dict.fromkeys(("MODEL_OVERRIDES", "OVERRIDE_PATHS", "PRESETS", "config_note", "load_spec", "read_yaml",
                     "spec_from_data"), "load"),
    **dict.fromkeys(("DTYPE_ALIASES", "DTYPE_BYTES", "AnyModelSpec", "GenerateSpec", "HfModelSpec", "KerasModelSpec",
                     "ModelSpec", "PythonModelSpec", "RunSpec", "Spec", "TrainSpec"), "schema"),
    **dict.fromkeys(("Options", "StrategySpec"), "strategy_spec"),
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'memopt.spec' has no attribute {name!r}")
    return getattr(importlib.import_module(f"memopt.spec.{home}"), name)


__all__ = ["DTYPE_ALIASES", "DTYPE_BYTES", "MODEL_OVERRIDES", "OVERRIDE_PATHS", "PRESETS", "AnyModelSpec",
           "GenerateSpec", "HfModelSpec", "KerasModelSpec", "ModelSpec", "Options", "PythonModelSpec", "RunSpec",
           "Spec", "StrategySpec", "TrainSpec", "config_note", "load_spec", "read_yaml", "spec_from_data"]
