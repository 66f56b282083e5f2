"""Accuracy drift of lossy strategies: the changed model against the unchanged one, on the same batch.

Where a strategy's cost shows decides when it is measured:

- weights and compute (quant, prune, amp): before any training step, on the first batch;
- optimizer state (optim8bit): the weights are unchanged until the optimizer steps, so both models train
  ``DRIFT_STEPS`` identical steps (same batches) and are then compared on a batch neither has seen.

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
from memopt.engine.inference import generate, prompt_batch
from memopt.engine.step import make_batch, prepare, split_batch, train_step
from memopt.spec import PythonModelSpec, Spec
from memopt.strategies import lossy

DRIFT_STEPS = 3  # identical training steps before comparing, for strategies whose cost shows in training


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
    tokens_and_targets = isinstance(batch, tuple) and len(batch) == 2 and not isinstance(spec.model, PythonModelSpec)
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
    drift = measure_drift(spec, session.adapter, batch, session.device, session.plan.contexts, reference)
    return {**drift, "after_steps": steps}


def inference_drift(spec: Spec) -> dict[str, float] | None:
    """Drift of an infer/generate run's lossy strategies against the unchanged model (static cache, no strategy).

    infer: the logits of the same batch, as in training. generate: both models generate greedily from the same
    prompt; ``tokens_differ`` is the share of generated tokens that differ, ``logits_rel_error`` the logits'
    relative error over each sequence's steps up to its first different token (after that the two models
    continue different texts, and their logits are not comparable).
    """
    if spec.run.mode == "infer":
        return strategy_drift(spec)
    with torch.inference_mode():
        session = prepare(spec)
        if not any(s.lossy for s in session.strategies):
            return None
        prompt = prompt_batch(spec, session.device)
        changed = generate(session, prompt, keep_logits=True)
        del session
        reference = generate(prepare(spec.with_strategies(())), prompt, keep_logits=True)
    differ = changed.tokens != reference.tokens                                   # b, new_tokens
    first = torch.where(differ.any(1), differ.float().argmax(1), differ.shape[1] - 1)  # b: last comparable step
    diff2 = ref2 = 0.0
    for step, (new, ref) in enumerate(zip(changed.logits, reference.logits)):
        rows = first >= step
        diff2 += (new[rows] - ref[rows]).pow(2).sum().item()
        ref2 += ref[rows].pow(2).sum().item()
    return {"logits_rel_error": math.sqrt(diff2 / ref2) if ref2 else 0.0,
            "tokens_differ": differ.float().mean().item(), "loss_delta": 0.0, "after_steps": 0}
