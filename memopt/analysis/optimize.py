"""``memopt optimize --budget``: search strategy mixes, estimate each on fake tensors, predict their step time, measure
the contenders against the baseline, and return the fastest that fits, measured.

Search: a beam over the registry's candidate settings (memopt.analysis.search, each a StrategySpec). A set that
fits is not extended (more strategies rarely make a step faster); the ``beam`` lowest-peak sets that do
not fit yet, among those whose last strategy lowered the peak by at least 1%, are extended by one more
strategy, up to ``max_depth``. Estimates are cached by set.

Cost model: predicted step time = FLOPs of the traced step (torch.utils.flop_counter, so checkpoint
recomputation and accumulation's passes are counted) / a FLOP rate (calibrated on the measured baseline, else
this machine's matmul probe) x a per-micro-batch overhead, + the bytes the traced step moved off the device /
the tier's probed write rate + the bytes it moved back / its read rate (memopt.analysis.probes: a few seconds,
cached). Offload, offload_states (every unit each micro-batch streams) and accumulation's gradient sums are all
in those bytes, since the trace ran them.

Measuring (memopt.core.timing): the model is trusted to a factor (``TRUST``, widened to what the measured sets
show): every fitting set predicted within that factor of the fastest prediction is a contender (at least
``top``, at most 2 x ``top`` and ``MAX_MEASURED``). Contenders are measured in rounds, each a fresh baseline
run (in the first round: the one that calibrated the model) and then each contender's run, every run in a
process of its own, so that machine load falls on both sides of a ratio; a contender leaves once its ratio is
known to ``PRECISION`` over two rounds or it is clearly slower than the best, and rounds stop at ``rounds`` or
``measure_for`` seconds. The winner is the fitting set with the lowest measured ratio (fewest lossy strategies
first), shown with its spread.

Drift cap (``max_drift``): drift is a property of real numbers, so it needs the model to run here. Each
lossy setting's own drift is measured first (one forward against the unchanged model) and settings over
the cap are left out of the search; the measured candidates' drift is checked again, since drifts add up.
With a held-out text (``train.held_out``) the cap may be on the held-out loss instead
(``max_loss_increase``).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

from memopt.analysis.drift import strategy_drift
from memopt.analysis.estimate import estimate
from memopt.analysis.probes import Rates, machine_rates
from memopt.analysis.search import candidate_settings
from memopt.core.errors import MemoptError
from memopt.core.results import RunOne
from memopt.core.timing import Ratio, Round, ratio_of
from memopt.core.units import format_bytes
from memopt.engine.devices import resolve_device
from memopt.spec import Spec
from memopt.spec.strategy_args import set_label
from memopt.strategies import StrategySpec, registry

NOMINAL_FLOPS = {"cpu": 100e9, "cuda": 300e12}        # when neither the baseline nor a probe can run here
NOMINAL_BANDWIDTH = {"cpu": 1e9, "cuda": 16e9}         # bytes/s: disk on a CPU run, PCIe to host on CUDA
MICRO_BATCH_OVERHEAD = 0.02                            # fraction of a step per extra micro-batch
MEASURED_STEPS = 2                                     # measured steps per run (after a warm-up)
TRUST = 1.5                # sets predicted within this factor of the fastest prediction are measured
PRECISION = 0.05           # a contender's ratio is known when its spread is within 5% of it
MAX_MEASURED = 8           # contenders measured at most
ROUNDS = 3                 # measuring rounds at most (each: the baseline, then every open contender)
MEASURE_FOR_S = 900.0      # and no new round after this many seconds of measuring


@dataclass
class Candidate:
    strategies: tuple[StrategySpec, ...]
    peak: int = 0
    flops: int = 0
    moved_off_bytes: int = 0
    moved_back_bytes: int = 0
    micro_batches: int = 1
    lossy: int = 0  # how many lossy strategies the set has (fewer is preferred)
    predicted_s: float = 0.0
    measured_peak: int | None = None
    measured_s: float | None = None    # the median of every measured step of the set
    ratio: Ratio | None = None         # measured step time / the baseline's, from rounds side by side
    drift: dict[str, float] | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list, repr=False)

    @property
    def label(self) -> str:
        return set_label(s.entry for s in self.strategies) or "baseline"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: each strategy as its label (``quant:bits=4,lora=8``), the ratio with its spread."""
        data = {k: v for k, v in self.__dict__.items() if k != "rounds"}
        return {**data, "strategies": [s.label for s in self.strategies],
                "ratio": self.ratio.to_json() if self.ratio is not None else None}


