"""optimize: the chosen mix fits when profiled, lossy only when allowed, the fastest measured wins."""

from __future__ import annotations

import json

import pytest
import yaml

from memopt.analysis.optimize import (
    MICRO_BATCH_OVERHEAD,
    NOMINAL_BANDWIDTH,
    NOMINAL_FLOPS,
    Candidate,
    DriftCap,
    Search,
    by_prediction,
    non_dominated,
    search_options,
    within_drift,
)
from memopt.analysis.probes import Rates
from memopt.spec import load_spec
from memopt.strategies import candidate_specs, strategy_spec

from .helpers import CONFIGS, invoke, run


@pytest.fixture(scope="module")
def tiny_peak() -> int:
    return run(load_spec(CONFIGS / "tiny.yaml")).memory.peak_bytes


def test_half_budget_yaml_reproduces_under_budget_and_reports_ordering(tmp_path, tiny_peak):
    budget = tiny_peak // 2
    best, out = tmp_path / "best.yaml", tmp_path / "opt.json"
    result = invoke(["optimize", CONFIGS / "tiny.yaml", "--budget", f"{budget}B", "--allow-lossy", "--top", "2",
                     "--rounds", "1", "--output", best, "--json-out", out])
    assert result.exit_code == 0, result.output
    assert run(load_spec(best)).memory.peak_bytes <= budget
    doc = json.loads(out.read_text())
    measured = [c for c in doc["candidates"] if c["ratio"] is not None and c["measured_peak"] <= budget]
    winner = doc["candidates"][0]
    assert "+".join(winner["strategies"]) in result.output
    # the winner is the fastest measured set that fits (its ratio to the baseline measured beside it), among those
    # with the fewest lossy strategies
    fewest = min(c["lossy"] for c in measured)
    assert winner["ratio"]["ratio"] == min(c["ratio"]["ratio"] for c in measured if c["lossy"] == fewest)
    assert doc["baseline_step_s"] > 0 and winner["ratio"]["rounds"] == 1
    assert yaml.safe_load(best.read_text())["strategies"]


def test_without_allow_lossy_no_lossy_strategy_is_chosen(tmp_path, tiny_peak):
    best = tmp_path / "best.yaml"
    result = invoke(["optimize", CONFIGS / "tiny.yaml", "--budget", f"{int(tiny_peak * 0.6)}B", "--no-measure",
                     "--output", best])
    assert result.exit_code == 0, result.output
    from memopt.strategies import registry

    chosen = [next(iter(s)) for s in yaml.safe_load(best.read_text())["strategies"]]
    assert chosen and not any(registry()[name].lossy for name in chosen)


def test_impossible_budget_exits_1_naming_the_smallest_peak():
    result = invoke(["optimize", CONFIGS / "tiny.yaml", "--budget", "1MiB", "--no-measure"])
    assert result.exit_code == 1
    assert "nothing fits in 1.00 MiB: the smallest achievable peak is" in result.output


def test_search_prunes_dominated_sets(tiny_peak):
    search = Search(load_spec(CONFIGS / "tiny.yaml"))
    cands = search.run(int(tiny_peak * 0.75), search_options(search.spec, False))
    kept = non_dominated(cands)
    for c in kept:
        assert not any(o.peak < c.peak and o.predicted_s < c.predicted_s for o in cands)
    assert len(search.cache) < 60  # cached, beam-limited: far fewer than the ~2^8 possible sets


def test_bad_budget_is_a_clear_error():
    result = invoke(["optimize", CONFIGS / "tiny.yaml", "--budget", "eight gigs"])
    assert result.exit_code == 1 and "--budget" in result.output


def test_max_drift_leaves_out_what_drifts_more_and_the_winner_stays_under_it(tmp_path, tiny_peak):
    budget, out = tiny_peak // 2, tmp_path / "opt.json"
    result = invoke(["optimize", CONFIGS / "tiny.yaml", "--budget", f"{budget}B", "--max-drift", "1%", "--top", "2",
                     "--rounds", "1", "--json-out", out])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    # on random weights pruning drifts by tens of percent and 4-bit quantization by a few: both left out
    assert any(s.startswith("prune") for s in doc["left_out_for_drift"])
    assert any(s.startswith("quant:bits=4") for s in doc["left_out_for_drift"])
    winner = doc["candidates"][0]
    names = [next(iter(s)) for s in doc["winner"]]
    assert "prune" not in names
    # the winner is among the least lossy sets that were measured under the budget (a lossless mix of offload,
    # chunked_ce, sdpa and optim_in_bwd fits half of tiny; a lossy set may not push it out of the ranking)
    fitting = [c for c in doc["candidates"] if c["measured_peak"] is not None and c["measured_peak"] <= budget]
    assert winner["lossy"] == min(c["lossy"] for c in fitting)
    assert winner["measured_peak"] <= budget
    assert winner["drift"] is None or winner["drift"]["logits_rel_error"] <= 0.01


