"""One function per command: options in, a CommandOutput out (the files to write, the JSON document, the tables to
show, the exit code). The command line (memopt.cli) parses options, calls one of these and renders what it returns;
nothing here prints or exits. Progress and notes go to the ``ui`` the caller gives.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from memopt.analysis import check as checks
from memopt.analysis.capacity import capacity, nothing_fits
from memopt.analysis.compare import compare as compare_runs
from memopt.analysis.compare import planned_runs
from memopt.analysis.estimate import analytic, fits
from memopt.analysis.estimate import estimate as estimate_run
from memopt.analysis.optimize import optimize as optimize_search
from memopt.analysis.optimize import winner_spec
from memopt.analysis.view import view as view_snapshot
from memopt.app.isolate import run_isolated
from memopt.app.profile import profile as profile_run
from memopt.core.errors import MemoptError
from memopt.core.units import parse_percent, parse_size
from memopt.engine.devices import resolve_device
from memopt.render import documents, plot, tables, text
from memopt.render import markdown as md
from memopt.render.exports import Exports
from memopt.render.outputs import CommandOutput, Outputs
from memopt.render.report_html import report_html, run_view
from memopt.spec import HfModelSpec, Spec, config_note, load_spec
from memopt.spec.hf_config import shadow_note
from memopt.spec.load import absolute_paths
from memopt.spec.strategy_args import one_set, parse_sets
from memopt.strategies import registry


class Ui(Protocol):
    """Where a command reports as it goes (stderr): progress lines, notes, and each isolated run as it starts."""

    def progress(self, message: str) -> None: ...

    def note(self, message: str) -> None: ...  # a line on stderr, as it is

    def run_started(self, name: str, total: int) -> None: ...


@dataclass
class SpecOptions:
    """The options every command that runs a model takes: CONFIG, the spec overrides and ``-s``."""

    config: str | None = None
    strategies: list[str] | None = None
    overrides: dict[str, Any] | None = None


def load(given: SpecOptions, ui: Ui, **defaults: Any) -> Spec:
    """The spec CONFIG names, with the command line's overrides (``defaults`` fill the ones not given)."""
    note = config_note(given.config)
    if note:
        ui.note(f"note: {note}")
    overrides = {**(given.overrides or {})}
    for key, value in defaults.items():
        overrides[key] = overrides.get(key) or value
    spec = load_spec(given.config, overrides, one_set(given.strategies))
    shadowed = shadow_note(spec.model.hf) if isinstance(spec.model, HfModelSpec) else None
    if shadowed:
        ui.note(f"note: {shadowed}")
    return spec


def _size(text: str | None, option: str) -> int | None:
    return None if text is None else parse_size(text, option)


def _checked_exports(spec: Spec, exports: Exports | None, single_run: bool = True, fake: bool = False,
                     timeline: str | None = None) -> Exports:
    """The event-level files asked for (and profile's ``--timeline``), refused before anything runs where they
    cannot be written."""
    exports = exports or Exports()
    exports.check(single_run)
    if timeline is not None:
        plot.check_timeline_path(timeline)
    if (exports.wanted or timeline is not None) and getattr(spec.model, "backend", "torch") == "tensorflow":
        raise MemoptError("--timeline, --html, --snapshot and --trace draw the events memopt's tracker records; a "
                          "Keras model on TensorFlow is measured from its allocator instead (--backend torch draws "
                          "them)")
    if (exports.wanted or timeline is not None) and spec.world_size > 1 and not fake:
        raise MemoptError("--timeline, --html, --snapshot and --trace draw one process's events; with --world-size, "
                          "estimate traces one rank (memopt estimate ... --html FILE)")
    return exports