def search_options(spec: Spec, allow_lossy: bool) -> dict[str, list[StrategySpec]]:
    """Per registered strategy, its candidate settings that apply to this spec, lightest first."""
    return candidate_settings(spec, resolve_device(spec.run.device, estimate=True), allow_lossy=allow_lossy)


def moved_bytes(facts: dict[str, dict[str, Any]]) -> tuple[int, int]:
    """Bytes a step moves off the device and back onto it, over every strategy that moves any: activation offload
    reads back what it wrote; offload_states says both directions."""
    off = back = 0
    for fact in facts.values():
        written, read = fact.get("moved_off_device_bytes", 0), fact.get("moved_to_device_bytes")
        off += written
        back += written if read is None else read
    return off, back


def device_rates(device: str) -> Rates:
    """This machine's probed rates for ``device``, or nominal ones for a device that is not here."""
    if device == "cpu" or (device == "cuda" and cuda_here()):
        return machine_rates(device)
    return Rates(NOMINAL_FLOPS[device], NOMINAL_BANDWIDTH[device], NOMINAL_BANDWIDTH[device])


class Search:
    """Estimates strategy sets on fake tensors, with a cache, and predicts their step time."""

    def __init__(self, spec: Spec, progress: Callable[[str], None] | None = None, rates: Rates | None = None):
        self.spec, self.progress = spec, progress or (lambda _m: None)
        self.cache: dict[tuple[str, ...], Candidate] = {}  # by the sorted labels of the set
        self.device = "cuda" if spec.run.device == "cuda" else "cpu"
        self.rates = rates or Rates(NOMINAL_FLOPS[self.device], NOMINAL_BANDWIDTH[self.device],
                                    NOMINAL_BANDWIDTH[self.device])
        self.flop_rate = self.rates.flops_per_s

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
            cand.moved_off_bytes, cand.moved_back_bytes = moved_bytes(result.strategy_facts)
            known = registry()
            cand.lossy = sum(known[s.name].lossy for s in strategies)
            cand.micro_batches = math.prod(known[s.name].micro_batches(s.options) for s in strategies)
        self.cache[key] = cand
        return cand

    def predict(self, cand: Candidate) -> float:
        compute = cand.flops / self.flop_rate
        return (compute * (1 + MICRO_BATCH_OVERHEAD * (cand.micro_batches - 1))
                + cand.moved_off_bytes / self.rates.write_bytes_per_s
                + cand.moved_back_bytes / self.rates.read_bytes_per_s)

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


def cuda_here() -> bool:
    return torch.cuda.is_available()


def runs_here(peak: int, device: str) -> bool:
    """Whether measuring a run of this estimated peak is safe on this machine."""
    if device == "cuda":
        return cuda_here() and peak < 0.8 * torch.cuda.get_device_properties(0).total_memory
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
    fitting: list[Candidate] = field(default_factory=list)  # every estimated set that fits
    cap: DriftCap | None = None


class NothingFits(MemoptError):
    def __init__(self, budget: int, smallest: Candidate):
        self.smallest = smallest
        super().__init__(f"nothing fits in {format_bytes(budget)}: the smallest achievable peak is "
                         f"{format_bytes(smallest.peak)}, with {smallest.label}")


