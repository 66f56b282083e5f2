"""``--mode infer`` and ``--mode generate``: the deployment side. Never prints.

- infer: one forward pass of train.batch_size x train.seq_len tokens under ``torch.inference_mode()``.
- generate: the prefill of ``generate.prompt_len`` prompt tokens gives the first greedy token (its logits are
  computed for the last position only, as a server does), then ``new_tokens - 1`` decode steps of one token
  each, with the KV cache the plan names. Phases ``prefill`` and ``decode``; categories params, buffers,
  kv_cache (what the cache allocates to hold keys and values) and temporaries.

Each run is a warm-up generation then ``train.steps`` measured ones. Under fake tensors (estimate) the first
and the last chunk of a chunked prefill and the first and last decode step are traced (the cache skipped
ahead in between): memory only grows with the position, so the last step holds each phase's peak.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from memopt.core._torch_private import in_fake_mode
from memopt.core.errors import OutOfMemory
from memopt.core.results import Category, RunResult
from memopt.engine.devices import block_size, limit_watch, sync
from memopt.engine.step import Progress, add_strategy_facts, make_batch, phase, prepare, reporting_to
from memopt.measure.tracker import ModelWatch, TensorTracker, host_peaks
from memopt.model.transformer import count_parameters
from memopt.spec import Spec


@dataclass
class Generation:
    """What one greedy generation produced and how long its phases took."""

    tokens: torch.Tensor                    # (batch, new_tokens)
    logits: list[torch.Tensor] = field(default_factory=list)  # per generated token (batch, vocab), if kept
    prefill_s: float = 0.0
    decode_s: float = 0.0


def prompt_batch(spec: Spec, device: str, step: int = 0) -> torch.Tensor:
    """(batch, prompt_len) token ids: seeded random, or the text file's tokens."""
    train = spec.train.model_copy(update={"seq_len": spec.generate.prompt_len})
    batch = make_batch(spec.model_copy(update={"train": train}), device, step)
    return batch[0]


def _traced(steps: list[int], fake: bool) -> list[int]:
    """All the steps, or under fake tensors the first, the last but one and the last: the middle ones repeat
    with less memory (a step's memory grows with its position), and a prefill's last chunk may be shorter."""
    return steps if not fake or len(steps) <= 3 else [steps[0], steps[-2], steps[-1]]


def generate(session: Any, prompt: torch.Tensor, tracker: TensorTracker | None = None,
             keep_logits: bool = False, feed: torch.Tensor | None = None) -> Generation:
    """Greedy generation of ``generate.new_tokens`` tokens after ``prompt`` with the session's KV cache; with
    ``feed`` (batch, new_tokens - 1) those tokens are fed instead of the greedy ones (teacher forcing: the
    logits of a known continuation through the same cache)."""
    adapter, plan, gen = session.adapter, session.plan, session.spec.generate
    fake = in_fake_mode()
    batch, prompt_len = prompt.shape
    out = Generation(tokens=prompt[:, :0])

    def on_new(t: torch.Tensor) -> None:
        session.saved.mark(t, Category.KV_CACHE)

    with phase(tracker, "prefill"):
        began = time.perf_counter()
        cache = adapter.make_cache(plan.kv, batch, gen.positions, on_new)
        chunk = plan.prefill_chunk or prompt_len
        starts = list(range(0, prompt_len, chunk))
        previous = -chunk
        for start in _traced(starts, fake):
            if start != previous + chunk:  # estimates jump ahead
                adapter.skip_cache_to(cache, start)
            previous = start
            logits = adapter.next_logits(prompt[:, start:start + chunk], cache, start)
        token = logits.argmax(-1)
        sync(session.device)
        out.prefill_s = time.perf_counter() - began
    tokens, kept = [token], [logits.float()] if keep_logits else []
    del logits
    with phase(tracker, "decode"):
        began = time.perf_counter()
        positions = list(range(prompt_len, prompt_len + gen.new_tokens - 1))
        for position in _traced(positions, fake):
            if position != prompt_len + len(tokens) - 1:  # estimates jump ahead
                adapter.skip_cache_to(cache, position)
            fed = token if feed is None else feed[:, position - prompt_len]
            logits = adapter.next_logits(fed[:, None], cache, position)
            token = logits.argmax(-1)
            tokens.append(token)
            if keep_logits:
                kept.append(logits.float())
            del logits
        sync(session.device)
        out.decode_s = time.perf_counter() - began
    if tracker is not None:
        tracker.record_state()  # the cache as the generation leaves it
    out.tokens, out.logits = torch.stack(tokens, dim=1), kept
    return out


