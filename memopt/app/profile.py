"""Profiling a spec, with the policy around the engine's run: refuse up front a run that cannot fit here
(memopt.analysis.preflight), measure the accuracy drift of lossy strategies (memopt.analysis.drift), then run it
(memopt.engine.run). Estimates (fake tensors) go to the engine directly: nothing is allocated, nothing drifts."""

from __future__ import annotations

from memopt.analysis.drift import drift_of
from memopt.analysis.preflight import ensure_fits_here, ensure_ranks_fit
from memopt.core.results import RunResult
from memopt.engine import ranks
from memopt.engine.devices import resolve_device
from memopt.engine.run import run
from memopt.engine.step import Progress
from memopt.spec import Spec
from memopt.strategies import build_strategies, set_up_process


def profile(spec: Spec, name: str = "baseline", *, timeline: bool = False, stacks: bool = False,
            device_memory: int | None = None, progress: Progress | None = None, grads_to: str | None = None,
            fit_check: bool = True, drift: bool = True) -> RunResult:
    """Preflight, drift, then the measured run (see memopt.engine.run.run). Raises MemoptError.

    Every check that can be made before a process starts is made here: the strategies' refusals and checks (for
    ranks: the batch split, the device), then, unless ``fit_check`` is off, whether the run (or its N ranks, their
    interpreters included) fits in this machine's memory or ``device_memory``. ``drift`` false: not measured."""
    say = progress or (lambda _msg: None)
    set_up_process(spec)  # e.g. the allocator strategy's settings, before anything here initialises CUDA
    build_strategies(spec, resolve_device(spec.run.device))  # refused combinations: refused before anything runs
    fit_check = fit_check and spec.model.kind != "keras"  # no formula for a Keras model: its measurement says
    if fit_check and spec.world_size == 1:
        ensure_fits_here(spec, device_memory, say)
    elif fit_check and not (ranks.in_process_group() or ranks.under_launcher()):  # torchrun started them already
        ensure_ranks_fit(spec, device_memory, say)
    measured = drift_of(spec, lambda: say(f"{name}: measuring accuracy drift against the unchanged model")) \
        if drift else None
    result = run(spec, name, timeline=timeline, stacks=stacks, device_memory=device_memory, progress=progress,
                 grads_to=grads_to)
    result.drift = measured
    return result