@dataclass(frozen=True)
class DriftCap:
    """A limit on a lossy set's drift: the logits' relative error (``--max-drift``) or the relative increase of the
    loss on held-out text (``--max-loss-increase``, which needs ``train.held_out``)."""

    key: str
    limit: float
    option: str

    def value(self, drift: dict[str, float] | None) -> float | None:
        return None if drift is None else drift.get(self.key)

    def over(self, drift: dict[str, float] | None) -> bool:
        value = self.value(drift)
        return value is not None and value > self.limit

    def describe(self, drift: dict[str, float] | None) -> str:
        what = "held-out loss +" if self.key == LOSS_INCREASE else "drift "
        return f"{what}{100 * (self.value(drift) or 0.0):.2f}%"


LOSS_INCREASE = "held_out_loss_increase"


def drift_cap(max_drift: float | None, max_loss_increase: float | None, spec: Spec) -> DriftCap | None:
    if max_drift is not None and max_loss_increase is not None:
        raise MemoptError("--max-drift and --max-loss-increase: give one cap, not both")
    if max_loss_increase is not None:
        if spec.train.held_out is None:
            raise MemoptError("--max-loss-increase: the loss is measured on held-out text; give it with --held-out "
                              "FILE (train.held_out)")
        return DriftCap(LOSS_INCREASE, max_loss_increase, "--max-loss-increase")
    return None if max_drift is None else DriftCap("logits_rel_error", max_drift, "--max-drift")


def within_drift(cand: Candidate, cap: DriftCap | None) -> bool:
    return cap is None or not cap.over(cand.drift)


def screen_drift(search: Search, options: dict[str, list[StrategySpec]], cap: DriftCap,
                 say: Callable[[str], None]) -> tuple[dict[str, list[StrategySpec]], list[str]]:
    """The options without the lossy settings whose own drift (measured here) is over the cap, and those left
    out, each with its drift."""
    known = registry()
    kept: dict[str, list[StrategySpec]] = {}
    rejected: list[str] = []
    for name, settings in options.items():
        if not known[name].lossy:
            kept[name] = settings
            continue
        for setting in settings:
            say(f"measuring the drift of {setting.label} alone")
            drift = strategy_drift(search.spec_for((setting,)))
            if not cap.over(drift):
                kept.setdefault(name, []).append(setting)
            else:
                rejected.append(f"{setting.label} ({cap.describe(drift)})")
    return kept, rejected


