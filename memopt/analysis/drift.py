"""Accuracy drift of lossy strategies: the changed model against the unchanged one, on the same batch.

Where a strategy's cost shows decides when it is measured:

- weights and compute (quant, prune, amp): before any training step, on the first batch;
- optimizer state (optim8bit): the weights are unchanged until the optimizer steps, so both models train
  ``DRIFT_STEPS`` identical steps (same batches) and are then compared on a batch neither has seen.

With a held-out text (``train.held_out``) both models are also scored on it, the text the model did not train on:
the mean next-token loss over its first ``HELD_OUT_ROWS`` windows of seq_len + 1 tokens (in generation: the
prompts are held-out text and the loss is that of its continuation, fed through the KV cache), and
``held_out_loss_increase`` is the changed model's loss over the unchanged one's, minus 1. On trained weights
(scripts/train_reference.py) this is the accuracy a user gives up; on random weights it is noise.

Each measurement builds its own models, before the profiled run is built.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from memopt.adapters import ModelAdapter
from memopt.adapters.build import build_adapter
from memopt.core.errors import MemoptError
from memopt.engine.data import held_out_rows
from memopt.engine.inference import generate, prompt_batch
from memopt.engine.step import make_batch, prepare, split_batch, train_step
from memopt.spec import KerasModelSpec, PythonModelSpec, Spec
from memopt.strategies import lossy

DRIFT_STEPS = 3  # identical training steps before comparing, for strategies whose cost shows in training
HELD_OUT_ROWS = 16  # windows of the held-out text each model is scored on


@torch.no_grad()
def measure_drift(spec: Spec, model: ModelAdapter, batch: Any, device: str, contexts: Sequence[Callable[[], Any]] = (),
                  reference: ModelAdapter | None = None) -> dict[str, float]:
    """Relative error of the logits (||changed - ref|| / ||ref||) and the loss difference.

    The reference is rebuilt from the same seed unless given, so both start from identical weights; the
    batch is walked one sequence at a time so that only one sequence's logits exist at once. The loss is
    cross-entropy of the logits against the targets, or the model's own loss for a batch of its own.
    """
    if reference is None:
        torch.manual_seed(spec.run.seed)
        reference = build_adapter(spec, device)
    was_training = model.model.training
    model.model.eval()
    reference.model.eval()
    diff2 = ref2 = loss_ref = loss_new = 0.0
    pieces = split_batch(batch, spec.train.batch_size)
    own_loss = isinstance(spec.model, (PythonModelSpec, KerasModelSpec))  # a factory's model: the loss it brings
    tokens_and_targets = isinstance(batch, tuple) and len(batch) == 2 and not own_loss
    for piece in pieces:
        with contextlib.ExitStack() as stack:  # the strategies' step contexts (autocast for amp)
            ref = reference.logits(piece).float().flatten(0, -2)                      # s, vocab
            for make_context in contexts:
                stack.enter_context(make_context())
            new = model.logits(piece).float().flatten(0, -2)
            if not tokens_and_targets:
                loss_new += float(model.loss(piece)) / len(pieces)
        if not tokens_and_targets:
            loss_ref += float(reference.loss(piece)) / len(pieces)
        diff2 += (new - ref).pow(2).sum().item()
        ref2 += ref.pow(2).sum().item()
        if tokens_and_targets:
            target = piece[1].flatten()
            loss_ref += F.cross_entropy(ref, target, reduction="sum").item() / batch[1].numel()
            loss_new += F.cross_entropy(new, target, reduction="sum").item() / batch[1].numel()
    model.model.train(was_training)
    return {"logits_rel_error": math.sqrt(diff2 / ref2) if ref2 else 0.0, "loss_delta": loss_new - loss_ref}


def drift_of(spec: Spec, announce: Callable[[], None] | None = None) -> dict[str, float] | None:
    """The drift of the spec's lossy strategies (None when it has none), measured in this process: strategies that
    spread the run over ranks are left out (they move bytes, not numbers). ``announce`` is called before."""
    if not lossy(spec):
        return None
    if announce is not None:
        announce()
    alone = spec.with_strategies(s for s in spec.strategies if not s.on_ranks)
    return strategy_drift(alone) if spec.run.mode == "train" else inference_drift(alone)


def strategy_drift(spec: Spec) -> dict[str, float] | None:
    """The drift of the spec's strategies (None when none is lossy); ``after_steps`` says when it was taken."""
    session = prepare(spec)
    if not any(s.lossy for s in session.strategies):
        return None
    steps = DRIFT_STEPS if any(s.drift_shows_in_training for s in session.strategies if s.lossy) else 0
    reference = None
    if steps:
        unchanged = prepare(spec.with_strategies(()))
        for step in range(steps):
            train_step(session, step=step)
            train_step(unchanged, step=step)
        reference = unchanged.adapter
    batch = make_batch(spec, session.device, step=steps)  # after training: a batch neither has seen
    if reference is None:
        torch.manual_seed(spec.run.seed)
        reference = build_adapter(spec, session.device)
    drift = measure_drift(spec, session.adapter, batch, session.device, session.plan.contexts, reference)
    if spec.train.held_out is not None:
        drift.update(held_out_drift(spec, session.adapter, reference, session.device, session.plan.contexts))
    return {**drift, "after_steps": steps}


