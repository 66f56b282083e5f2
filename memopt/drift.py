"""Accuracy drift of a lossy strategy: the changed model against the unchanged one, on the same batch."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from memopt.model import LanguageModel, build_model
from memopt.spec import Spec


@torch.no_grad()
def measure_drift(spec: Spec, model: LanguageModel, tokens: torch.Tensor, targets: torch.Tensor,
                  device: str, contexts: Sequence[Callable[[], Any]] = ()) -> dict[str, float]:
    """Relative error of the logits (||changed - ref|| / ||ref||) and the loss difference, before any step.

    The reference is rebuilt from the same seed, so both start from identical weights; the batch is
    walked one sequence at a time so that only one sequence's logits exist at once.
    """
    torch.manual_seed(spec.run.seed)
    reference = build_model(spec.model, spec.run.dtype, device)
    was_training = model.training
    model.eval()
    reference.eval()
    diff2 = ref2 = loss_ref = loss_new = 0.0
    for tok, tgt in zip(tokens.split(1), targets.split(1)):
        ref = reference.logits(tok).float().flatten(0, 1)                         # s, vocab
        with contextlib.ExitStack() as stack:  # the strategies' step contexts (autocast for amp)
            for make_context in contexts:
                stack.enter_context(make_context())
            new = model.logits(tok).float().flatten(0, 1)
        diff2 += (new - ref).pow(2).sum().item()
        ref2 += ref.pow(2).sum().item()
        loss_ref += F.cross_entropy(ref, tgt.flatten(), reduction="sum").item()
        loss_new += F.cross_entropy(new, tgt.flatten(), reduction="sum").item()
    model.train(was_training)
    n = targets.numel()
    return {"logits_rel_error": math.sqrt(diff2 / ref2) if ref2 else 0.0, "loss_delta": (loss_new - loss_ref) / n}
