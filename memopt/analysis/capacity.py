"""``memopt estimate --mode generate --fits SIZE``: how many sequences, and how long, fit in SIZE.

Two searches on estimates (fake tensors, nothing allocated): the largest batch at the spec's prompt_len and
new_tokens, and the longest context (prompt_len grown, new_tokens kept) at the spec's batch size. A peak only
grows with the batch and the context, so each is a search for the last size under the budget: secant guesses
(the peak is close to linear in both) kept inside a bisection bracket, so a few estimates answer.

Beside it, the formula answer a calculator gives: parameters x bytes + the KV cache formula
2 x layers x kv_heads x head_dim x positions x batch x bytes, with nothing for the prefill's working set.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memopt.adapters.build import parameter_total
from memopt.analysis.estimate import estimate
from memopt.analysis.theory import kv_bytes_per_position
from memopt.core.errors import MemoptError
from memopt.core.units import format_bytes
from memopt.spec import DTYPE_BYTES, Spec
from memopt.strategies import registry

MAX_BATCH = 2**20  # train.batch_size's own limit


@dataclass
class Capacity:
    """The answers: each (size, its estimated peak), None when not even the smallest fits."""

    budget: int
    batch: tuple[int, int] | None = None      # largest batch at prompt_len + new_tokens
    context: tuple[int, int] | None = None    # longest prompt_len + new_tokens at the spec's batch
    context_limit: int = 0                    # the model's max_seq_len (the search's ceiling)
    estimates: int = 0
    seconds: float = 0.0
    formula: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget,
                "max_batch": self.batch[0] if self.batch else 0,
                "max_batch_peak_bytes": self.batch[1] if self.batch else None,
                "max_context": self.context[0] if self.context else 0,
                "max_context_peak_bytes": self.context[1] if self.context else None,
                "context_limit": self.context_limit, "estimates": self.estimates, "search_s": self.seconds,
                "formula": self.formula}


def formula_capacity(spec: Spec, budget: int) -> dict[str, Any]:
    """The calculator's answers: params x bytes + KV formula, against the same budget."""
    weights = parameter_total(spec.model) * DTYPE_BYTES[spec.run.dtype]
    per_position = kv_bytes_per_position(spec)
    gen, batch = spec.generate, spec.train.batch_size
    room = budget - weights
    max_batch = max(room // (per_position * gen.positions), 0)
    max_context = min(max(room // (per_position * batch), 0), spec.model.max_seq_len)
    return {"weights_bytes": weights, "kv_bytes": per_position * gen.positions * batch,
            "peak_bytes": weights + per_position * gen.positions * batch,
            "max_batch": int(max_batch), "max_context": int(max_context) if max_context > gen.new_tokens else 0}


def at_shape(spec: Spec, batch: int | None = None, prompt_len: int | None = None) -> Spec:
    """The spec at another batch size or prompt length; strategies with nothing to do at that shape (a prefill
    chunk as long as the prompt, a window holding every position) are left out, as the run would compute the same."""
    train = spec.train.model_copy(update={"batch_size": batch}) if batch is not None else spec.train
    gen = spec.generate.model_copy(update={"prompt_len": prompt_len}) if prompt_len is not None else spec.generate
    shaped = spec.model_copy(update={"train": train, "generate": gen})
    known = registry()
    return shaped.with_strategies(s for s in spec.strategies if not known[s.name].idle_at(s.options, shaped))


def largest_fitting(peak_at: Callable[[int], int], low: int, high: int, budget: int) -> tuple[int, int] | None:
    """The largest n in [low, high] whose peak_at(n) <= budget (peak_at grows with n), and its peak."""
    if peak_at(low) > budget:
        return None
    if peak_at(high) <= budget:
        return high, peak_at(high)
    good, bad = low, high
    secant = True
    while bad - good > 1:
        p_good, p_bad = peak_at(good), peak_at(bad)
        if secant and p_bad > p_good:
            guess = good + int((budget - p_good) * (bad - good) / (p_bad - p_good))
        else:
            guess = (good + bad) // 2
        guess = min(max(guess, good + 1), bad - 1)
        if peak_at(guess) <= budget:
            good = guess
        else:
            bad = guess
        secant = not secant or bad - good <= 2  # a bisection step every other time: no slow one-sided crawl
    return good, peak_at(good)


def capacity(spec: Spec, budget: int, progress: Callable[[str], None] | None = None) -> Capacity:
    """The largest batch and the longest context that fit in ``budget``, by estimates."""
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    gen = spec.generate
    out = Capacity(budget, context_limit=spec.model.max_seq_len, formula=formula_capacity(spec, budget))
    peaks: dict[tuple[int, int], int] = {}

    def peak(batch: int, prompt_len: int) -> int:
        key = (batch, prompt_len)
        if key not in peaks:
            say(f"--fits: estimating {batch} x ({prompt_len} + {gen.new_tokens})")
            result = estimate(at_shape(spec, batch, prompt_len), f"{batch}x{prompt_len}")
            assert result.memory is not None
            peaks[key] = result.memory.peak_bytes
            out.estimates += 1
        return peaks[key]

    one, two = peak(1, gen.prompt_len), peak(2, gen.prompt_len)
    slope = max(two - one, 1)
    ceiling = min(MAX_BATCH, max(2, 2 * (1 + (budget - one) // slope)))  # twice the linear guess, a bracket
    out.batch = largest_fitting(lambda b: peak(b, gen.prompt_len), 1, ceiling, budget)
    longest_prompt = spec.model.max_seq_len - gen.new_tokens
    if longest_prompt >= 1:
        found = largest_fitting(lambda p: peak(spec.train.batch_size, p), 1, longest_prompt, budget)
        out.context = (found[0] + gen.new_tokens, found[1]) if found else None
    out.seconds = time.perf_counter() - started
    return out


def nothing_fits(spec: Spec, cap: Capacity, fit: Any, budget_text: str) -> MemoptError:
    """The error for a --fits that nothing satisfies (every single strategy tried): what the smallest shapes
    need, against the budget."""
    return MemoptError(f"--fits {budget_text}: nothing fits: even 1 sequence of {spec.generate.prompt_len} + "
                       f"{spec.generate.new_tokens} tokens (and {spec.train.batch_size} of 1 + "
                       f"{spec.generate.new_tokens}) needs more; the weights alone are "
                       f"{format_bytes(cap.formula['weights_bytes'])}, and none of the {fit.tried} single strategies "
                       "brings it under")
