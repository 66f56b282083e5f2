"""A Keras 3 model from a user's factory: Keras imported with the spec's backend, the model built and compiled
(memopt compiles an uncompiled one: the spec's optimizer, sparse cross-entropy on logits), its batches; and, on
the PyTorch backend, its adapter (a Keras model is an ``nn.Module`` there) and its optimizer as the runner steps one.

Keras picks its backend when it is first imported (``KERAS_BACKEND``), once per process: a run on the other
backend runs in a process of its own (memopt.engine.keras_tf for TensorFlow).
"""

from __future__ import annotations

import fnmatch
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import set_checkpoint_early_stop

from memopt.adapters import AdapterError
from memopt.adapters.module import ModuleAdapter
from memopt.core.entry_points import call_user, kind_of, load_entry_point
from memopt.core.errors import MemoptError, StrategyError
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


def _layers(model: Any, recursive: bool = True) -> Iterator[Any]:
    """A Keras layer's sublayers (all of them, or its direct children): Keras's one walk of its layer tree."""
    yield from model._flatten_layers(include_self=False, recursive=recursive)


KERAS_LINEARS = ("Dense", "EinsumDense")  # the Keras layers memopt's lora and quant act on (Keras's own way)


def keras_blocks(model: Any, for_what: str = "checkpointing") -> list[Any]:
    """The model's blocks: its layers that hold layers of their own, of the class that repeats most (the shallowest
    on a tie: a decoder block rather than the attention inside it), in call order. AdapterError naming ``for_what``
    when there are none."""
    found: dict[type, list[Any]] = {}
    depth: dict[type, int] = {}
    seen: set[int] = set()

    def walk(layer: Any, level: int) -> None:
        for child in _layers(layer, recursive=False):
            if id(child) not in seen and next(_layers(child, recursive=False), None) is not None:
                seen.add(id(child))
                found.setdefault(type(child), []).append(child)
                depth.setdefault(type(child), level)
            walk(child, level + 1)

    walk(model, 0)
    if not found:
        raise AdapterError(f"this Keras model has no blocks (layers holding layers of their own) for {for_what}")
    return found[max(found, key=lambda kind: (len(found[kind]), -depth[kind]))]


def refuse_random_blocks(blocks: list[Any]) -> None:
    """AdapterError when a block draws random numbers (dropout: its seed generators' state variables, which are
    variables but not weights): Keras's seed generator advances at every call, so a recomputed block would draw
    another mask and its gradients would be wrong."""
    for block in blocks:
        weights = {id(w) for w in block.weights}
        drawn = [v.path for v in block.variables if id(v) not in weights]
        if drawn:
            raise AdapterError(f"Keras block {block.name} draws random numbers ({drawn[0]}: dropout): a recomputed "
                               "block would draw another mask; set its dropout rate to 0 to checkpoint it")


class _LayerCall(nn.Module):
    """A Keras layer's own ``call`` as a module a wrapper can run (the layer itself is not registered under it)."""

    def __init__(self, layer: Any):
        super().__init__()
        self.layer_call = layer.call

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.layer_call(*args, **kwargs)


