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
from memopt.core.entry_points import call_user, kind_of, load_entry_point
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
from memopt.spec import AnyModelSpec, HfModelSpec, KerasModelSpec, ModelSpec, PythonModelSpec, Spec

_KERAS_VOCAB: dict[str, int | None] = {}  # a Keras model's vocabulary, found when it was built (by its spec)


def build_adapter(spec: Spec, device: str) -> ModelAdapter:
    """The spec's model on ``device`` in the run's dtype (seed it first), behind its adapter."""
    if isinstance(spec.model, KerasModelSpec):
        return keras_adapter(spec, device)
    return model_adapter(spec.model, spec.run.dtype, device)


def keras_adapter(spec: Spec, device: str) -> ModelAdapter:
    """A Keras model on the PyTorch backend (the TensorFlow backend is measured in a process of its own)."""
    from memopt.adapters.keras import KerasAdapter, build_keras, keras_vocab_size

    assert isinstance(spec.model, KerasModelSpec)
    if spec.model.backend != "torch":
        raise MemoptError(f"model.backend: {spec.model.backend} runs in its own process, not through the tracker")
    built = build_keras(spec.model, spec, device)
    _KERAS_VOCAB[spec.model.model_dump_json()] = keras_vocab_size(spec.model, built)
    return KerasAdapter(built, spec.model)


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
    if isinstance(model, KerasModelSpec):
        raise MemoptError("model.keras: a Keras model is built with its spec (memopt.adapters.build.build_adapter)")
    loss = _entry(model.loss, "loss") if model.loss else None
    return ModuleAdapter(build_python(model, dtype, device), loss, custom_batch=model.batch is not None,
                         source=model)


def _entry(text: str, field: str) -> Any:
    try:
        return load_entry_point(text, field)
    except ValueError as exc:
        raise MemoptError(f"model.{exc}") from None


def build_python(model: PythonModelSpec, dtype: str, device: str) -> nn.Module:
    """The user's factory called with its kwargs, tensors created on ``device`` in ``dtype`` by default."""
    factory = _entry(model.python, "python")
    with torch.device(device), default_dtype(TORCH_DTYPES[dtype]):
        built = call_user(f"model.python: {model.python}", factory, **model.kwargs)
    if not isinstance(built, nn.Module):
        raise MemoptError(f"model.python: {model.python} returned {kind_of(built)}, not an nn.Module")
    return built


def vocab_size(model: AnyModelSpec) -> int:
    """The token-id range of random batches."""
    if isinstance(model, KerasModelSpec):
        found = model.vocab_size or _KERAS_VOCAB.get(model.model_dump_json())
        if found is None:
            raise MemoptError(f"model.vocab_size: unknown for {model.keras} before it is built; set model.vocab_size")
        return found
    if not isinstance(model, PythonModelSpec):
        return model.vocab_size
    if model.vocab_size is not None:
        return model.vocab_size
    found = _meta_facts(PythonModelSpec, model.model_dump_json())[1]
    if found is None:
        raise MemoptError(f"model.vocab_size: {model.python} has no nn.Embedding to take random token ids from; "
                          "set model.vocab_size or give model.batch")
    return found


def parameter_total(model: AnyModelSpec) -> int:
    """Parameters of the model, without allocating them (built on the meta device when there is no formula)."""
    if isinstance(model, ModelSpec):
        return parameter_count(model)
    return _meta_facts(type(model), model.model_dump_json())[0]


@functools.lru_cache(maxsize=8)
def _meta_facts(cls: type[HfModelSpec | PythonModelSpec], model_json: str) -> tuple[int, int | None]:
    """(parameters, the vocabulary of its token embedding) of the model built once on the meta device: nothing is
    allocated, and one call of a user's factory serves both (neither depends on the dtype)."""
    model = cls.model_validate_json(model_json)
    if isinstance(model, HfModelSpec):
        model = model.model_copy(update={"random_weights": True})
    adapter = model_adapter(model, "float32", "meta")
    embedding = adapter.embedding()
    return count_parameters(adapter.model)[0], int(embedding[1].num_embeddings) if embedding is not None else None


def user_batch(entry: str, batch_size: int, seq_len: int, device: str, seed: int) -> Any:
    """The user's ``make_batch(batch_size, seq_len, device)``, seeded."""
    make = _entry(entry, "batch")
    torch.manual_seed(seed)
    return call_user(f"model.batch: {entry}", make, batch_size, seq_len, device)
