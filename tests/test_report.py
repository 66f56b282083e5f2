"""Rendering without models: tables read at any width, piped output is never cut, JSON is strict."""

from __future__ import annotations

import json
from types import SimpleNamespace

from rich.console import Console

from memopt import report
from memopt.measure import CATEGORIES
from memopt.outputs import json_text

LONG = "accum:micro_batches=8+quant:bits=4,format=nf4,lora=8,group_size=128+chunked_ce+sdpa+optim_in_bwd"


def _run(name: str, peak: int, **extra: object) -> dict:
    return {"name": name, "ok": True, "peak_bytes": peak, "category_peak_bytes": dict.fromkeys(CATEGORIES, peak // 6),
            "step_time_s": 0.5, "loss": 6.9, "drift": None, **extra}


RUNS = [_run("baseline", 6 * 2**20),
        _run(LONG, 3 * 2**20, drift={"logits_rel_error": 0.012, "loss_delta": 0.1, "after_steps": 3},
             vs_baseline={"saving": 0.5, "slowdown": 1.4, "loss_delta": 0.01, "grad_cosine": 0.999})]


def _render(tables: list, width: int, terminal: bool) -> str:
    console = Console(width=width, force_terminal=terminal, color_system=None, record=True, legacy_windows=False)
    report.print_tables(tables, console)
    return console.export_text()


def test_a_narrow_terminal_stacks_rows_instead_of_collapsing_columns():
    text = _render([report.compare_table(RUNS, "memopt compare")], 40, terminal=True)
    assert all(len(line) <= 40 for line in text.splitlines())
    for label in ("peak", "saving", "step time", "train loss diff", "logit drift"):
        assert label in text
    assert "3.00 MiB" in text and "50.0%" in text and "1.20% @3" in text
    assert "group_size=128" in text.replace("\n", "").replace(" ", "")  # the set is folded, not cut


def test_piped_output_is_never_cut():
    text = _render([report.compare_table(RUNS, "memopt compare")], 80, terminal=False)
    assert LONG in text and "…" not in text


def test_optimize_table_keeps_whole_strategy_sets_when_piped():
    cand = SimpleNamespace(strategies=tuple(LONG.split("+")), label=LONG, peak=2**20, measured_peak=2**20,
                           predicted_s=1.0, measured_s=1.1, lossy=1, error=None, drift=None)
    outcome = SimpleNamespace(baseline=cand, budget=2**21, evaluated=12, seconds=3.0, ranked=[cand], winner=cand)
    assert LONG in _render([report.optimize_table(outcome, 3)], 80, terminal=False)


def test_compare_columns_say_what_they_are():
    text = _render([report.compare_table(RUNS, "t")], 200, terminal=True)
    assert "train loss diff" in text and "logit drift" in text and "before training" in text
    assert "after N identical steps" in text
    assert "after 3 identical training steps" == report.drift_when(RUNS[1]["drift"])


def test_json_is_strict_nan_and_infinity_become_null():
    text = json_text({"loss": float("nan"), "x": [float("inf"), 1.5], "y": {"z": float("-inf")}})
    assert json.loads(text) == {"loss": None, "x": [None, 1.5], "y": {"z": None}}
    assert "NaN" not in text
