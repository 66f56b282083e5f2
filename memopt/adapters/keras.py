"""A Keras 3 model from a user's factory: Keras imported with the spec's backend, the model built and compiled
(memopt compiles an uncompiled one: the spec's optimizer, sparse cross-entropy on logits), its batches; and, on
the PyTorch backend, its adapter (a Keras model is an ``nn.Module`` there) and its optimizer as the runner steps one.

Keras picks its backend when it is first imported (``KERAS_BACKEND``), once per process: a run on the other
backend runs in a process of its own (memopt.engine.keras_tf for TensorFlow).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import torch

from memopt.adapters import AdapterError
from memopt.adapters.module import ModuleAdapter
from memopt.core.entry_points import call_user, kind_of, load_entry_point
from memopt.core.errors import MemoptError
from memopt.spec import KerasModelSpec, Spec

INSTALL = "pip install 'memopt[tf]'"


def import_keras(backend: str, device: str | None = None) -> Any:
    """Keras, on ``backend`` (on the PyTorch backend, its tensors on ``device``); MemoptError when it is not
    installed or this process has it on another backend."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = backend
        if device is not None and backend == "torch":
            os.environ["KERAS_TORCH_DEVICE"] = device
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    try:
        import keras
    except ImportError as exc:
        raise MemoptError(f"model.keras: Keras is not installed ({exc.name or 'keras'} missing): {INSTALL}") from None
    if keras.backend.backend() != backend:
        raise MemoptError(f"model.backend: this process has Keras on its {keras.backend.backend()} backend already "
                          f"(Keras picks one per process): run memopt on its own for --backend {backend}")
    return keras


def build_keras(model: KerasModelSpec, spec: Spec, device: str | None = None) -> Any:
    """The user's factory called with its kwargs under the run's dtype policy; compiled with the spec's optimizer and
    sparse cross-entropy on logits when the factory left it uncompiled. MemoptError naming what went wrong."""
    keras = import_keras(model.backend, device)
    try:
        factory = load_entry_point(model.keras, "keras")
    except ValueError as exc:
        raise MemoptError(f"model.{exc}") from None
    keras.config.set_dtype_policy(spec.run.dtype)  # memopt's dtype names are Keras's policy names
    keras.utils.set_random_seed(spec.run.seed % 2**32)
    built = call_user(f"model.keras: {model.keras}", factory, **model.kwargs)
    if not isinstance(built, keras.Model):
        raise MemoptError(f"model.keras: {model.keras} returned {kind_of(built)}, not a keras.Model")
    if not built.compiled:
        if spec.train.optimizer == "none" and model.backend == "tensorflow":
            raise MemoptError("train.optimizer: none, but Keras's training step on TensorFlow needs an optimizer "
                              "(--backend torch measures forward and backward alone)")
        built.compile(optimizer=_optimizer(keras, spec), loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True))
    elif spec.train.optimizer == "none":
        raise MemoptError("train.optimizer: none, but the Keras model was compiled with an optimizer: compile it "
                          "without one or drop train.optimizer")
    if not built.built:  # a subclassed model makes its weights at its first call: on the first batch's inputs
        x, _ = keras_batch(model, spec, keras_vocab_size(model, built), 0)
        call_user(f"model.keras: {model.keras}'s forward", built, x, training=False)
    return built


def _optimizer(keras: Any, spec: Spec) -> Any:
    name, lr = spec.train.optimizer, spec.train.lr
    if name == "none":
        return None
    made = {"sgd": keras.optimizers.SGD, "adafactor": keras.optimizers.Adafactor, "adamw": keras.optimizers.AdamW}
    return made[name](learning_rate=lr)


def keras_vocab_size(model: KerasModelSpec, built: Any) -> int | None:
    """The token-id range of random batches: model.vocab_size, else the first Embedding layer's input size (None
    with model.batch: the user's batches need none)."""
    if model.vocab_size is not None:
        return model.vocab_size
    if model.batch is not None:
        return None
    for layer in _layers(built):
        if type(layer).__name__ == "Embedding" and hasattr(layer, "input_dim"):
            return int(layer.input_dim)
    raise MemoptError(f"model.vocab_size: {model.keras} has no Embedding layer to take random token ids from; "
                      "set model.vocab_size or give model.batch")


def _layers(model: Any) -> Iterator[Any]:
    yield from model._flatten_layers(include_self=False, recursive=True)


