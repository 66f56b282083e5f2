"""optimize measures its contenders against the baseline, side by side, and the winner is the fastest measured.

A fake clock stands in for the machine (timing is not the point here): each run is the set's estimate (its peak),
timed by a made-up rule the cost model does not know exactly (every strategy off by its own factor, bytes moved
at another rate than the probe's, +-2% noise a step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
from typing import Any

import pytest

from memopt.analysis.estimate import estimate
from memopt.analysis.optimize import MAX_MEASURED, moved_bytes, optimize
from memopt.analysis.probes import Rates, cache_file, machine_rates
from memopt.core.results import RunResult
from memopt.spec import Spec, load_spec

from .helpers import CONFIGS

FACTORS = {"offload": 1.5, "offload_states": 1.3, "ckpt": 0.85, "accum": 1.2, "chunked_ce": 0.8, "sdpa": 0.9,
           "optim_in_bwd": 1.1}  # how far off the cost model is, per strategy


class FakeClock:
    """``run_one`` for optimize: the estimate's memory, the made-up clock's step times; every call is kept."""

    flops_per_s, bytes_per_s = 4e9, 5e8  # the truth (the cost model is told 1e9 bytes/s)

    def __init__(self, noise: float = 0.02) -> None:
        self.noise = noise
        self.calls: list[tuple[str, bool]] = []
        self.rng = random.Random(0)
        self.estimates: dict[str, RunResult] = {}

    def _estimate(self, spec: Spec) -> RunResult:
        key = json.dumps(spec.to_dict()["strategies"])
        if key not in self.estimates:
            self.estimates[key] = estimate(spec)
        return self.estimates[key]

    def truth(self, spec: Spec) -> float:
        est = self._estimate(spec)
        off, back = moved_bytes(est.strategy_facts)
        seconds = (est.flops or 0) / self.flops_per_s + (off + back) / self.bytes_per_s
        return seconds * math.prod(FACTORS.get(s.name, 1.0) for s in spec.strategies)

    def __call__(self, spec: Spec, name: str, **options: Any) -> RunResult:
        self.calls.append((name, options.get("drift", True)))
        true = self.truth(spec)
        times = [true * (1 + self.rng.uniform(-self.noise, self.noise)) for _ in range(2)]
        return dataclasses.replace(self._estimate(spec), estimated=False, step_times_s=times,
                                   step_time_s=statistics.median(times))


@pytest.fixture(scope="module")
def tiny() -> Spec:
    """tiny with a batch of 16: activations enough that 10% of its peak is reachable without lossy strategies."""
    return load_spec(CONFIGS / "tiny.yaml", {"batch_size": 16})


@pytest.fixture(scope="module")
def tiny_peak(tiny: Spec) -> int:
    result = estimate(tiny)
    assert result.memory is not None
    return result.memory.peak_bytes


@pytest.mark.parametrize("share", [0.6, 0.3, 0.1])
def test_the_winner_is_within_10_percent_of_the_fastest_set_the_search_estimated(tiny, tiny_peak, share):
    clock = FakeClock()
    budget = int(share * tiny_peak)
    outcome = optimize(tiny, budget, run_one=clock, rates=Rates(1e9, 1e9, 1e9))
    fitting = [c for c in outcome.fitting if c.lossy == 0]
    assert len(fitting) >= 3  # a choice to make
    fastest = min(clock.truth(tiny.with_strategies(c.strategies)) for c in fitting)
    winner = clock.truth(tiny.with_strategies(outcome.winner.strategies))
    assert winner <= 1.10 * fastest, (outcome.winner.label, winner, fastest)
    assert outcome.winner.ratio is not None and outcome.winner.measured_peak <= budget


def test_rounds_interleave_a_fresh_baseline_and_the_ratio_has_its_spread(tiny, tiny_peak):
    clock = FakeClock()
    outcome = optimize(tiny, int(0.6 * tiny_peak), run_one=clock, rates=Rates(1e9, 1e9, 1e9), rounds=3, top=3)
    names = [name for name, _ in clock.calls]
    assert names[0] == "baseline"  # the calibration run, which is round 1's baseline too
    rounds = [i for i, name in enumerate(names) if name == "baseline"]
    assert len(rounds) >= 2  # one round cannot tell the machine's noise from run to run
    measured = {c.label: c for c in outcome.ranked if c.ratio is not None}
    assert 3 <= len(measured) <= MAX_MEASURED
    for cand in measured.values():
        # each round's ratio is over the baseline run just before it
        assert cand.ratio.rounds == len(cand.rounds)
        expected = statistics.fmean(statistics.median(a) / statistics.median(b) for a, b in cand.rounds)
        assert cand.ratio.value == pytest.approx(expected)
        # drift is measured on a set's first run only
        assert [drift for name, drift in clock.calls if name == cand.label][1:] == [False] * (len(cand.rounds) - 1)
    winner = outcome.winner
    assert winner is outcome.ranked[0] and winner.ratio is not None
    assert winner.ratio.value == min(c.ratio.value for c in measured.values() if c.lossy == 0)
    assert winner.ratio.rounds >= 2
    assert winner.ratio.spread < 0.05 * winner.ratio.value or winner.ratio.rounds == 3


def test_a_set_over_the_budget_when_measured_is_out_with_the_reason(tiny, tiny_peak):
    clock = FakeClock()
    real = clock.__call__

    def bigger(spec: Spec, name: str, **options: Any) -> RunResult:
        done = real(spec, name, **options)
        if name != "baseline" and "chunked_ce" in name:
            assert done.memory is not None
            done = dataclasses.replace(done, memory=dataclasses.replace(done.memory, peak_bytes=10 * tiny_peak))
        return done

    outcome = optimize(tiny, int(0.6 * tiny_peak), run_one=bigger, rates=Rates(1e9, 1e9, 1e9), rounds=1)
    over = [c for c in outcome.ranked if c.error and c.error.startswith("over budget when measured")]
    assert over and all("chunked_ce" in c.label for c in over)
    assert "chunked_ce" not in outcome.winner.label


def test_the_probed_rates_are_cached_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOPT_CACHE_DIR", str(tmp_path))
    from memopt.analysis import probes

    calls = []
    monkeypatch.setattr(probes, "probe", lambda device: calls.append(device) or Rates(1.0, 2.0, 3.0))
    assert machine_rates("cpu") == Rates(1.0, 2.0, 3.0) and calls == ["cpu"]
    assert machine_rates("cpu") == Rates(1.0, 2.0, 3.0) and calls == ["cpu"]  # from the cache
    assert cache_file() == tmp_path / "rates.json" and list(tmp_path.iterdir()) == [tmp_path / "rates.json"]
    cache_file().write_text("{not json")
    assert machine_rates("cpu") == Rates(1.0, 2.0, 3.0) and calls == ["cpu", "cpu"]  # a broken cache: probed again


def test_a_real_probe_measures_positive_rates_and_leaves_no_file(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rates = machine_rates.__globals__["probe"]("cpu")
    assert rates.flops_per_s > 1e8 and rates.write_bytes_per_s > 1e6 and rates.read_bytes_per_s > 1e6
    assert list(tmp_path.iterdir()) == []  # the disk tier's probe file went with its folder