@pytest.mark.parametrize("args, message", [
    (["--max-drift", "1%", "--no-measure"], "--max-drift: drift is measured"),
    (["--max-drift", "lots"], "--max-drift 'lots': expected a percentage"),
    (["--max-loss-increase", "1%"], "--max-loss-increase: the loss is measured on held-out text; give it with "
                                    "--held-out FILE"),
    (["--max-loss-increase", "1%", "--max-drift", "1%", "--held-out", "x.txt"], "give one cap, not both"),
    (["--max-loss-increase", "a bit"], "--max-loss-increase 'a bit': expected a percentage")])
def test_max_drift_errors_are_clear(args, message):
    result = invoke(["optimize", CONFIGS / "tiny.yaml", "--budget", "4MiB", *args])
    assert result.exit_code == 1 and message in result.output


def test_a_candidate_set_label_is_its_labels_joined():
    accum, quant = candidate_specs("accum")[-1], candidate_specs("quant")[0]
    cand = Candidate((accum, quant, strategy_spec("chunked_ce"), strategy_spec("sdpa")))
    assert cand.label == "accum:micro_batches=8+quant:bits=8,lora=8+chunked_ce+sdpa"
    assert cand.to_dict()["strategies"] == ["accum:micro_batches=8", "quant:bits=8,lora=8", "chunked_ce", "sdpa"]
    assert Candidate(()).label == "baseline"


# ---- the ranking, model-free: synthetic candidates, no estimate and no torch work --------------------------

def cand(*names: str, peak: int = 0, predicted_s: float = 0.0, lossy: int = 0, **fields: object) -> Candidate:
    """A candidate set made up for the ranking: its strategies only name it (``ckpt+sdpa``)."""
    return Candidate(tuple(strategy_spec(n) for n in names), peak=peak, predicted_s=predicted_s, lossy=lossy,
                     **fields)  # type: ignore[arg-type]


def labels(cands: list[Candidate]) -> list[str]:
    return [c.label for c in cands]


def test_ranking_puts_fewer_lossy_strategies_first_then_the_faster_prediction():
    found = [cand("ckpt", predicted_s=3.0), cand("quant", "amp", predicted_s=0.1, lossy=2),
             cand("quant", predicted_s=0.5, lossy=1), cand("sdpa", predicted_s=1.0),
             cand("amp", predicted_s=0.2, lossy=1)]
    assert by_prediction(found[0]) == (0, 3.0)
    # a lossless set ranks above any lossy one however slow it is predicted; then the faster comes first
    assert labels(sorted(found, key=by_prediction)) == ["sdpa", "ckpt", "amp", "quant", "quant+amp"]


def test_a_set_another_beats_on_peak_and_time_is_dropped_a_trade_off_is_kept():
    fast = cand("sdpa", peak=100, predicted_s=1.0)
    small = cand("ckpt", peak=50, predicted_s=2.0)           # smaller but slower than fast: a trade-off, kept
    found = [fast, small,
             cand("chunked_ce", peak=120, predicted_s=1.5),  # larger and slower than fast
             cand("offload", peak=100, predicted_s=1.2),     # as large as fast, slower
             cand("accum", peak=60, predicted_s=2.0),        # as slow as small, larger
             cand("ckpt", "offload", peak=50, predicted_s=2.5)]  # as small as small, slower
    kept = non_dominated(found)
    assert labels(kept) == ["sdpa", "ckpt"]  # in the order found
    for c in kept:
        assert not any(o.peak <= c.peak and o.predicted_s <= c.predicted_s and o is not c
                       and (o.peak, o.predicted_s) != (c.peak, c.predicted_s) for o in found)


def test_sets_tied_on_peak_and_time_are_all_kept():
    tied = [cand("ckpt", peak=50, predicted_s=2.0), cand("sdpa", peak=50, predicted_s=2.0)]
    assert labels(non_dominated(tied)) == ["ckpt", "sdpa"]  # neither is strictly better once
    assert labels(non_dominated([*tied, cand("chunked_ce", peak=40, predicted_s=2.0)])) == ["chunked_ce"]
    assert labels(non_dominated(tied[:1])) == ["ckpt"] and non_dominated([]) == []