def keras_batch(model: KerasModelSpec, spec: Spec, vocab: int | None, step: int = 0) -> tuple[Any, Any]:
    """(x, y) for one step as NumPy arrays: the user's ``make_batch(batch_size, seq_len)``, else seeded random token
    ids and their next tokens (int32; the same ids memopt's own runs draw for the same seed and step)."""
    seed = spec.run.seed * 1_000_003 + step
    b, s = spec.train.batch_size, spec.train.seq_len
    if model.batch is not None:
        try:
            make = load_entry_point(model.batch, "batch")
        except ValueError as exc:
            raise MemoptError(f"model.{exc}") from None
        torch.manual_seed(seed)
        made = call_user(f"model.batch: {model.batch}", make, b, s)
        if not (isinstance(made, (tuple, list)) and len(made) == 2):
            raise MemoptError(f"model.batch: {model.batch} must return (x, y), not {kind_of(made)}")
        return made[0], made[1]
    gen = torch.Generator().manual_seed(seed)
    if vocab is None:
        raise MemoptError(f"model.vocab_size: unknown for {model.keras}; set model.vocab_size or give model.batch")
    ids = torch.randint(vocab, (b, s + 1), generator=gen)
    return ids[:, :-1].to(torch.int32).numpy(), ids[:, 1:].to(torch.int32).numpy()


def variable_bytes(variables: list[Any]) -> int:
    """Bytes of Keras variables: elements x their dtype's size (what their buffers hold)."""
    import numpy as np

    total = 0
    for v in variables:
        count = int(np.prod(v.shape)) if len(v.shape) else 1
        total += count * np.dtype(_numpy_dtype(v.dtype)).itemsize
    return total


def _numpy_dtype(name: str) -> str:
    return {"bfloat16": "float16"}.get(str(name), str(name))  # bfloat16: 2 bytes, as float16


class KerasOptimizer:
    """A compiled Keras model's optimizer as memopt's runner steps one (PyTorch backend): ``step`` applies the
    gradients backward left in the weights' ``.grad``; ``state`` holds its variables (slots, iteration, learning
    rate), so the tracker counts them as optimizer state."""

    def __init__(self, model: Any):
        self.model = model
        self.optimizer = model.optimizer

    @property
    def _weights(self) -> list[Any]:
        return list(self.model.trainable_variables)

    def step(self) -> None:
        weights = self._weights
        grads = [w.value.grad for w in weights]  # None for a weight the loss did not reach: Keras skips it
        with torch.no_grad():
            self.optimizer.apply(grads, weights)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for w in self._weights:
            w.value.grad = None

    @property
    def state(self) -> dict[Any, dict[str, torch.Tensor]]:
        """Every optimizer variable (slots, iteration, learning rate), each under its own Keras path."""
        return {v.path: {"value": v.value} for v in self.optimizer.variables}


class KerasAdapter(ModuleAdapter):
    """``ModelAdapter`` of a Keras model on the PyTorch backend: the loss is the one it was compiled with; its layers
    are Keras layers, not torch modules memopt can wrap or swap (strategies that need them refuse)."""

    def __init__(self, model: Any, spec: KerasModelSpec):
        super().__init__(model)
        self.spec_model = spec

    def blocks(self) -> Any:
        raise AdapterError("a Keras model's layers are not torch modules memopt can wrap (checkpointing, offload "
                           "and sharding need them)")

    def linears(self, keep: Any = None) -> dict[str, Any]:
        raise AdapterError("a Keras model's Dense layers are not nn.Linear: memopt cannot swap them")

    def head(self) -> None:
        return None

    def embedding(self) -> None:
        return None

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        keras_model: Any = self.model  # a keras.Model (an nn.Module on this backend)
        name = self.spec_model.keras
        y_pred = call_user(f"model.keras: {name}'s forward", keras_model, x, training=True)
        loss: torch.Tensor = call_user(f"model.keras: {name}'s compiled loss", keras_model.compute_loss, x=x, y=y,
                                       y_pred=y_pred)
        return loss

    def logits(self, batch: Any) -> torch.Tensor:
        logits: torch.Tensor = call_user(f"model.keras: {self.spec_model.keras}'s forward", self.model, batch[0],
                                         training=False)
        return logits

    def own_optimizer(self) -> KerasOptimizer | None:
        return KerasOptimizer(self.model) if self.model.optimizer is not None else None
