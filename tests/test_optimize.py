"""optimize: the chosen mix fits when profiled, lossy only when allowed, the fastest measured wins."""

from __future__ import annotations

import json

import pytest
import yaml

from memopt.optimize import Search, non_dominated, search_options
from memopt.runner import run
from memopt.spec import load_spec

from .conftest import CONFIGS, invoke


@pytest.fixture(scope="module")
def tiny_peak() -> int:
    return run(load_spec(CONFIGS / "tiny.yaml")).memory.peak_bytes


def test_half_budget_yaml_reproduces_under_budget_and_reports_ordering(tmp_path, tiny_peak):
    budget = tiny_peak // 2
    best, out = tmp_path / "best.yaml", tmp_path / "opt.json"
    result = invoke(["optimize", CONFIGS / "tiny.yaml", "--budget", f"{budget}B", "--allow-lossy", "--top", "2",
                     "--output", best, "--json-out", out])
    assert result.exit_code == 0, result.output
    assert run(load_spec(best)).memory.peak_bytes <= budget
    doc = json.loads(out.read_text())
    measured = [c for c in doc["candidates"] if c["measured_s"] is not None and c["measured_peak"] <= budget]
    winner = doc["candidates"][0]
    assert "+".join(winner["strategies"]) in result.output
    # the winner is the fastest measured set that fits, among those with the fewest lossy strategies
    fewest = min(c["lossy"] for c in measured)
    assert winner["measured_s"] == min(c["measured_s"] for c in measured if c["lossy"] == fewest)
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
                     "--json-out", out])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    # on random weights pruning drifts by tens of percent and 4-bit quantization by a few: both left out
    assert any(s.startswith("prune") for s in doc["left_out_for_drift"])
    assert any(s.startswith("quant:bits=4") for s in doc["left_out_for_drift"])
    winner = doc["candidates"][0]
    names = [next(iter(s)) for s in doc["winner"]]
    assert "prune" not in names and any(n in ("quant", "optim8bit", "amp") for n in names)  # lossless cannot fit
    assert winner["measured_peak"] <= budget
    assert winner["drift"] is None or winner["drift"]["logits_rel_error"] <= 0.01


@pytest.mark.parametrize("args, message", [(["--max-drift", "1%", "--no-measure"], "--max-drift: drift is measured"),
                                           (["--max-drift", "lots"], "--max-drift 'lots': expected a percentage")])
def test_max_drift_errors_are_clear(args, message):
    result = invoke(["optimize", CONFIGS / "tiny.yaml", "--budget", "4MiB", *args])
    assert result.exit_code == 1 and message in result.output


def test_quantization_is_a_candidate_on_widths_the_group_size_does_not_divide(tiny_decoder):
    """tiny-decoder's ffn 176 is not a multiple of 64: quant used to be refused there, so the search never
    had it (a llama-shaped model with ffn 1376 found no quantization and ended in 'nothing fits')."""
    from memopt.search import candidate_settings

    settings = candidate_settings(tiny_decoder, "cpu")
    assert "quant:bits=4,lora=8" in [s.label for s in settings["quant"]] and len(settings["quant"]) >= 3