class KerasBlocks(nn.ModuleList):
    """A Keras model's blocks as memopt's strategies see blocks: item i is block i's own call; setting item i to a
    wrapper of it makes block i run through the wrapper whenever Keras calls the block."""

    def __init__(self, blocks: list[Any]):
        super().__init__([_LayerCall(block) for block in blocks])
        self.keras_layers = blocks

    def __setitem__(self, idx: int, module: nn.Module) -> None:
        super().__setitem__(idx, module)

        def call(*args: Any, **kwargs: Any) -> Any:
            # A recomputation that stops early raises through Keras's traceback filters, whose frames then keep the
            # recomputed tensors alive in reference cycles until Python's collector runs: it runs to the end instead.
            with set_checkpoint_early_stop(False):
                return module(*args, **kwargs)

        object.__setattr__(self.keras_layers[idx], "call", call)  # an instance attribute over the class's


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
    """``ModelAdapter`` of a Keras model on the PyTorch backend: the loss is the one it was compiled with; its blocks
    run through a wrapper memopt installs on their calls (checkpointing); its Dense layers are not nn.Linear
    (strategies that swap linears refuse)."""

    def __init__(self, model: Any, spec: KerasModelSpec):
        super().__init__(model)
        self.spec_model = spec

    def blocks(self) -> KerasBlocks:
        """The blocks, to run through a wrapper (checkpointing: blocks that draw dropout masks are refused)."""
        blocks = keras_blocks(self.keras_model)
        refuse_random_blocks(blocks)
        return KerasBlocks(blocks)

    @property
    def keras_model(self) -> Any:
        """The keras.Model (an nn.Module on this backend, with Keras's own API beside)."""
        return self.model

    def linears(self, keep: Any = None) -> dict[str, Any]:
        raise AdapterError("a Keras model's Dense layers are not nn.Linear: memopt cannot swap them")

    def head(self) -> None:
        return None

    def embedding(self) -> None:
        return None

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        name = self.spec_model.keras
        y_pred = call_user(f"model.keras: {name}'s forward", self.keras_model, x, training=True)
        loss: torch.Tensor = call_user(f"model.keras: {name}'s compiled loss", self.keras_model.compute_loss, x=x, y=y,
                                       y_pred=y_pred)
        return loss

    def logits(self, batch: Any) -> torch.Tensor:
        logits: torch.Tensor = call_user(f"model.keras: {self.spec_model.keras}'s forward", self.model, batch[0],
                                         training=False)
        return logits

    def _block_layers(self, patterns: list[str], option: str, for_what: str) -> list[Any]:
        """The Dense and EinsumDense layers inside the blocks whose Keras paths match ``patterns`` (fnmatch);
        StrategyError naming ``option`` when none do."""
        layers = [layer for block in keras_blocks(self.keras_model, for_what=for_what)
                  for layer in (block, *_layers(block)) if type(layer).__name__ in KERAS_LINEARS]
        chosen = [layer for layer in layers if any(fnmatch.fnmatch(layer.path, p) for p in patterns)]
        if not chosen:
            some = ", ".join(layer.path for layer in layers[:3]) or "none"
            raise StrategyError(f"{option}: {patterns} match no Dense or EinsumDense layer inside the blocks "
                                f"(e.g. {some})")
        return chosen

    def _tracked(self) -> None:
        """Keras's torch parameters of the model (a ParameterDict made at its build) remade from its variables now:
        the ones a strategy added (adapters, quantized kernels and scales) included."""
        self.keras_model._track_variables()

    def quantize(self, mode: str) -> None:
        """Keras's own weight quantization (``layer.quantize``: int8 or int4, one scale per output unit, the kernel
        frozen) of the Dense and EinsumDense layers inside the blocks."""
        for layer in self._block_layers(["*"], "quant", "quantization"):
            try:
                layer.quantize(mode)
            except (ValueError, NotImplementedError) as exc:
                raise StrategyError(f"quant: Keras cannot quantize {layer.path} to {mode}: {exc}") from None
        self._tracked()

    def enable_lora(self, rank: int, alpha: float, patterns: list[str], option: str = "lora.targets") -> None:
        """Keras's own LoRA (``enable_lora``) on the Dense and EinsumDense layers inside the blocks whose paths match
        ``patterns``; every other variable frozen. StrategyError when none match or Keras refuses a layer."""
        chosen = self._block_layers(patterns, option, "LoRA")
        for layer in chosen:
            try:
                layer.enable_lora(rank, lora_alpha=alpha)
            except (ValueError, NotImplementedError) as exc:
                raise StrategyError(f"lora: Keras cannot add adapters to {layer.path}: {exc}") from None
        adapters = {id(v) for layer in chosen for v in (layer.lora_kernel_a, layer.lora_kernel_b)}
        self._tracked()
        for variable in self.keras_model.trainable_variables:
            if id(variable) not in adapters:
                variable.trainable = False  # on this backend it sets the torch parameter's requires_grad too

    def own_optimizer(self) -> KerasOptimizer | None:
        return KerasOptimizer(self.model) if self.model.optimizer is not None else None