def test_the_drift_cap_leaves_out_only_a_measured_drift_over_it():
    def drifting(error: float | None) -> Candidate:
        return cand("quant", lossy=1, drift=None if error is None else {"logits_rel_error": error, "loss_delta": 0.0})

    def cap(limit: float) -> DriftCap:
        return DriftCap("logits_rel_error", limit, "--max-drift")

    assert within_drift(drifting(0.5), None)     # no cap: anything goes
    assert within_drift(drifting(None), cap(0.01))    # lossless, or not measured (yet): kept
    assert within_drift(drifting(0.004), cap(0.01))
    assert within_drift(drifting(0.01), cap(0.01))    # the cap itself is within it
    assert not within_drift(drifting(0.0101), cap(0.01))
    assert within_drift(drifting(0.0), cap(0.0)) and not within_drift(drifting(1e-9), cap(0.0))
    loss_cap = DriftCap("held_out_loss_increase", 0.01, "--max-loss-increase")
    held = cand("quant", lossy=1, drift={"logits_rel_error": 0.5, "held_out_loss_increase": 0.004})
    assert within_drift(held, loss_cap) and not within_drift(held, cap(0.01))
    held.drift = {"logits_rel_error": 0.001, "held_out_loss_increase": 0.02}
    assert not within_drift(held, loss_cap) and loss_cap.describe(held.drift) == "held-out loss +2.00%"


def test_predicted_time_is_flops_at_the_rate_plus_overheads_without_a_model():
    search = Search(load_spec(CONFIGS / "tiny.yaml"))  # builds nothing: estimates come only from evaluate()
    rate, bandwidth = NOMINAL_FLOPS["cpu"], NOMINAL_BANDWIDTH["cpu"]
    assert (search.device, search.flop_rate) == ("cpu", rate)
    assert search.predict(Candidate(())) == 0.0
    assert search.predict(Candidate((), flops=int(3 * rate))) == pytest.approx(3.0)
    accum = Candidate((strategy_spec("accum", {"micro_batches": 4}),), flops=int(3 * rate), micro_batches=4)
    assert search.predict(accum) == pytest.approx(3.0 * (1 + 3 * MICRO_BATCH_OVERHEAD))
    offload = Candidate((strategy_spec("offload"),), flops=int(3 * rate), moved_off_bytes=10**9,
                        moved_back_bytes=10**9)
    assert search.predict(offload) == pytest.approx(3.0 + 2 * 10**9 / bandwidth)  # written, then read back
    search.flop_rate = rate / 2  # as calibrate() would set it from a measured baseline
    assert search.predict(Candidate((), flops=int(3 * rate))) == pytest.approx(6.0)
    assert search.cache == {}

    on_cuda = Search(load_spec(CONFIGS / "tiny.yaml", {"device": "cuda"}))
    assert (on_cuda.device, on_cuda.flop_rate) == ("cuda", NOMINAL_FLOPS["cuda"])
    assert on_cuda.predict(Candidate((), moved_off_bytes=10**9, moved_back_bytes=10**9)) == pytest.approx(
        2 * 10**9 / NOMINAL_BANDWIDTH["cuda"])
    probed = Search(load_spec(CONFIGS / "tiny.yaml"), rates=Rates(2e9, 1e8, 4e8))  # this machine's probes
    assert probed.predict(Candidate((), flops=int(2e9), moved_off_bytes=10**8, moved_back_bytes=2 * 10**8)) == \
        pytest.approx(1.0 + 1.0 + 0.5)


def test_the_search_ranks_what_fits_by_prediction_from_its_cache():
    """Sets already in the cache are never estimated again: the ranking runs without a model."""
    search = Search(load_spec(CONFIGS / "tiny.yaml"))
    rate = search.flop_rate
    sets = {"baseline": cand(peak=100, flops=int(1 * rate)),
            "ckpt": cand("ckpt", peak=60, flops=int(3 * rate)),
            "sdpa": cand("sdpa", peak=70, flops=int(2 * rate)),
            "quant": cand("quant", peak=50, flops=int(1 * rate), lossy=1),
            "amp": cand("amp", peak=40, error="refused")}
    for c in sets.values():
        search.cache[tuple(sorted(s.label for s in c.strategies))] = c
    assert search.evaluate((strategy_spec("ckpt"),)) is sets["ckpt"]
    ranked = search._ranked_fitting(budget=70)
    assert labels(ranked) == ["sdpa", "ckpt", "quant"]  # not the baseline (over), not amp (refused)
    assert [c.predicted_s for c in ranked] == pytest.approx([2.0, 3.0, 1.0])


def test_a_lossy_set_never_removes_a_lossless_one_the_ranking_prefers():
    """Smaller and faster but lossy does not dominate a lossless set: by_prediction puts lossless first."""
    lossless = Candidate((), peak=100, predicted_s=2.0, lossy=0)
    lossy = Candidate((), peak=50, predicted_s=1.0, lossy=1)
    kept = non_dominated([lossless, lossy])
    assert kept == [lossless, lossy]
    assert sorted(kept, key=by_prediction)[0] is lossless
    assert non_dominated([lossless, Candidate((), peak=50, predicted_s=1.0, lossy=0)])[0].peak == 50