@dataclass
class Measuring:
    """Contenders measured against the baseline in rounds (see the module's docstring)."""

    search: Search
    base: Candidate
    budget: int
    run_one: RunOne
    say: Callable[[str], None]
    cap: DriftCap | None = None
    rounds: int = ROUNDS
    measure_for: float = MEASURE_FOR_S
    clock: Callable[[], float] = time.perf_counter
    base_times: list[float] = field(default_factory=list)
    calibration: list[float] | None = None  # the baseline run that calibrated the model: round 1's baseline

    def _run(self, cand: Candidate, first: bool) -> list[float] | None:
        """One run of ``cand``: its step times, or None when it failed, went over the budget or the cap."""
        done = self.run_one(self.search.spec_for(cand.strategies, MEASURED_STEPS), cand.label, drift=first)
        if not done.ok or done.memory is None:
            cand.error = done.error or "failed"
            return None
        cand.measured_peak = max(cand.measured_peak or 0, done.memory.peak_bytes)
        if first:
            cand.drift = done.drift
        times = done.step_times_s or [done.step_time_s]
        if cand is not self.base and cand.measured_peak > self.budget:
            cand.error = f"over budget when measured ({format_bytes(cand.measured_peak)})"
            return None
        if cand is not self.base and not within_drift(cand, self.cap):
            assert self.cap is not None
            cand.error = f"{self.cap.describe(cand.drift)} over {self.cap.option}"
            return None
        return times

    def measure(self, pool: list[Candidate], top: int) -> list[Candidate]:
        """Measure the contenders among ``pool`` (fitting sets, best predicted first); the ones that fit, best
        measured first."""
        started = self.clock()
        open_sets = contenders(pool, top, TRUST)
        alive: list[Candidate] = []
        for round_no in range(self.rounds):
            if not open_sets or (round_no and self.clock() - started > self.measure_for):
                break
            alive = [c for c in {id(c): c for c in [*alive, *self._round(open_sets, round_no)]}.values()
                     if c.error is None]
            if not alive:  # every contender failed: the next ones in the pool
                open_sets = contenders([c for c in pool if not c.rounds and c.error is None], top, TRUST)
                continue
            best = min(alive, key=by_measurement)
            open_sets = [c for c in alive if not settled(c, best)]
            if round_no == 0:  # what the measured sets say of the model: sets it may have underrated join
                joining = [c for c in widened(pool, alive, self.base, top) if c not in open_sets]
                open_sets += joining[:max(0, MAX_MEASURED - len(alive))]
        if self.base_times:
            self.base.measured_s = statistics.median(self.base_times)
        return sorted(alive, key=by_measurement)

    def _round(self, open_sets: list[Candidate], round_no: int) -> list[Candidate]:
        """A fresh baseline run, then one run of each open set; the sets measured in this round."""
        self.say(f"measuring round {round_no + 1}: the baseline, then {len(open_sets)} sets")
        base_times = self.calibration if round_no == 0 and self.calibration else self._run(self.base, first=False)
        if base_times is None:
            raise MemoptError(f"the baseline failed when measured: {self.base.error}")
        self.base_times += base_times
        measured = []
        for cand in open_sets:
            self.say(f"measuring {cand.label} (round {round_no + 1})")
            times = self._run(cand, first=not cand.rounds)
            if times is None:
                continue
            cand.rounds.append((times, base_times))
            cand.ratio = ratio_of(cand.rounds)
            cand.measured_s = statistics.median(t for r in cand.rounds for t in r[0])
            measured.append(cand)
        return measured


def contenders(pool: list[Candidate], top: int, trust: float, least: int | None = None) -> list[Candidate]:
    """The sets worth measuring: those with the fewest lossy strategies predicted within ``trust`` x the fastest
    prediction, at least ``least`` (default ``top``: the next best predicted) and at most 2 x ``top`` (and
    MAX_MEASURED)."""
    if not pool:
        return []
    first = pool[0]
    near = [c for c in pool if c.lossy == first.lossy and c.predicted_s <= trust * first.predicted_s]
    near += [c for c in pool if c not in near][:max(0, (top if least is None else least) - len(near))]
    return near[:max(top, min(MAX_MEASURED, 2 * top))]


def widened(pool: list[Candidate], measured: list[Candidate], base: Candidate, top: int) -> list[Candidate]:
    """Unmeasured sets the model may have underrated: when the measured sets' time over their prediction varies
    by more than TRUST, those predicted within that spread of the fastest prediction."""
    errors = [c.ratio.value * base.predicted_s / c.predicted_s for c in measured
              if c.ratio is not None and c.predicted_s > 0]
    if len(errors) < 2 or not base.predicted_s:
        return []
    spread = max(errors) / min(errors)
    if spread <= TRUST:
        return []
    return [c for c in contenders(pool, top, spread, least=0) if not c.rounds and c.error is None]


def by_measurement(cand: Candidate) -> tuple[int, float]:
    """Ranking after measuring: fewer lossy strategies first, then the measured ratio to the baseline."""
    return cand.lossy, cand.ratio.value if cand.ratio is not None else math.inf


def settled(cand: Candidate, best: Candidate) -> bool:
    """Measured enough: its ratio known to PRECISION over two rounds at least (one round knows its steps' noise,
    not the machine's from run to run), or clearly slower than the best (apart by more than both spreads and
    PRECISION)."""
    assert cand.ratio is not None and best.ratio is not None
    if cand.ratio.rounds >= 2 and cand.ratio.known_to(PRECISION):
        return True
    return cand is not best and (cand.lossy > best.lossy or cand.ratio.value - cand.ratio.spread
                                 > (best.ratio.value + best.ratio.spread) * (1 + PRECISION))


