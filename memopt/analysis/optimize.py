"""``memopt optimize --budget``: search strategy mixes, estimate each on fake tensors, rank by predicted
time, confirm the best for real, and return the fastest that fits.

Search: a beam over the registry's candidate settings (memopt.analysis.search, each a StrategySpec). A set that
fits is not extended (more strategies rarely make a step faster); the ``beam`` lowest-peak sets that do
not fit yet, among those whose last strategy lowered the peak by at least 1%, are extended by one more
strategy, up to ``max_depth``.
Estimates are cached by set. A set is dropped when another is both smaller and predicted faster.

Cost model: predicted step time = FLOPs of the traced step (torch.utils.flop_counter, so checkpoint
recomputation is counted) / a FLOP rate calibrated on the measured baseline (or a nominal rate when the
baseline does not run here) + offloaded bytes / the tier's bandwidth (disk 1 GB/s, PCIe 16 GB/s) +
a per-micro-batch overhead (accumulation).

Drift cap (``max_drift``): drift is a property of real numbers, so it needs the model to run here. Each
lossy setting's own drift is measured first (one forward against the unchanged model) and settings over
the cap are left out of the search; the measured candidates' drift is checked again, since drifts add up.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from memopt.analysis.drift import strategy_drift
from memopt.analysis.estimate import estimate
from memopt.analysis.search import candidate_settings
from memopt.core.errors import MemoptError
from memopt.core.results import RunOne
from memopt.core.units import format_bytes
from memopt.engine.devices import resolve_device
from memopt.spec import Spec
from memopt.spec.strategy_args import set_label
from memopt.strategies import StrategySpec, registry

NOMINAL_FLOPS = {"cpu": 100e9, "cuda": 300e12}        # used when the baseline cannot be measured here
OFFLOAD_BANDWIDTH = {"cpu": 1e9, "cuda": 16e9}         # bytes/s: disk on a CPU run, PCIe to host on CUDA
MICRO_BATCH_OVERHEAD = 0.02                            # fraction of a step per extra micro-batch
MEASURED_STEPS = 2                                     # measured steps per confirmation run (after a warm-up)


@dataclass
class Candidate:
    strategies: tuple[StrategySpec, ...]
    peak: int = 0
    flops: int = 0
    offload_bytes: int = 0
    micro_batches: int = 1
    lossy: int = 0  # how many lossy strategies the set has (fewer is preferred)
    predicted_s: float = 0.0
    measured_peak: int | None = None
    measured_s: float | None = None
    drift: dict[str, float] | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return set_label(s.entry for s in self.strategies) or "baseline"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: each strategy as its label (``quant:bits=4,lora=8``)."""
        return {**self.__dict__, "strategies": [s.label for s in self.strategies]}


def search_options(spec: Spec, allow_lossy: bool) -> dict[str, list[StrategySpec]]:
    """Per registered strategy, its candidate settings that apply to this spec, lightest first."""
    return candidate_settings(spec, resolve_device(spec.run.device, estimate=True), allow_lossy=allow_lossy)


def moved_bytes(facts: dict[str, dict[str, Any]]) -> int:
    """Bytes a step moves off the device and back, over every strategy that moves any, counted one way (predict
    doubles it): activation offload reads back what it wrote; offload_states says both directions."""
    total = 0
    for fact in facts.values():
        off, back = fact.get("moved_off_device_bytes", 0), fact.get("moved_to_device_bytes")
        total += off if back is None else (off + back) // 2
    return total


