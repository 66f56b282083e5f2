"""Measure a training run: build, warm-up step, tracked steady-state steps -> RunResult. Never prints."""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time

import torch

from memopt.core._torch_private import flop_counter
from memopt.core.errors import OutOfMemory
from memopt.core.results import RunResult
from memopt.engine.devices import block_size, limit_watch, sync
from memopt.engine.step import (
    TRACED_MICRO_BATCHES,
    Progress,
    Session,
    add_strategy_facts,
    create_optimizer_state,
    prepare,
    save_gradients,
    train_step,
)
from memopt.measure.tracker import ModelWatch, TensorTracker, host_peaks
from memopt.model.transformer import count_parameters
from memopt.spec import Spec


def measure_training(spec: Spec, name: str, *, timeline: bool = False, stacks: bool = False,
                     device_memory: int | None = None, progress: Progress | None = None, grads_to: str | None = None,
                     fake: bool = False) -> RunResult:
    """A warm-up step, then ``train.steps`` tracked steps (under fake tensors: optimizer state made without a
    step, then one traced step). Raises MemoptError (OutOfMemory naming the stage and phase)."""
    say = progress or (lambda _msg: None)
    where = _Stage("model build")
    try:
        session, result = _warmed_up(spec, name, device_memory, say, grads_to, fake, where)
        tracker = where.tracker = TensorTracker(session.device, timeline=timeline, stacks=stacks,
                                                limit_bytes=device_memory, round_to=block_size(session.target_device),
                                                unshard=any(s.unshards for s in session.strategies))
        with host_peaks(session.device, python_heap=not fake) as host, tracker:
            _measured_steps(session, result, tracker, say, fake, where)
        result.host = host
        result.memory = tracker.result()
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not isinstance(exc, torch.OutOfMemoryError) and not (
                "can't allocate memory" in str(exc) or "out of memory" in str(exc)):
            raise
        raise OutOfMemory(f"out of memory during the {where}: {str(exc).splitlines()[0]}") from exc
    result.step_time_s = statistics.median(result.step_times_s)
    add_strategy_facts(session, result)
    for strategy in session.strategies:
        strategy.close()
    if not fake and not math.isfinite(result.loss):
        result.warnings.append(f"the loss is {result.loss} (not finite): the numbers are of a diverged step"
                               + (" (float16 overflows on CPU; use bfloat16 or float32)"
                                  if spec.run.dtype == "float16" else ""))
    return result


class _Stage:
    """Where the run is, for an out-of-memory message: the stage, and the phase once steps are measured."""

    def __init__(self, stage: str):
        self.stage = stage
        self.tracker: TensorTracker | None = None

    def __str__(self) -> str:
        if self.tracker is not None and self.stage == "measured step":
            return f"{self.stage}, {self.tracker.phase}"
        return self.stage


def _warmed_up(spec: Spec, name: str, device_memory: int | None, say: Progress, grads_to: str | None, fake: bool,
               where: _Stage) -> tuple[Session, RunResult]:
    """The session built and stepped once (its optimizer state exists), under ``--device-memory`` when given."""
    with limit_watch(spec, device_memory, fake, where.stage) as watch_limit:
        say(f"{name}: building the model" + (" (fake tensors)" if fake else ""))
        session = prepare(spec, fake=fake)
        total, trainable = count_parameters(session.model)
        result = RunResult(name=name, strategies=[s.to_dict() for s in spec.strategies],
                           device=session.target_device, estimated=fake, params_total=total,
                           params_trainable=trainable)
        where.stage = "warm-up step"
        if watch_limit is not None:
            watch_limit.stage = where.stage
        if fake and spec.world_size == 1:
            say(f"{name}: creating optimizer state")
            create_optimizer_state(session)  # what a warm-up step leaves behind, without tracing one
        elif fake:  # FSDP/DDP keep buffers from one step into the next: trace a warm-up step as it runs
            say(f"{name}: traced warm-up step")
            train_step(session, step=0)
        else:
            say(f"{name}: warm-up step")
            train_step(session, step=0, before_step=save_gradients(grads_to) if grads_to else None)
            sync(session.device)
    return session, result


def _measured_steps(session: Session, result: RunResult, tracker: TensorTracker, say: Progress, fake: bool,
                    where: _Stage) -> None:
    """``train.steps`` steps under the tracker (one when traced: a traced step is the same every time): the loss,
    step times and, traced, the FLOPs of all micro-batches."""
    watch = ModelWatch(tracker, session.model, session.optimizer)
    try:
        steps = 1 if fake else session.spec.train.steps
        for i in range(steps):
            say(f"{result.name}: {'traced' if fake else 'measured'} step {i + 1}/{steps}")
            # From a collected heap: what earlier steps left in reference cycles (Keras's tree utilities leave
            # tensors in some) is not counted, and the collector then runs at the same points of every step.
            gc.collect()
            tracker.begin_step()
            where.stage = "measured step"
            start = time.perf_counter()
            with flop_counter() if fake else contextlib.nullcontext() as flops:
                result.loss = train_step(session, tracker, watch, step=0)
            if flops is not None:  # fake: scale to all micro-batches (only the first two were traced)
                k = session.plan.micro_batches
                result.flops = flops.get_total_flops() * k // min(k, TRACED_MICRO_BATCHES)
            sync(session.device)
            result.step_times_s.append(time.perf_counter() - start)
    finally:
        watch.close()