def optimize(spec: Spec, budget: int, *, run_one: RunOne, allow_lossy: bool = False, top: int = 3,
             measure: bool = True, max_drift: float | None = None, max_loss_increase: float | None = None,
             rounds: int = ROUNDS, measure_for: float = MEASURE_FOR_S,
             progress: Callable[[str], None] | None = None, rates: Rates | None = None) -> Outcome:
    """Find the fastest strategy mix whose peak fits ``budget``; measure the contenders against the baseline when
    possible, each run with ``run_one`` (a run in a process of its own: memopt.app.isolate.run_isolated).

    ``max_drift`` (a fraction of the logits' norm) or ``max_loss_increase`` (a fraction of the held-out loss)
    allows lossy strategies whose measured drift stays under it.
    """
    say = progress or (lambda _m: None)
    started = time.perf_counter()
    cap = drift_cap(max_drift, max_loss_increase, spec)
    device = "cuda" if spec.run.device == "cuda" else "cpu"
    if rates is None:
        say("probing this machine's matmul and copy rates (cached)")
        rates = device_rates(device)
    search = Search(spec, say, rates)
    base = search.evaluate(())
    if base.error:
        raise MemoptError(base.error)
    measured_here = measure and runs_here(base.peak, search.device)
    if cap is not None and not measured_here:
        why = "--no-measure was given" if not measure else (
            f"the model (estimated peak {format_bytes(base.peak)}) is too large to run on this machine")
        raise MemoptError(f"{cap.option}: drift is measured on the real model, but {why}")
    calibration = None
    if measured_here:
        say("measuring the baseline to calibrate the cost model")
        base_run = run_one(search.spec_for((), MEASURED_STEPS), "baseline", drift=False)
        if base_run.ok and base_run.memory is not None:
            search.calibrate(base_run.step_time_s)
            base.measured_peak = base_run.memory.peak_bytes
            calibration = base_run.step_times_s or [base_run.step_time_s]
    options = search_options(spec, allow_lossy or cap is not None)
    rejected: list[str] = []
    if cap is not None:
        options, rejected = screen_drift(search, options, cap, say)
    cands = search.run(budget, options)
    fitting = [c for c in cands if c.peak <= budget]
    if not fitting:
        raise NothingFits(budget, min(cands, key=lambda c: c.peak))
    pool = sorted(fitting, key=by_prediction)
    ranked = sorted(non_dominated(fitting), key=by_prediction)
    if measured_here:
        measuring = Measuring(search, base, budget, run_one, say, cap, rounds, measure_for, calibration=calibration)
        confirmed = measuring.measure(pool, top)
        if not confirmed:
            what = f" within {cap.option} {100 * cap.limit:g}%" if cap is not None else ""
            raise MemoptError(f"nothing fits in {format_bytes(budget)}{what}: the measured sets were over the budget"
                              + (" or the cap" if cap is not None else "")
                              + (f"; left out alone: {', '.join(rejected)}" if rejected else ""))
        failed = [c for c in pool if c.error is not None and c not in confirmed]
        ranked = confirmed + failed + [c for c in ranked if c not in confirmed and c not in failed]
    seconds = time.perf_counter() - started
    return Outcome(budget, base, ranked, ranked[0], len(search.cache), measured_here, seconds, rejected, fitting,
                   cap)


def ranks_of(spec: Spec) -> tuple[StrategySpec, ...]:
    """The spec's strategy that runs it on ranks (``--world-size``): kept in every set the search tries."""
    return tuple(s for s in spec.strategies if s.on_ranks)


def winner_spec(spec: Spec, outcome: Outcome) -> dict[str, Any]:
    """The spec with the winning strategies: what ``--output`` writes and ``memopt profile`` reproduces."""
    return spec.with_strategies((*outcome.winner.strategies, *ranks_of(spec))).to_dict()
