"""``memopt compare``: the baseline and each strategy set, each in its own process, side by side."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path

from memopt.core.errors import MemoptError, StrategyError
from memopt.core.results import RunOne, RunResult, VsBaseline
from memopt.core.timing import ratio_of
from memopt.spec import Spec, spec_from_data
from memopt.spec.strategy_args import StrategyEntry, set_label
from memopt.strategies import build_strategies


def set_spec(spec: Spec, entries: list[StrategyEntry]) -> Spec:
    """The spec with this set's strategies; a bare name takes its options from the spec when it has them."""
    own = {s.name: s.to_dict() for s in spec.strategies}
    strategies = [own.get(name, entry) if not options else entry
                  for entry in entries for name, options in entry.items()]
    return spec_from_data(spec.to_dict(), strategies=strategies, strategies_option="--strategies")


def planned_runs(spec: Spec, sets: list[list[StrategyEntry]], device: str,
                 backends: list[Spec] | None = None) -> list[tuple[str, Spec]]:
    """(name, spec) of the baseline and every set, each checked as its run would check it (options, refused
    pairs, devices, each strategy's own checks), so that nothing a run would refuse starts at all. ``backends``:
    the same Keras model on other backends, each a baseline of its own (named by its backend)."""
    planned = [("baseline", spec)]
    if backends:
        planned = [(f"baseline ({getattr(s.model, 'backend', '')})", s) for s in [spec, *backends]]
        if len({name for name, _ in planned}) < len(planned):
            raise MemoptError("--backend: each backend once, e.g. --backend torch,tensorflow")
    for entries in sets:
        label = set_label(entries)
        if label in (name for name, _ in planned):
            raise StrategyError(f"--strategies: the set {label} is given twice")
        planned.append((label, set_spec(spec, entries)))
    for name, run_spec in planned:
        try:
            build_strategies(run_spec, device)
        except StrategyError as exc:
            where = "the spec's own strategies" if name == "baseline" else f"set {name}"
            raise StrategyError(f"{where}: {exc}") from None
    return planned


def gradient_cosine(path_a: Path, path_b: Path) -> float | None:
    """Cosine between two runs' saved gradients, or None when the trainable sets differ."""
    import torch

    if not (path_a.exists() and path_b.exists()):
        return None
    a, b = torch.load(path_a, mmap=True), torch.load(path_b, mmap=True)
    if len(a) != len(b) or any(x is None or y is None or x.shape != y.shape for x, y in zip(a, b)):
        return None
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    na = sum(float(x.double().square().sum()) for x in a) ** 0.5
    nb = sum(float(y.double().square().sum()) for y in b) ** 0.5
    return dot / (na * nb) if na and nb else None


def compare(planned: list[tuple[str, Spec]], *, run_one: RunOne, device_memory: int | None = None,
            on_run: Callable[[str], None] | None = None) -> list[RunResult]:
    """Run the planned runs (``planned_runs``: the baseline first), each with ``run_one`` (in a process of its own:
    memopt.app.isolate.run_isolated). When the baseline
    finished, every other run that finished gets its ``vs_baseline``. A run that fails at run time (out of
    memory, killed) is kept, failed.
    """
    runs: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="memopt-compare-") as tmp:
        for i, (name, run_spec) in enumerate(planned):
            if on_run:
                on_run(name)
            runs.append(run_one(run_spec, name, device_memory=device_memory, grads_to=f"{tmp}/{i}.pt"))
        base = runs[0]
        for i, run in enumerate(runs[1:], start=1):
            if run.ok and base.ok and run.memory and base.memory:
                run.vs_baseline = VsBaseline(
                    saving=1 - run.memory.peak_bytes / base.memory.peak_bytes,
                    slowdown=(ratio := ratio_of([(run.step_times_s or [run.step_time_s],
                                                base.step_times_s or [base.step_time_s])])).value,
                    slowdown_spread=None if math.isinf(ratio.spread) else ratio.spread,
                    loss_delta=run.loss - base.loss,
                    grad_cosine=gradient_cosine(Path(tmp) / "0.pt", Path(tmp) / f"{i}.pt"),
                )
    return runs
