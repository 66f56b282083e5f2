"""Rendering without models: tables read at any width, piped output is never cut, documents hold each run."""

from __future__ import annotations

from types import SimpleNamespace

from rich.console import Console

from memopt.core.results import RunResult, StepMemory, VsBaseline
from memopt.core.timing import Ratio
from memopt.measure.tracker import CATEGORIES
from memopt.render import documents, markdown, tables, text

LONG = "accum:micro_batches=8+quant:bits=4,format=nf4,lora=8,group_size=128+chunked_ce+sdpa+optim_in_bwd"


def _memory(peak: int, activations: int | None = None) -> StepMemory:
    categories = dict.fromkeys(CATEGORIES, peak // 6)
    if activations is not None:
        categories["activations"] = activations
    return StepMemory(peak_bytes=peak, peak_breakdown=dict(categories), category_peak_bytes=categories,
                      phase_peak_bytes={"forward": peak // 2, "backward": peak, "optimizer": peak // 3},
                      state_bytes={}, peak_phase="backward")


def _run(name: str, peak: int, **extra: object) -> RunResult:
    return RunResult(name=name, strategies=[], device="cpu", memory=_memory(peak), step_time_s=0.5, loss=6.9,
                     **extra)  # type: ignore[arg-type]


RUNS = [_run("baseline", 6 * 2**20),
        _run(LONG, 3 * 2**20, drift={"logits_rel_error": 0.012, "loss_delta": 0.1, "after_steps": 3},
             vs_baseline=VsBaseline(saving=0.5, slowdown=1.4, loss_delta=0.01, grad_cosine=0.999))]


def _render(shown: list, width: int, terminal: bool) -> str:
    console = Console(width=width, force_terminal=terminal, color_system=None, record=True, legacy_windows=False)
    tables.print_tables(shown, console)
    return console.export_text()


def test_a_narrow_terminal_stacks_rows_instead_of_collapsing_columns():
    rendered = _render([tables.compare_table(RUNS, "memopt compare")], 40, terminal=True)
    assert all(len(line) <= 40 for line in rendered.splitlines())
    for label in ("peak", "saving", "step time", "train loss diff", "logit drift"):
        assert label in rendered
    assert "3.00 MiB" in rendered and "50.0%" in rendered and "1.20% @3" in rendered
    assert "group_size=128" in rendered.replace("\n", "").replace(" ", "")  # the set is folded, not cut


def test_piped_output_is_never_cut():
    rendered = _render([tables.compare_table(RUNS, "memopt compare")], 80, terminal=False)
    assert LONG in rendered and "…" not in rendered


def test_optimize_table_keeps_whole_strategy_sets_when_piped():
    cand = SimpleNamespace(strategies=tuple(LONG.split("+")), label=LONG, peak=2**20, measured_peak=2**20,
                           predicted_s=1.0, measured_s=1.1, lossy=1, error=None, drift=None, ratio=Ratio(1.3, 0.02))
    outcome = SimpleNamespace(baseline=cand, budget=2**21, evaluated=12, seconds=3.0, ranked=[cand], winner=cand)
    rendered = _render([tables.optimize_table(outcome, 3)], 80, terminal=False)
    assert LONG in rendered and "1.30x ±0.02" in rendered and "± half their range" in rendered


def test_compare_columns_say_what_they_are():
    rendered = _render([tables.compare_table(RUNS, "t")], 200, terminal=True)
    assert "train loss diff" in rendered and "logit drift" in rendered and "before training" in rendered
    assert "after N identical steps" in rendered
    assert "after 3 identical training steps" == text.drift_when(RUNS[1].drift)


def test_compare_rows_read_run_results_and_name_failures():
    base = _run("baseline", 6 * 2**20)
    base.memory = _memory(6 * 2**20, activations=4 * 2**20)
    smaller = _run("ckpt", 3 * 2**20, vs_baseline=VsBaseline(saving=0.5, slowdown=1.25, loss_delta=-0.002,
                                                              grad_cosine=None))
    failed = RunResult.failed("sdpa", [{"sdpa": {}}], "out of memory during backward")
    rows = text.compare_rows([base, smaller, failed])
    assert rows[0] == {"run": "baseline", "peak": "6.00 MiB", "saving": "-", "changed": "-", "time": "500 ms",
                       "slowdown": "-", "loss": "6.9000", "cosine": "-", "drift": "-", "status": "ok"}
    assert rows[1]["saving"] == "50.0%" and rows[1]["slowdown"] == "1.25x ±?" and rows[1]["loss"] == "-2.00e-03"
    assert rows[1]["changed"] == "activations -88%, temporaries -50%" and rows[1]["cosine"] == "-"
    assert rows[2]["status"] == "failed: out of memory during backward" and rows[2]["peak"] == "-"
    written = markdown.compare_markdown([base, smaller, failed], "t")
    assert "| ckpt | 3.00 MiB | 50.0% |" in written and "failed: out of memory during backward" in written
    table = _render([tables.compare_table([base, smaller, failed], "t")], 200, terminal=False)
    assert "failed [1]" in table and "[1] sdpa: out of memory during backward" in table


def test_runs_document_holds_each_runs_json(tiny):
    doc = documents.runs_document(tiny, RUNS, "cpu")
    assert doc["schema"] == 1 and doc["device"] == "cpu" and doc["spec"] == tiny.to_dict()
    assert doc["runs"] == [r.to_json() for r in RUNS]
    assert documents.to_json(tiny, RUNS, "cpu") == doc
