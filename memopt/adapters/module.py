"""The adapter of any ``nn.Module`` (a user's factory): what can be found without knowing the model.

Blocks: the longest ``nn.ModuleList`` of modules of one class (what checkpointing wraps). Linears: the
``nn.Linear``s inside those blocks. Embedding and head: ``get_input_embeddings``/``get_output_embeddings`` when the
model has them, else the first ``nn.Embedding``. The loss: the user's ``loss(output, batch)``, else the output
itself when it is a scalar, its ``.loss``, or cross-entropy of its logits against the next tokens. What cannot
be known (a separable head for a chunked loss, the attention kernel, q/k/v layout) is refused with the reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memopt.adapters import AdapterError, AttentionProjections, FeedForward, LinearFilter, LossFromHidden
from memopt.core.entry_points import fenced

LossFn = Callable[[Any, Any], torch.Tensor]  # (model output, batch) -> scalar


def call_model(model: nn.Module, inputs: Any) -> Any:
    """A dict is passed as keyword arguments, a tuple/list as positional ones, anything else as the one argument."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def output_logits(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, ``.logits``, or the first item of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise AdapterError(f"the model returned a {type(output).__name__}: no logits in it (give model.loss: "
                       "pkg.module:loss_fn)")


def default_loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """The output when it is a scalar, its ``.loss``, or cross-entropy of its logits against ``targets``."""
    if isinstance(output, torch.Tensor) and output.dim() == 0:
        return output
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.dim() == 0:
        return loss
    logits = output_logits(output)
    if logits.shape[:-1] != targets.shape:
        raise AdapterError(f"the model's logits have shape {tuple(logits.shape)}, expected (batch, seq, vocab) = "
                           f"{(*targets.shape, '...')} (give model.loss: pkg.module:loss_fn)")
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


def repeated_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The longest ModuleList whose items are all of one class (ties: the first found)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    return best


class ModuleAdapter:
    """``ModelAdapter`` for an arbitrary nn.Module; ``loss_fn`` is the user's loss, if any."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | None = None, custom_batch: bool = False,
                 source: Any = None):
        self.model = model
        self.loss_fn = loss_fn
        self.custom_batch = custom_batch  # the user's batch: passed to the model whole, no (tokens, targets)
        # the spec's model section (a PythonModelSpec) when memopt built it: its entry points name user code's exits
        self.source = source

    def _blocks(self) -> tuple[str, nn.ModuleList]:
        found = repeated_blocks(self.model)
        if found is None:
            raise AdapterError(f"{type(self.model).__name__} has no nn.ModuleList of identical blocks")
        return found

    def blocks(self) -> nn.ModuleList:
        return self._blocks()[1]

    def linears(self, keep: LinearFilter | None = None) -> dict[str, nn.Linear]:
        prefix = self._blocks()[0] + "."
        return {name: module for name, module in self.model.named_modules()
                if name.startswith(prefix) and isinstance(module, nn.Linear) and (keep is None or keep(module, name))}

    def _named(self, module: nn.Module | None) -> tuple[str, Any] | None:
        if module is None:
            return None
        return next(((name, m) for name, m in self.model.named_modules() if m is module), None)

    def head(self) -> tuple[str, nn.Linear] | None:
        get = getattr(self.model, "get_output_embeddings", None)
        head = get() if callable(get) else None
        return self._named(head) if isinstance(head, nn.Linear) else None

    def embedding(self) -> tuple[str, nn.Embedding] | None:
        get = getattr(self.model, "get_input_embeddings", None)
        embedding = get() if callable(get) else None
        if not isinstance(embedding, nn.Embedding):
            embedding = next((m for m in self.model.modules() if isinstance(m, nn.Embedding)), None)
        return self._named(embedding)

    def tied_embeddings(self) -> bool:
        head, embedding = self.head(), self.embedding()
        return head is not None and embedding is not None and head[1].weight is embedding[1].weight

    def attention_kind(self) -> str:
        return "unknown"

    def use_attention(self, kind: str) -> None:
        raise AdapterError(f"memopt cannot switch the attention inside {type(self.model).__name__} (call "
                           "F.scaled_dot_product_attention in your module)")

    def attention_projections(self) -> list[AttentionProjections]:
        raise AdapterError(f"memopt does not know the q/k/v/o projections of {type(self.model).__name__}")

    def feed_forwards(self) -> list[FeedForward]:
        raise AdapterError(f"memopt does not know the feed-forward layers of {type(self.model).__name__}")

    def hidden_states(self, batch: Any) -> torch.Tensor:
        raise AdapterError(f"{type(self.model).__name__} has no separable output head memopt knows of")

    def loss_from_hidden(self, hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        raise AdapterError(f"{type(self.model).__name__} has no separable output head memopt knows of")

    def replace_loss(self, loss: LossFromHidden, name: str = "loss_head") -> None:
        raise AdapterError(f"{type(self.model).__name__} has no separable output head memopt knows of")

    def _fence(self, part: str) -> contextlib.AbstractContextManager[None]:
        """User code runs fenced (memopt.core.entry_points.fenced), named after the entry point it came from."""
        if self.source is None:
            return fenced(f"{type(self.model).__name__}'s {part}")
        if part == "loss" and self.source.loss is not None:
            return fenced(f"model.loss: {self.source.loss}")
        return fenced(f"model.python: {self.source.python}'s {part}")

    def _call(self, batch: Any) -> Any:
        with self._fence("forward"):
            return call_model(self.model, batch if self.custom_batch else batch[0])

    def loss(self, batch: Any) -> torch.Tensor:
        output = self._call(batch)
        if self.loss_fn is not None:
            with self._fence("loss"):
                return self.loss_fn(output, batch)
        if self.custom_batch:
            if isinstance(output, torch.Tensor) and output.dim() == 0:
                return output
            loss = getattr(output, "loss", None)
            if isinstance(loss, torch.Tensor):
                return loss
            raise AdapterError("with model.batch, the model must return a scalar loss (or .loss), or give "
                               "model.loss: pkg.module:loss_fn")
        return default_loss(output, batch[1])

    def own_optimizer(self) -> Any | None:
        """None: memopt makes the spec's optimizer."""
        return None

    def loss_through_root(self) -> None:
        """Nothing to do: ``loss`` calls the root module."""

    def logits(self, batch: Any) -> torch.Tensor:
        return output_logits(self._call(batch))

    def make_cache(self, plan: Any, batch: int, positions: int, on_new: Any) -> Any:
        raise AdapterError(f"memopt does not know how {type(self.model).__name__} caches keys and values")

    def next_logits(self, tokens: torch.Tensor, cache: Any | None, start: int) -> torch.Tensor:
        raise AdapterError(f"memopt does not know how {type(self.model).__name__} generates")

    def skip_cache_to(self, cache: Any, length: int) -> None:
        raise AdapterError(f"memopt does not know how {type(self.model).__name__} caches keys and values")