def profile(given: SpecOptions, ui: Ui, *, json_out: str | None = None, timeline: str | None = None,
            device_memory: str | None = None, fit_check: bool = True, exports: Exports | None = None) -> CommandOutput:
    """``memopt profile``: preflight, drift, the measured run; tables, JSON, the timeline and the exports."""
    spec = load(given, ui)
    limit = _size(device_memory, "--device-memory")
    exports = _checked_exports(spec, exports, timeline=timeline)
    outputs = Outputs({"spec": given.config}, json_out=json_out, timeline=timeline, **exports.paths())
    record = timeline is not None or exports.wanted
    result = profile_run(spec, progress=ui.progress, timeline=record, stacks=exports.stacks, device_memory=limit,
                         fit_check=fit_check)
    if result.rank:  # under torchrun: rank 0 reports for every rank
        return CommandOutput(outputs, silent=True)
    title = text.profile_title(spec, result)
    if timeline is not None:
        outputs.add("--timeline", plot.render_timeline(result, timeline, title))
    if exports.wanted:
        exports.add(outputs, [result], title)
    outputs.set_json(documents.to_json(spec, [result], result.device))
    return CommandOutput(outputs, lambda: tables.print_tables(tables.profile_tables(spec, result)),
                         warnings=result.warnings)


def compare(given: SpecOptions, ui: Ui, sets: list[str], *, backends: list[str] | None = None,
            json_out: str | None = None, markdown: str | None = None, plot_path: str | None = None,
            device_memory: str | None = None, exports: Exports | None = None) -> CommandOutput:
    """``memopt compare``: the baseline and each set, each in its own process, side by side; with several Keras
    ``backends``, the baseline on each."""
    spec = load(given, ui)
    others = [load(SpecOptions(given.config, given.strategies, {**(given.overrides or {}), "backend": b}), ui)
              for b in (backends or [])[1:]]
    if not sets and not others:
        raise MemoptError("--strategies: give the strategy sets to compare with the baseline, e.g. -s ckpt,chunked_ce "
                          "(or, for a Keras model, several backends: --backend torch,tensorflow)")
    limit = _size(device_memory, "--device-memory")
    device = resolve_device(spec.run.device)
    planned = planned_runs(spec, parse_sets(sets), device, others)  # everything a run would refuse, now
    exports = _checked_exports(spec, exports, single_run=False)
    outputs = Outputs({"spec": given.config}, json_out=json_out, markdown=markdown, plot=plot_path,
                      **exports.paths())
    if plot_path is not None:
        plot.check_png_path(plot_path, "--plot")
    run_one = functools.partial(run_isolated, timeline=exports.wanted, stacks=exports.stacks)
    runs = compare_runs(planned, run_one=run_one, device_memory=limit,
                        on_run=lambda name: ui.run_started(name, len(planned)))
    title = f"memopt compare - {text.spec_title(spec, device)}"
    show = lambda: tables.print_tables([tables.compare_table(runs, title)])  # noqa: E731
    if not runs[0].ok:
        return CommandOutput(outputs, show, error=f"the baseline failed: {runs[0].error}; nothing was written")
    outputs.set_json(documents.runs_document(spec, runs, device))
    if markdown is not None:
        outputs.add("--markdown", md.compare_markdown(runs, title))
    if plot_path is not None:
        outputs.add("--plot", plot.render_compare_png(runs, title))
    if exports.wanted:
        exports.add(outputs, runs, title)
    return CommandOutput(outputs, show)


def check(given: SpecOptions, ui: Ui, baseline: str, *, tolerance: str = "2%", update: bool = False,
          json_out: str | None = None, markdown: str | None = None,
          device_memory: str | None = None, fit_check: bool = True) -> CommandOutput:
    """``memopt check``: the run against a baseline file; exit code 3 when something grew past the tolerance
    (``update``: write the baseline instead)."""
    tol = parse_percent(tolerance, "--tolerance")
    spec = load(given, ui)
    limit = _size(device_memory, "--device-memory")
    outputs = Outputs({"spec": given.config, "--baseline": None if update else baseline}, json_out=json_out,
                      markdown=markdown, baseline=baseline if update else None)
    old = None if update else checks.load_baseline(Path(baseline))
    if old is not None:
        checks.ensure_comparable(old, spec, resolve_device(spec.run.device))
    result = profile_run(spec, progress=ui.progress, device_memory=limit, fit_check=fit_check)
    doc = documents.to_json(spec, [result], result.device)
    assert result.memory is not None
    peak = result.memory.peak_bytes
    if old is None:
        outputs.set_json(doc, also="--baseline")
        return CommandOutput(outputs, lambda: ui.note(text.baseline_written_line(baseline, peak)),
                             warnings=result.warnings)
    before = checks.baseline_memory(old)
    found = checks.growths(before, result.memory, tol)
    outputs.set_json(documents.check_document(doc, found, tol))
    if markdown is not None:
        outputs.add("--markdown", md.growth_markdown(found, tol, peak, before.peak_bytes))
    return CommandOutput(outputs, lambda: tables.print_check(found, tol, peak, before.peak_bytes),
                         warnings=result.warnings, exit_code=3 if found else 0)