class Search:
    """Estimates strategy sets on fake tensors, with a cache, and predicts their step time."""

    def __init__(self, spec: Spec, progress: Callable[[str], None] | None = None):
        self.spec, self.progress = spec, progress or (lambda _m: None)
        self.cache: dict[tuple[str, ...], Candidate] = {}  # by the sorted labels of the set
        self.flop_rate = NOMINAL_FLOPS["cuda" if spec.run.device == "cuda" else "cpu"]
        self.device = "cuda" if spec.run.device == "cuda" else "cpu"

    def spec_for(self, strategies: tuple[StrategySpec, ...], steps: int | None = None) -> Spec:
        spec = self.spec.with_strategies((*strategies, *ranks_of(self.spec)))
        if steps is not None and steps < spec.train.steps:
            spec = spec.model_copy(update={"train": spec.train.model_copy(update={"steps": steps})})
        return spec

    def evaluate(self, strategies: tuple[StrategySpec, ...]) -> Candidate:
        key = tuple(sorted(s.label for s in strategies))
        if key in self.cache:
            return self.cache[key]
        cand = Candidate(strategies)
        try:
            self.progress(f"estimating {cand.label} ({len(self.cache) + 1} sets so far)")
            result = estimate(self.spec_for(strategies), cand.label)
        except MemoptError as exc:  # refused combination: remembered, never chosen
            cand.error = str(exc)
        else:
            assert result.memory is not None
            cand.peak, cand.flops = result.memory.peak_bytes, result.flops or 0
            cand.offload_bytes = moved_bytes(result.strategy_facts)
            known = registry()
            cand.lossy = sum(known[s.name].lossy for s in strategies)
            cand.micro_batches = math.prod(known[s.name].micro_batches(s.options) for s in strategies)
        self.cache[key] = cand
        return cand

    def predict(self, cand: Candidate) -> float:
        compute = cand.flops / self.flop_rate
        return (compute * (1 + MICRO_BATCH_OVERHEAD * (cand.micro_batches - 1))
                + cand.offload_bytes * 2 / OFFLOAD_BANDWIDTH[self.device])  # written, then read back

    def calibrate(self, measured_s: float) -> None:
        """Derive this machine's FLOP rate from the measured baseline step."""
        base = self.evaluate(())
        if base.flops and measured_s > 0:
            self.flop_rate = base.flops / measured_s

    def run(self, budget: int, options: dict[str, list[StrategySpec]], beam: int = 3, max_depth: int = 5,
            refine: int = 2) -> list[Candidate]:
        """Beam search with each strategy's strongest setting, then lighter settings for the best that fit."""
        strongest = [settings[-1] for settings in options.values()]
        base = self.evaluate(())
        frontier = [base]
        for _ in range(max_depth):
            extended = []
            for cand in frontier:
                used = {s.name for s in cand.strategies}
                for option in strongest:
                    if option.name not in used:
                        new = self.evaluate(cand.strategies + (option,))
                        if new.error is None and (new.peak <= budget or new.peak < 0.99 * cand.peak):
                            extended.append(new)  # a strategy that does not lower the peak is not pursued
            open_sets = sorted((c for c in extended if c.peak > budget), key=lambda c: c.peak)
            if not open_sets:
                break
            frontier = open_sets[:beam]
        for cand in self._ranked_fitting(budget)[:refine]:  # lighter (faster) settings that still fit
            for i, option in enumerate(cand.strategies):
                for lighter in options[option.name][:-1]:
                    self.evaluate(cand.strategies[:i] + (lighter,) + cand.strategies[i + 1:])
                self.evaluate(cand.strategies[:i] + cand.strategies[i + 1:])  # or without it
        return [c for c in self._done()]

    def _done(self) -> list[Candidate]:
        done = [c for c in self.cache.values() if c.error is None]
        for c in done:
            c.predicted_s = self.predict(c)
        return done

    def _ranked_fitting(self, budget: int) -> list[Candidate]:
        return sorted((c for c in self._done() if c.peak <= budget), key=by_prediction)


def by_prediction(cand: Candidate) -> tuple[int, float]:
    """Ranking before measuring: fewer lossy strategies first, then the predicted step time."""
    return cand.lossy, cand.predicted_s


def non_dominated(cands: list[Candidate]) -> list[Candidate]:
    """Drop a set when another is at most as large, predicted at most as slow and at most as lossy (and strictly
    better once): a lossy set never removes a lossless one, which the ranking prefers."""
    keep = []
    for c in cands:
        if not any(o is not c and o.peak <= c.peak and o.predicted_s <= c.predicted_s and o.lossy <= c.lossy
                   and (o.peak < c.peak or o.predicted_s < c.predicted_s or o.lossy < c.lossy) for o in cands):
            keep.append(c)
    return keep


def runs_here(peak: int, device: str) -> bool:
    """Whether measuring a run of this estimated peak is safe on this machine."""
    if device == "cuda":
        import torch

        return torch.cuda.is_available() and peak < 0.8 * torch.cuda.get_device_properties(0).total_memory
    return peak < 0.5 * psutil.virtual_memory().available


@dataclass
class Outcome:
    budget: int
    baseline: Candidate
    ranked: list[Candidate]          # the sets that fit, best first (the measured ones first)
    winner: Candidate
    evaluated: int
    measured_here: bool
    seconds: float = 0.0
    rejected: list[str] = field(default_factory=list)  # lossy settings left out for their drift


class NothingFits(MemoptError):
    def __init__(self, budget: int, smallest: Candidate):
        self.smallest = smallest
        super().__init__(f"nothing fits in {format_bytes(budget)}: the smallest achievable peak is "
                         f"{format_bytes(smallest.peak)}, with {smallest.label}")


def within_drift(cand: Candidate, max_drift: float | None) -> bool:
    return max_drift is None or cand.drift is None or cand.drift["logits_rel_error"] <= max_drift


