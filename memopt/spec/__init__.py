"""The spec layer: what a run is (schema), how it is read (load), Hugging Face configs (hf_config), the strategy
grammar and a strategy's validated options (strategy_args, strategy_spec). Imports only memopt.core."""

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
    ModelSpec,
    PythonModelSpec,
    RunSpec,
    Spec,
    TrainSpec,
)
from memopt.spec.strategy_spec import Options, StrategySpec, strategy_spec

__all__ = ["DTYPE_ALIASES", "DTYPE_BYTES", "MODEL_OVERRIDES", "OVERRIDE_PATHS", "PRESETS", "AnyModelSpec",
           "GenerateSpec", "HfModelSpec", "ModelSpec", "Options", "PythonModelSpec", "RunSpec", "Spec", "StrategySpec",
           "TrainSpec", "config_note", "load_spec", "read_yaml", "spec_from_data", "strategy_spec"]