def strategies(*, json_out: str | None = None) -> CommandOutput:
    """``memopt strategies``: every strategy, its options and what it saves."""
    outputs = Outputs({}, json_out=json_out)
    rows = text.strategy_rows(registry())
    outputs.set_json({"schema": documents.SCHEMA, "strategies": rows})
    return CommandOutput(outputs, lambda: tables.print_tables([tables.strategies_table(rows)]))


def estimate(given: SpecOptions, ui: Ui, *, json_out: str | None = None, budget: str | None = None,
             exports: Exports | None = None) -> CommandOutput:
    """``memopt estimate``: the profile traced on fake tensors; with a budget, whether it fits and what would."""
    spec = load(given, ui, device="cpu")
    limit = _size(budget, "--fits")
    exports = _checked_exports(spec, exports, fake=True)
    outputs = Outputs({"spec": given.config}, json_out=json_out, **exports.paths())
    result = estimate_run(spec, progress=ui.progress, timeline=exports.wanted, stacks=exports.stacks)
    if exports.wanted:
        exports.add(outputs, [result], f"memopt estimate - {text.spec_title(spec, result.device)} (traced on fake "
                                       f"tensors)")
    assert result.memory is not None
    fit = fits(spec, result.memory.peak_bytes, limit, ui.progress) if limit is not None else None
    room = None
    if limit is not None and spec.run.mode == "generate":
        room = capacity(spec, limit, ui.progress)
        assert fit is not None
        if room.batch is None and room.context is None and not fit.helpers and not fit.not_tried:
            raise nothing_fits(spec, room, fit, str(budget))
    formulas = analytic(spec)
    outputs.set_json(documents.estimate_document(spec, result, formulas, fit, room))
    return CommandOutput(outputs, lambda: tables.print_estimate(spec, result, formulas, fit, room))


def optimize(given: SpecOptions, ui: Ui, budget: str, *, allow_lossy: bool = False, top: int = 3,
             output: str | None = None, measure: bool = True, max_drift: str | None = None,
             max_loss_increase: str | None = None, rounds: int = 3, json_out: str | None = None) -> CommandOutput:
    """``memopt optimize``: the fastest strategy set that fits the budget, written as a spec."""
    spec = load(given, ui)
    limit = _size(budget, "--budget")
    assert limit is not None
    drift = parse_percent(max_drift, "--max-drift") if max_drift is not None else None
    loss = parse_percent(max_loss_increase, "--max-loss-increase") if max_loss_increase is not None else None
    outputs = Outputs({"spec": given.config}, json_out=json_out, output=output)
    outcome = optimize_search(spec, limit, run_one=run_isolated, allow_lossy=allow_lossy, top=top, measure=measure,
                              max_drift=drift, max_loss_increase=loss, rounds=rounds, progress=ui.progress)
    cap = outcome.cap
    best = winner_spec(spec, outcome)
    if output is not None:
        outputs.add("--output", documents.winner_yaml(absolute_paths(best), outcome, budget))
    outputs.set_json(documents.optimize_document(best, outcome, cap))
    return CommandOutput(outputs, lambda: tables.print_optimize(outcome, top, cap, output))


def view(path: str, ui: Ui, *, top: int = 15, device: int | None = None, html: str | None = None,
         json_out: str | None = None) -> CommandOutput:
    """``memopt view``: a user's CUDA memory snapshot, reported as memopt reports its runs."""
    exports = Exports(html)
    exports.check()
    outputs = Outputs({"SNAPSHOT": path}, json_out=json_out, html=html)
    ui.progress(f"reading {path}")
    seen = view_snapshot(path, device)
    if html is not None:
        title = f"memopt view {Path(path).name} - device {seen.device}"
        view = run_view(f"device {seen.device}", seen.trace, stacks=True)
        outputs.add("--html", report_html(title, [view], seen.note or ""))
    outputs.set_json(documents.view_document(seen, top))
    return CommandOutput(outputs, lambda: tables.print_tables(tables.view_tables(seen, top)))
