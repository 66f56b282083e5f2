"""Any spec's model, built and wrapped in its adapter: memopt's own, a Hugging Face one, or a user's factory."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from memopt.adapters import ModelAdapter
from memopt.adapters.builtin import BuiltinAdapter
from memopt.adapters.hf import HfAdapter
from memopt.adapters.module import ModuleAdapter
from memopt.core.entry_points import exception_text, load_entry_point
from memopt.core.errors import MemoptError
from memopt.model.hf import build_hf
from memopt.model.transformer import (
    TORCH_DTYPES,
    LanguageModel,
    build_model,
    count_parameters,
    default_dtype,
    parameter_count,
)
from memopt.spec import AnyModelSpec, HfModelSpec, ModelSpec, PythonModelSpec, Spec


def build_adapter(spec: Spec, device: str) -> ModelAdapter:
    """The spec's model on ``device`` in the run's dtype (seed it first), behind its adapter."""
    return model_adapter(spec.model, spec.run.dtype, device)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of any model: memopt's own, a transformers causal LM (a ``config`` and output embeddings),
    or any other nn.Module."""
    if isinstance(model, LanguageModel):
        return BuiltinAdapter(model)
    if hasattr(model, "config") and callable(getattr(model, "get_output_embeddings", None)) and hasattr(
            model, "base_model"):
        return HfAdapter(model)
    return ModuleAdapter(model)


def model_adapter(model: AnyModelSpec, dtype: str, device: str) -> ModelAdapter:
    if isinstance(model, ModelSpec):
        return BuiltinAdapter(build_model(model, dtype, device))
    if isinstance(model, HfModelSpec):
        return HfAdapter(build_hf(model, TORCH_DTYPES[dtype], device))  # adapter_for would find it too
    loss = _entry(model.loss, "loss") if model.loss else None
    return ModuleAdapter(build_python(model, dtype, device), loss, custom_batch=model.batch is not None)


def _entry(text: str, field: str) -> Any:
    try:
        return load_entry_point(text, field)
    except ValueError as exc:
        raise MemoptError(f"model.{exc}") from None


def build_python(model: PythonModelSpec, dtype: str, device: str) -> nn.Module:
    """The user's factory called with its kwargs, tensors created on ``device`` in ``dtype`` by default."""
    factory = _entry(model.python, "python")
    try:
        with torch.device(device), default_dtype(TORCH_DTYPES[dtype]):
            built = factory(**model.kwargs)
    except MemoptError:
        raise
    except Exception as exc:
        raise MemoptError(f"model.python: {model.python} raised {exception_text(exc)}") from None
    if not isinstance(built, nn.Module):
        what = "None" if built is None else f"a value of type {type(built).__name__}"  # not "a int"
        raise MemoptError(f"model.python: {model.python} returned {what}, not an nn.Module")
    return built


def vocab_size(model: AnyModelSpec) -> int:
    """The token-id range of random batches."""
    if not isinstance(model, PythonModelSpec):
        return model.vocab_size
    if model.vocab_size is not None:
        return model.vocab_size
    return _discovered_vocab(model.model_dump_json())


@functools.lru_cache(maxsize=8)
def _discovered_vocab(model_json: str) -> int:
    model = PythonModelSpec.model_validate_json(model_json)
    embedding = ModuleAdapter(build_python(model, "float32", "meta")).embedding()
    if embedding is None:
        raise MemoptError(f"model.vocab_size: {model.python} has no nn.Embedding to take random token ids from; "
                          "set model.vocab_size or give model.batch")
    return int(embedding[1].num_embeddings)


def parameter_total(model: AnyModelSpec, dtype: str = "float32") -> int:
    """Parameters of the model, without allocating them (built on the meta device when there is no formula)."""
    if isinstance(model, ModelSpec):
        return parameter_count(model)
    return _meta_parameters(type(model), model.model_dump_json(), dtype)


@functools.lru_cache(maxsize=8)
def _meta_parameters(cls: type[HfModelSpec | PythonModelSpec], model_json: str, dtype: str) -> int:
    model = cls.model_validate_json(model_json)
    if isinstance(model, HfModelSpec):
        model = model.model_copy(update={"random_weights": True})
    return count_parameters(model_adapter(model, dtype, "meta").model)[0]


def user_batch(entry: str, batch_size: int, seq_len: int, device: str, seed: int) -> Any:
    """The user's ``make_batch(batch_size, seq_len, device)``, seeded."""
    make = _entry(entry, "batch")
    torch.manual_seed(seed)
    try:
        return make(batch_size, seq_len, device)
    except Exception as exc:
        raise MemoptError(f"model.batch: {entry} raised {exception_text(exc)}") from None
