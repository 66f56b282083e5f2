"""``memopt estimate``: the profile report without allocating, by tracing the same step on fake tensors.

The model is built under FakeTensorMode (shapes and dtypes, no storage) and the very same training
step runs under the very same tracker, so the estimate is the measurement without the memory.
For ``--device cuda`` on a machine without CUDA the step is traced with the CPU kernels and each
storage rounded to the CUDA caching allocator's 512-byte blocks; not included: the CUDA context
(~300-600 MiB outside PyTorch's allocator), cuBLAS/cuDNN workspaces, the allocator's reserve and
fragmentation (``max_memory_reserved`` - ``max_memory_allocated``), and CUDA-only attention kernels'
small extra saved tensors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memopt.adapters.build import parameter_total
from memopt.analysis.search import candidate_settings
from memopt.analysis.theory import kv_bytes_per_position
from memopt.core.errors import MemoptError
from memopt.core.results import RunResult
from memopt.engine.devices import resolve_device
from memopt.engine.run import run
from memopt.spec import DTYPE_BYTES, HfModelSpec, KerasModelSpec, PythonModelSpec, Spec
from memopt.strategies import StrategySpec, shards_model_states

DEADLINE_S = 60.0  # --fits: how long to look for single strategies that would make it fit
APPROXIMATIONS = ("CUDA estimates trace CPU kernels with 512-byte block rounding; the CUDA context, library "
                  "workspaces and allocator reserve/fragmentation are not included")


def estimate(spec: Spec, name: str = "baseline", progress: Callable[[str], None] | None = None, *,
             timeline: bool = False, stacks: bool = False) -> RunResult:
    """The profile of ``spec`` from a traced step on fake tensors (no real weights are allocated); ``timeline``,
    ``stacks``: as memopt.engine.run.run."""
    return run(spec, name, progress=progress, fake=True, timeline=timeline, stacks=stacks)


def analytic(spec: Spec) -> dict[str, int | None]:
    """The standard formulas, ignoring strategies: what calculators and papers would say. Inference: parameters
    x bytes and (generate) the KV cache 2 x layers x kv_heads x head_dim x positions x batch x bytes.

    params/grads/optimizer: count x bytes (AdamW: two moments). activations: Korthikanti et al. 2022,
    s*b*h*(34 + 5*a*s/h) bytes per layer for 16-bit activations with 1-byte dropout masks, scaled to
    this dtype (x dtype_bytes/2); like the paper it leaves out the embedding and the output layer/loss.
    On N ranks with fsdp, per rank: the model states / N (DeepSpeed's ZeRO-3 formula), activations of the rank's
    batch; with tensor parallelism over t ranks the paper's s*b*h*(10 + 24/t + 5*a*s/(h*t)) (no sequence
    parallelism), b the rows of the rank's data-parallel group.
    """
    m, t = spec.model, spec.train
    if isinstance(m, KerasModelSpec):  # its parameters are known once it is built, in its own process
        return {"params": None, "grads": None, "optimizer": None, "activations": None, "peak": None}
    dtype_bytes = DTYPE_BYTES[spec.run.dtype]
    n = parameter_total(m)
    if spec.run.mode != "train":  # weights + the KV formula: what serving calculators say
        kv = kv_bytes_per_position(spec) * spec.generate.positions * t.batch_size if spec.run.mode == "generate" else 0
        return {"params": n * dtype_bytes, "kv_cache": kv, "peak": n * dtype_bytes + kv}
    world = spec.world_size
    sharded = world if shards_model_states(spec) else 1  # ZeRO-3: model states / N per rank
    acts: int | None = None
    if not isinstance(m, PythonModelSpec):  # a user's module: no shape facts to put in the formula
        shape = m.facts if isinstance(m, HfModelSpec) else m.model_dump()
        s, b, h, a = t.seq_len, t.batch_size // spec.batch_shards, shape["d_model"], shape["n_heads"]  # a rank's rows
        tp = world // spec.batch_shards
        per_layer = s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp))
        acts = int(shape["n_layers"] * per_layer * dtype_bytes / 2)
    optimizer = {"adamw": 2 * n * dtype_bytes // sharded, "sgd": 0, "none": 0}.get(t.optimizer)
    parts = {"params": n * dtype_bytes // sharded, "grads": n * dtype_bytes // sharded if t.optimizer != "none" else 0,
             "optimizer": optimizer, "activations": acts}
    parts["peak"] = None if optimizer is None or acts is None else sum(v for v in parts.values() if v is not None)
    return parts


@dataclass
class Fit:
    budget: int
    peak: int
    helpers: list[dict[str, Any]]  # single strategies that would make it fit: {"strategies": label, "peak_bytes"}
    tried: int
    not_tried: list[str] = field(default_factory=list)  # labels of those left when the deadline came

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    @property
    def margin(self) -> int:
        return self.budget - self.peak


def single_candidates(spec: Spec, strongest_only: bool = False) -> list[StrategySpec]:
    """Every registered strategy in its typical settings, minus the ones the spec already uses;
    each strategy's strongest setting first, so that a deadline cuts the lighter ones."""
    settings = candidate_settings(spec, resolve_device(spec.run.device, estimate=True),
                                  exclude={s.name for s in spec.strategies})
    strongest = [group[-1] for group in settings.values()]
    if strongest_only:
        return strongest
    lighter = [setting for group in settings.values() for setting in reversed(group[:-1])]
    return strongest + lighter


def fits(spec: Spec, peak: int, budget: int, progress: Callable[[str], None] | None = None,
         deadline_s: float = DEADLINE_S, strongest_only: bool = False) -> Fit:
    """Does ``peak`` fit in ``budget``; if not, which single added strategy would (each estimated, for at
    most ``deadline_s`` seconds: the ones not tried by then are listed in ``not_tried``)."""
    result = Fit(budget, peak, [], 0)
    if result.fits:
        return result
    started = time.perf_counter()
    candidates = single_candidates(spec, strongest_only)
    longest = 0.0  # the longest single estimate so far: one that would end past the deadline is not started
    for i, candidate in enumerate(candidates):
        if time.perf_counter() - started + longest > deadline_s:
            result.not_tried = [c.label for c in candidates[i:]]
            break
        began = time.perf_counter()
        try:
            estimated = estimate(spec.with_strategies((*spec.strategies, candidate)), candidate.label, progress)
        except MemoptError:
            continue  # refused here (e.g. sdpa on a model already using sdpa)
        finally:
            longest = max(longest, time.perf_counter() - began)
        result.tried += 1
        assert estimated.memory is not None
        if estimated.memory.peak_bytes <= budget:
            result.helpers.append({"strategies": candidate.label, "peak_bytes": estimated.memory.peak_bytes})
    return result