def greedy_without_cache(session: Any, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The same greedy tokens, each recomputed from the whole sequence (the reference a cache must match)."""
    sequence = prompt
    with torch.inference_mode():
        for _ in range(new_tokens):
            token = session.adapter.next_logits(sequence, None, 0).argmax(-1)
            sequence = torch.cat([sequence, token[:, None]], dim=1)
    return sequence[:, prompt.shape[1]:]


def measure_inference(spec: Spec, name: str, *, timeline: bool = False, stacks: bool = False,
                      device_memory: int | None = None, progress: Progress | None = None, grads_to: str | None = None,
                      fake: bool = False) -> RunResult:
    """Measure one infer/generate spec: a warm-up pass, then ``train.steps`` measured ones (``grads_to``: unused,
    nothing trains)."""
    say = progress or (lambda _msg: None)
    session = None
    try:
        with torch.inference_mode(), limit_watch(spec, device_memory, fake, "model build") as watch_limit:
            say(f"{name}: building the model" + (" (fake tensors)" if fake else ""))
            session = prepare(spec, fake=fake)
            if not fake:
                say(f"{name}: warm-up {'generation' if spec.run.mode == 'generate' else 'pass'}")
                if watch_limit is not None:
                    watch_limit.stage = f"warm-up {spec.run.mode}"
                _one_pass(session, None)
                sync(session.device)
        return _measure(spec, name, session, timeline, stacks, device_memory, say, fake)
    finally:
        for strategy in session.strategies if session is not None else ():
            strategy.close()  # temporary files of the weights' disk tier, also when the run fails


def _one_pass(session: Any, tracker: TensorTracker | None) -> Generation | None:
    """One generation (generate) or one forward pass (infer) of the spec's batch."""
    spec = session.spec
    if spec.run.mode == "generate":
        return generate(session, prompt_batch(spec, session.device), tracker)
    with phase(tracker, "forward"):
        session.adapter.logits(make_batch(spec, session.device))  # every position's logits, let go at once
    return None


def _measure(spec: Spec, name: str, session: Any, timeline: bool, stacks: bool, device_memory: int | None,
             say: Progress, fake: bool) -> RunResult:
    """The measured passes under the tracker; the run's result."""
    mode = spec.run.mode
    total, _ = count_parameters(session.model)  # nothing trains
    result = RunResult(name=name, strategies=[s.to_dict() for s in spec.strategies],
                       device=session.target_device, estimated=fake, params_total=total)
    with torch.inference_mode():
        tracker = TensorTracker(session.device, timeline=timeline, stacks=stacks, limit_bytes=device_memory, mode=mode,
                                round_to=block_size(session.target_device))
        runs: list[Generation] = []
        try:
            reporting = reporting_to(session.saved, tracker)
            with host_peaks(session.device, python_heap=not fake) as host, tracker, reporting:
                watch = ModelWatch(tracker, session.model, None)
                try:
                    steps = 1 if fake else spec.train.steps
                    for i in range(steps):
                        say(f"{name}: {'traced' if fake else 'measured'} {mode} {i + 1}/{steps}")
                        tracker.begin_step()
                        began = time.perf_counter()
                        generation = _one_pass(session, tracker)
                        sync(session.device)
                        result.step_times_s.append(time.perf_counter() - began)
                        if generation is not None:
                            runs.append(generation)
                finally:
                    watch.close()
        except (torch.OutOfMemoryError, MemoryError) as exc:
            raise OutOfMemory(f"out of memory during {tracker.phase}: {str(exc).splitlines()[0]}") from exc
    result.host = host
    result.memory = tracker.result()
    result.step_time_s = statistics.median(result.step_times_s)
    result.inference = _facts(spec, result, runs, fake)
    add_strategy_facts(session, result)
    return result


def _facts(spec: Spec, result: RunResult, runs: list[Generation], fake: bool) -> dict[str, Any]:
    """The inference fields of the run: shapes, the cache's bytes, time to first token, tokens per second."""
    mem = result.memory
    assert mem is not None
    batch = spec.train.batch_size
    if spec.run.mode == "infer":
        facts: dict[str, Any] = {"mode": "infer", "batch_size": batch, "seq_len": spec.train.seq_len}
        if not fake:
            facts["tokens_per_s"] = batch * spec.train.seq_len / result.step_time_s
        return facts
    gen = spec.generate
    final = mem.state_bytes.get("kv_cache", 0)
    facts = {"mode": "generate", "batch_size": batch, "prompt_len": gen.prompt_len, "new_tokens": gen.new_tokens,
             "cache": gen.cache, "cache_positions": gen.positions, "kv_cache_bytes": final,
             "kv_cache_peak_bytes": mem.category_peak_bytes.get("kv_cache", 0),
             "growth_bytes": mem.category_peak_bytes.get("kv_cache", 0) - final}
    if not fake and runs:
        prefill = statistics.median(r.prefill_s for r in runs)
        decode = statistics.median(r.decode_s for r in runs)
        facts["time_to_first_token_s"] = prefill
        facts["decode_tokens_per_s"] = batch * (gen.new_tokens - 1) / decode if decode > 0 else None
    return facts