def _check_held_out(spec: Spec) -> None:
    if isinstance(spec.model, PythonModelSpec):
        raise MemoptError("train.held_out: the held-out loss is read from the model's logits, which memopt finds in "
                          "its own and Hugging Face models, not in a python: model")


def _held_out(new: float, ref: float, rows: int, tokens: int) -> dict[str, float]:
    return {"held_out_loss": new, "held_out_loss_ref": ref, "held_out_loss_increase": new / ref - 1 if ref else 0.0,
            "held_out_perplexity": math.exp(min(new, 700.0)), "held_out_rows": rows, "held_out_tokens": tokens}


@torch.no_grad()
def held_out_drift(spec: Spec, model: ModelAdapter, reference: ModelAdapter, device: str,
                   contexts: Sequence[Callable[[], Any]] = ()) -> dict[str, float]:
    """Both models' mean next-token loss on the held-out text, one window at a time."""
    _check_held_out(spec)
    rows = held_out_rows(spec, device, HELD_OUT_ROWS, spec.train.seq_len + 1)
    was_training = model.model.training
    model.model.eval()
    reference.model.eval()
    new = ref = 0.0
    for row in rows.split(1):
        inputs, target = row[:, :-1], row[:, 1:].flatten()
        ref += F.cross_entropy(reference.logits((inputs, row[:, 1:])).float().flatten(0, -2), target).item()
        with contextlib.ExitStack() as stack:
            for make_context in contexts:
                stack.enter_context(make_context())
            new += F.cross_entropy(model.logits((inputs, row[:, 1:])).float().flatten(0, -2), target).item()
    model.model.train(was_training)
    return _held_out(new / len(rows), ref / len(rows), len(rows), len(rows) * spec.train.seq_len)


def inference_drift(spec: Spec) -> dict[str, float] | None:
    """Drift of an infer/generate run's lossy strategies against the unchanged model (static cache, no strategy).

    infer: the logits of the same batch, as in training. generate: both models generate greedily from the same
    prompt; ``tokens_differ`` is the share of generated tokens that differ, ``logits_rel_error`` the logits'
    relative error over each sequence's steps up to its first different token (after that the two models
    continue different texts, and their logits are not comparable).
    """
    if spec.run.mode == "infer":
        return strategy_drift(spec)
    held: dict[str, float] = {}
    with torch.inference_mode():
        session = prepare(spec)
        if not any(s.lossy for s in session.strategies):
            return None
        prompt, continuation = prompt_batch(spec, session.device), None
        if spec.train.held_out is not None:
            _check_held_out(spec)
            gen = spec.generate
            rows = held_out_rows(spec, session.device, spec.train.batch_size, gen.prompt_len + gen.new_tokens)
            prompt, continuation = rows[:, :gen.prompt_len], rows[:, gen.prompt_len:]
        changed = generate(session, prompt, keep_logits=True)
        forced = generate(session, prompt, keep_logits=True, feed=continuation) if continuation is not None else None
        del session
        unchanged = prepare(spec.with_strategies(()))
        reference = generate(unchanged, prompt, keep_logits=True)
        if continuation is not None and forced is not None:
            forced_ref = generate(unchanged, prompt, keep_logits=True, feed=continuation)
            loss_new, loss_ref = (F.cross_entropy(torch.stack(g.logits, 1).flatten(0, 1), continuation.flatten()).item()
                                  for g in (forced, forced_ref))
            held = _held_out(loss_new, loss_ref, len(prompt), continuation.numel())
    differ = changed.tokens != reference.tokens                                   # b, new_tokens
    first = torch.where(differ.any(1), differ.float().argmax(1), differ.shape[1] - 1)  # b: last comparable step
    diff2 = ref2 = 0.0
    for step, (new, ref) in enumerate(zip(changed.logits, reference.logits)):
        rows = first >= step
        diff2 += (new[rows] - ref[rows]).pow(2).sum().item()
        ref2 += ref[rows].pow(2).sum().item()
    return {"logits_rel_error": math.sqrt(diff2 / ref2) if ref2 else 0.0,
            "tokens_differ": differ.float().mean().item(), "loss_delta": 0.0, "after_steps": 0, **held}