def screen_drift(search: Search, options: dict[str, list[StrategySpec]], max_drift: float,
                 say: Callable[[str], None]) -> tuple[dict[str, list[StrategySpec]], list[str]]:
    """The options without the lossy settings whose own drift (measured here) is over ``max_drift``,
    and those left out, each with its drift."""
    known = registry()
    kept: dict[str, list[StrategySpec]] = {}
    rejected: list[str] = []
    for name, settings in options.items():
        if not known[name].lossy:
            kept[name] = settings
            continue
        for setting in settings:
            say(f"measuring the drift of {setting.label} alone")
            drift = (strategy_drift(search.spec_for((setting,))) or {}).get("logits_rel_error", 0.0)
            if drift <= max_drift:
                kept.setdefault(name, []).append(setting)
            else:
                rejected.append(f"{setting.label} (drift {100 * drift:.2f}%)")
    return kept, rejected


def confirm(search: Search, ranked: list[Candidate], base: Candidate, budget: int, top: int,
            max_drift: float | None, say: Callable[[str], None], run_one: RunOne) -> list[Candidate]:
    """Measure the best-ranked sets for real, each in its own process (``run_one``); the ones that fit (and stay
    under ``max_drift``), fastest first. With a cap, measuring goes on (up to 2 x top sets) until top qualify."""
    most = top if max_drift is None else 2 * top
    confirmed: list[Candidate] = []
    for cand in ranked[:most]:
        if len(confirmed) >= top:
            break
        if cand is not base or base.measured_s is None:
            say(f"measuring {cand.label} for real")
            done = run_one(search.spec_for(cand.strategies, MEASURED_STEPS), cand.label)
            if done.ok and done.memory is not None:
                cand.measured_peak, cand.measured_s = done.memory.peak_bytes, done.step_time_s
                cand.drift = done.drift
            else:
                cand.error = done.error
        if not within_drift(cand, max_drift):
            assert cand.drift is not None
            cand.error = f"drift {100 * cand.drift['logits_rel_error']:.2f}% over --max-drift"
        elif cand.measured_peak is not None and cand.measured_peak <= budget:
            confirmed.append(cand)
    return sorted(confirmed, key=lambda c: (c.lossy, c.measured_s))


def optimize(spec: Spec, budget: int, *, run_one: RunOne, allow_lossy: bool = False, top: int = 3,
             measure: bool = True, max_drift: float | None = None,
             progress: Callable[[str], None] | None = None) -> Outcome:
    """Find the fastest strategy mix whose peak fits ``budget``; measure the ``top`` candidates when possible,
    each with ``run_one`` (a run in a process of its own: memopt.app.isolate.run_isolated).

    ``max_drift`` (a fraction of the logits' norm) allows lossy strategies whose measured drift stays under it.
    """
    say = progress or (lambda _m: None)
    started = time.perf_counter()
    search = Search(spec, say)
    base = search.evaluate(())
    if base.error:
        raise MemoptError(base.error)
    measured_here = measure and runs_here(base.peak, search.device)
    if max_drift is not None and not measured_here:
        why = "--no-measure was given" if not measure else (
            f"the model (estimated peak {format_bytes(base.peak)}) is too large to run on this machine")
        raise MemoptError(f"--max-drift: drift is measured on the real model, but {why}")
    if measured_here:
        say("measuring the baseline to calibrate the cost model")
        base_run = run_one(search.spec_for((), MEASURED_STEPS), "baseline")
        if base_run.ok and base_run.memory is not None:
            search.calibrate(base_run.step_time_s)
            base.measured_peak, base.measured_s = base_run.memory.peak_bytes, base_run.step_time_s
    options = search_options(spec, allow_lossy or max_drift is not None)
    rejected: list[str] = []
    if max_drift is not None:
        options, rejected = screen_drift(search, options, max_drift, say)
    cands = search.run(budget, options)
    fitting = [c for c in cands if c.peak <= budget]
    if not fitting:
        raise NothingFits(budget, min(cands, key=lambda c: c.peak))
    ranked = sorted(non_dominated(fitting), key=by_prediction)
    if measured_here:
        confirmed = confirm(search, ranked, base, budget, top, max_drift, say, run_one)
        if max_drift is not None and not confirmed:
            raise MemoptError(f"nothing fits in {format_bytes(budget)} within --max-drift "
                              f"{100 * max_drift:g}%: the measured sets were over the budget or the cap"
                              + (f"; left out alone: {', '.join(rejected)}" if rejected else ""))
        ranked = confirmed + [c for c in ranked if c not in confirmed]
    seconds = time.perf_counter() - started
    return Outcome(budget, base, ranked, ranked[0], len(search.cache), measured_here, seconds, rejected)


def ranks_of(spec: Spec) -> tuple[StrategySpec, ...]:
    """The spec's strategy that runs it on ranks (``--world-size``): kept in every set the search tries."""
    return tuple(s for s in spec.strategies if s.on_ranks)


def winner_spec(spec: Spec, outcome: Outcome) -> dict[str, Any]:
    """The spec with the winning strategies: what ``--output`` writes and ``memopt profile`` reproduces."""
    return spec.with_strategies((*outcome.winner.strategies, *ranks_of(spec))).to_dict()
