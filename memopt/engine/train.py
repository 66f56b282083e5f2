"""Measure a training run: build, warm-up step, tracked steady-state steps -> RunResult. Never prints."""

from __future__ import annotations

import contextlib
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
    create_optimizer_state,
    prepare,
    save_gradients,
    train_step,
)
from memopt.measure.tracker import ModelWatch, TensorTracker, host_peaks
from memopt.model.transformer import count_parameters
from memopt.spec import Spec


def measure_training(spec: Spec, name: str, *, timeline: bool = False, device_memory: int | None = None,
                     progress: Progress | None = None, grads_to: str | None = None, fake: bool = False) -> RunResult:
    """A warm-up step, then ``train.steps`` tracked steps (under fake tensors: optimizer state made without a
    step, then one traced step). Raises MemoptError (OutOfMemory naming the stage and phase)."""
    say = progress or (lambda _msg: None)
    stage = "model build"
    tracker = None
    try:
        with limit_watch(spec, device_memory, fake, stage) as watch_limit:
            say(f"{name}: building the model" + (" (fake tensors)" if fake else ""))
            session = prepare(spec, fake=fake)
            model = session.model
            total, trainable = count_parameters(model)
            result = RunResult(name=name, strategies=[s.to_dict() for s in spec.strategies],
                               device=session.target_device, estimated=fake, params_total=total,
                               params_trainable=trainable)
            stage = "warm-up step"
            if watch_limit is not None:
                watch_limit.stage = stage
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
        tracker = TensorTracker(session.device, timeline=timeline, limit_bytes=device_memory,
                                round_to=block_size(session.target_device),
                                unshard=any(s.unshards for s in session.strategies))
        with host_peaks(session.device, python_heap=not fake) as host:
            with tracker:
                watch = ModelWatch(tracker, model, session.optimizer)
                try:
                    steps = 1 if fake else spec.train.steps  # a traced step is the same every time
                    for i in range(steps):
                        say(f"{name}: {'traced' if fake else 'measured'} step {i + 1}/{steps}")
                        tracker.begin_step()
                        stage = "measured step"
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
        result.host = host
        result.memory = tracker.result()
    except OutOfMemory:
        raise
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not isinstance(exc, torch.OutOfMemoryError) and not (
                "can't allocate memory" in str(exc) or "out of memory" in str(exc)):
            raise
        where = f"{stage}, {tracker.phase}" if tracker is not None and stage == "measured step" else stage
        raise OutOfMemory(f"out of memory during the {where}: {str(exc).splitlines()[0]}") from exc
    result.step_time_s = statistics.median(result.step_times_s)
    for strategy in session.strategies:
        facts = strategy.report()
        if facts:
            result.strategy_facts[strategy.name] = facts
        strategy.close()
    result.notes.extend(session.plan.notes)
    if not fake and not math.isfinite(result.loss):
        result.warnings.append(f"the loss is {result.loss} (not finite): the numbers are of a diverged step"
                               + (" (float16 overflows on CPU; use bfloat16 or float32)"
                                  if spec.run.dtype == "float16" else ""))
    return result
