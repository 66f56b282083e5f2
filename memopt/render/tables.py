"""Results -> Rich tables on stdout: the profile, ranks, strategies, compare, check, estimate and optimize."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.measure import Measurement
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from memopt.core.results import RunResult, StepMemory, cuda_reconciliation
from memopt.core.units import format_bytes
from memopt.render.text import (
    CATEGORY_HELP,
    COMPARE_COLUMNS,
    COMPARE_LEGEND,
    TENSORFLOW_CATEGORY_HELP,
    apart,
    compare_rows,
    drift_text,
    drift_when,
    fit_lines,
    growth_text,
    inference_rows,
    percent_of,
    profile_title,
)
from memopt.spec import Spec


def profile_tables(spec: Spec | None, result: RunResult, *, title: str | None = None,
                   warmed_up: bool = True) -> list[Table]:
    """The summary, the breakdown by category and the peak by phase for one run.

    ``title`` replaces the profile's (made from ``spec``; memopt.app.track has no spec); ``warmed_up`` false: the
    step time does not say "after a warm-up"."""
    if title is None:
        assert spec is not None, "profile_tables needs a spec or a title"
        title = profile_title(spec, result)
    summary = Table(title=title, show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    summary.add_column(style="dim")
    for row in (*_memory_rows(result), *_run_rows(result, warmed_up), *_strategy_rows(result)):
        summary.add_row(*row)
    tables = [summary, _breakdown_table(result)]
    if result.ranks:
        tables.append(ranks_table(result))
    return [*tables, _phase_table(result)]


Row = tuple[str, str, str]


def _memory_rows(result: RunResult) -> list[Row]:
    """The peak, where it happened, and the other views of memory (CUDA's allocator, the OS, the Python heap)."""
    mem = result.memory
    assert mem is not None
    where = f" in {mem.peak_module}" if mem.peak_module else ""
    rows = [("Peak tensor memory", format_bytes(mem.peak_bytes), f"during {mem.peak_phase}{where}")]
    if result.host.cuda:
        rows += _cuda_rows(mem, result.host.cuda)
    if result.tensorflow is not None:
        return rows + _tensorflow_rows(mem, result.tensorflow)
    rows.append(("Process RSS peak", format_bytes(result.host.rss_peak_bytes), "OS view of the process"))
    if not result.estimated and result.host.python_heap_peak_bytes:  # 0: not traced (memopt run)
        rows.append(("Python heap peak", format_bytes(result.host.python_heap_peak_bytes), "tracemalloc: not tensors"))
    return rows


def _tensorflow_rows(mem: StepMemory, facts: dict[str, Any]) -> list[Row]:
    """TensorFlow's own figures beside the tensors' peak: its allocator's peak, or XLA's buffer assignment."""
    if "allocator_peak_bytes" in facts:
        over = facts["allocator_peak_bytes"] - mem.peak_bytes
        return [("TF allocator peak", format_bytes(facts["allocator_peak_bytes"]),
                 f"get_memory_info: its chunks, {format_bytes(abs(over))} {'above' if over >= 0 else 'below'} the "
                 "tensors' peak")]
    xla = facts.get("xla_buffer_assignment", {})
    return [("XLA parameters", format_bytes(xla.get("parameter_bytes", 0)), "weights, optimizer slots, the batch"),
            ("XLA temp buffer", format_bytes(xla.get("temp_bytes", 0)), "every intermediate, overlapped"),
            ("XLA outputs", format_bytes(xla.get("output_bytes", 0) + xla.get("constant_bytes", 0)),
             "and constants")]


def _cuda_rows(mem: StepMemory, cuda: dict[str, int]) -> list[Row]:
    """The CUDA allocator's peaks beside the tracker's, the difference named where it can be."""
    r = cuda_reconciliation(mem, cuda)
    d = r["difference"]
    share = f", {abs(d) / r['tracker_peak']:.1%}" if r["tracker_peak"] else ""
    versus = f"{format_bytes(abs(d))}{share} {'above' if d >= 0 else 'below'} the tracker's peak"
    named = f", {format_bytes(r['outside_at_start'])} of it allocated outside any op before the step" \
        if r["outside_at_start"] and d > 0 else ""
    return [("CUDA max allocated", format_bytes(r["max_allocated"]),
             f"torch.cuda.max_memory_allocated: {versus}{named}"),
            ("CUDA max reserved", format_bytes(r["max_reserved"]),
             f"{format_bytes(r['reserved_not_allocated'])} reserved and not allocated (cache, fragmentation)")]


def _run_rows(result: RunResult, warmed_up: bool) -> list[Row]:
    """Time, loss, the inference facts and the parameters."""
    runs = f"of {len(result.step_times_s)}"
    if result.estimated and result.tensorflow is not None:
        rows = [("Compile + step", f"{result.step_time_s:.1f} s", "XLA compiles the step at its first call")]
    elif result.estimated:
        rows = [("Trace time", f"{result.step_time_s:.1f} s", "one step on fake tensors")]
    elif result.inference is not None:
        what = "generation" if result.inference["mode"] == "generate" else "forward pass"
        rows = [(f"Time per {what} (median)", f"{result.step_time_s * 1000:.1f} ms", f"{runs}, after a warm-up")]
    else:
        rows = [("Step time (median)", f"{result.step_time_s * 1000:.1f} ms",
                 runs + (", after a warm-up" if warmed_up else "")),
                ("Loss", f"{result.loss:.4f}", "")]
    if result.inference is not None:
        return [*rows, *inference_rows(result.inference),
                ("Parameters", f"{result.params_total:,}", "inference: none trains")]
    return [*rows, ("Parameters", f"{result.params_total:,}", f"{result.params_trainable:,} trainable")]


def _strategy_rows(result: RunResult) -> list[Row]:
    """Accuracy drift, the strategies, what each reported, and the notes."""
    rows: list[Row] = []
    drift = result.drift
    if drift is not None and "held_out_loss" in drift:
        rows.append(("Held-out loss", f"{drift['held_out_loss']:.4f}",
                     f"unchanged model {drift['held_out_loss_ref']:.4f} "
                     f"({100 * drift['held_out_loss_increase']:+.2f}%); "
                     f"perplexity {drift['held_out_perplexity']:.2f}; {drift['held_out_tokens']:,} held-out tokens"))
    if result.drift is not None and "tokens_differ" in result.drift:
        rows.append(("Accuracy drift", drift_text(result.drift),
                     "greedy tokens that differ from the unchanged model's; logits' relative error up to "
                     "the first different token"))
    elif result.drift is not None:
        rows.append(("Accuracy drift", drift_text(result.drift),
                     f"logits vs unchanged model, {drift_when(result.drift)}; loss {result.drift['loss_delta']:+.4f}"))
    if result.strategies:
        rows.append(("Strategies", ", ".join(next(iter(s)) for s in result.strategies), ""))
    for name, facts in result.strategy_facts.items():
        rows += [(f"{name}: {key.replace('_', ' ')}", format_bytes(value) if key.endswith("bytes") else str(value), "")
                 for key, value in facts.items()]
    return rows + [("Note", "", note) for note in result.notes]


def _breakdown_table(result: RunResult) -> Table:
    mem = result.memory
    assert mem is not None
    breakdown = Table(title="Where the bytes go", title_justify="left")
    for col, justify in (("category", "left"), ("at peak", "right"), ("share", "right"),
                         ("own peak", "right"), ("after step", "right"), ("what", "left")):
        breakdown.add_column(col, justify=justify)  # type: ignore[arg-type]
    help_for = TENSORFLOW_CATEGORY_HELP if result.tensorflow is not None else CATEGORY_HELP
    for c in mem.peak_breakdown:
        state = mem.state_bytes.get(c)
        breakdown.add_row(c, format_bytes(mem.peak_breakdown[c]), percent_of(mem.peak_breakdown[c], mem.peak_bytes),
                          format_bytes(mem.category_peak_bytes[c]),
                          format_bytes(state) if state is not None else "-", help_for.get(c, ""))
    breakdown.add_row("total", format_bytes(mem.peak_bytes), "100%", "", "", "", style="bold")
    return breakdown


def _phase_table(result: RunResult) -> Table:
    mem = result.memory
    assert mem is not None
    phases = Table(title="Peak by phase", title_justify="left")
    phases.add_column("phase")
    phases.add_column("peak", justify="right")
    phases.add_column("of step peak", justify="right")
    for p in mem.phase_peak_bytes:
        phases.add_row(p, format_bytes(mem.phase_peak_bytes[p]), percent_of(mem.phase_peak_bytes[p], mem.peak_bytes))
    return phases


RANK_COLUMNS = 8  # more ranks than this: min / max / the rank at the peak instead of a column each


def ranks_table(result: RunResult) -> Table:
    """Per rank: the peak and each category's bytes at it (min and max over the ranks when there are many)."""
    ranks = result.ranks or []
    categories = list(ranks[0]["peak_breakdown"]) if ranks else []
    table = Table(title=f"Per rank ({len(ranks)} ranks; the run's numbers are its highest rank's)",
                  title_justify="left")
    table.add_column("")
    if len(ranks) <= RANK_COLUMNS:
        columns = [(f"rank {r['rank']}", [r]) for r in ranks]
    else:
        low = min(ranks, key=lambda r: r["peak_bytes"])
        high = max(ranks, key=lambda r: r["peak_bytes"])
        columns = [(f"min (rank {low['rank']})", [low]), (f"max (rank {high['rank']})", [high])]
    for name, _ in columns:
        table.add_column(name, justify="right")
    mesh = result.mesh or {}
    if mesh.get("tp", 1) > 1:  # a 2-D run: where each rank sits, (data-parallel index, tensor-parallel index)
        table.add_row("mesh (dp, tp)", *(f"({rs[0]['rank'] // mesh['tp']}, {rs[0]['rank'] % mesh['tp']})"
                                         for _, rs in columns))
    table.add_row("peak", *(format_bytes(rs[0]["peak_bytes"]) for _, rs in columns), style="bold")
    for c in categories:
        table.add_row(f"{c} at peak", *(format_bytes(rs[0]["peak_breakdown"][c]) for _, rs in columns))
    return table


def stdout_console() -> Console:
    """Rich console for results; when piped (CI logs, files) it is wide enough for the tables."""
    console = Console(emoji=False)
    return console if console.is_terminal else Console(width=max(console.width, 140), emoji=False)


def print_tables(tables: list[Table], console: Console | None = None) -> None:
    """Each table as it is when it fits; piped output is never cut (the console widens to the table);
    on a terminal too narrow for a table's cells, each row is stacked as ``column: value`` lines."""
    console = console or stdout_console()
    for table in tables:
        if not console.is_terminal:
            widest = Measurement.get(console, console.options.update_width(10**4), table).maximum
            width = console.width
            console.width = max(widest, width)
            console.print(table)
            console.width = width
        elif readable_width(table) > console.width:
            console.print(stacked(table))
        else:
            console.print(table)


def readable_width(table: Table) -> int:
    """The narrowest the table can be without breaking a word in any cell or header (borders included)."""
    total = 1
    for column in table.columns:
        texts = [str(column.header), *(str(cell) for cell in column.cells)]
        if column.no_wrap:
            longest = max((len(Text.from_markup(t).plain) for t in texts), default=0)
        else:
            longest = max((len(word) for t in texts for word in Text.from_markup(t).plain.split()), default=0)
        total += longest + 3  # one space each side and a border
    return total


def stacked(table: Table) -> Group:
    """A table for a narrow terminal: the title, then per row one ``column: value`` line per cell."""
    headers = [str(column.header) for column in table.columns]
    cells = [list(column.cells) for column in table.columns]
    parts: list[Any] = [Text(str(table.title), style="bold")] if table.title else []
    for row in range(table.row_count):
        record = Table(show_header=False, box=None, padding=(0, 1, 0, 0))
        record.add_column(style="bold", overflow="fold")
        record.add_column(overflow="fold")
        for header, column in zip(headers, cells):
            if str(column[row]):
                record.add_row(header, column[row])
        parts.append(Padding(record, (1 if row else 0, 0, 0, 0)) if headers[0] else record)
    if table.caption:
        parts.append(Text(str(table.caption)))
    return Group(*parts)


def strategies_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="memopt strategies (applied in this order when combined with +)", title_justify="left",
                  expand=True)
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("what it does / [dim]what it saves[/dim]", ratio=3)
    table.add_column("options = default", ratio=2)
    table.add_column("devices / modes", no_wrap=True)
    for row in rows:
        opts = "\n".join(f"{k} = {v['default']}" + (f" [dim]({v['type']})[/dim]" if "|" in v["type"] else "")
                         for k, v in row["options"].items()) or "-"
        text = f"{row['summary']}\n[dim]{row['saves']}[/dim]" + ("\n[yellow]lossy[/yellow]" if row["lossy"] else "")
        for other in row["refuses"]:
            text += f"\n[red]refuses {other}[/red]"
        table.add_row(row["name"], text, opts, ", ".join(row["devices"]) + "\n" + ", ".join(row["modes"]))
    return table


def compare_table(runs: list[RunResult], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for key, label in COMPARE_COLUMNS:
        table.add_column(label, justify="left" if key in ("run", "changed", "status") else "right",
                         no_wrap=key in ("peak", "saving", "time"))
    failures: list[str] = []
    for row in compare_rows(runs):
        style = None
        if row["status"] != "ok":
            failures.append(f"[{len(failures) + 1}] {row['run']}: {row['status'].removeprefix('failed: ')}")
            row = {**row, "status": f"failed [{len(failures)}]"}
            style = "red"
        table.add_row(*(row[key] for key, _ in COMPARE_COLUMNS), style=style)
    table.caption = "\n".join([*failures, COMPARE_LEGEND]).replace("[", "\\[")
    table.caption_justify = "left"
    return table


def growth_table(found: list[Any], tolerance: float) -> Table:
    """What grew past the tolerance in ``memopt check``."""
    table = Table(title=f"Memory regressions (tolerance {100 * tolerance:g}%)", title_justify="left")
    for col in ("what", "kind", "baseline", "now", "growth"):
        table.add_column(col, justify="left" if col in ("what", "kind") else "right")
    for g in found:
        table.add_row(g.what, g.kind, format_bytes(g.baseline), format_bytes(g.now), growth_text(g),
                      style="red")
    return table


def estimate_table(result: RunResult, formulas: dict[str, int | None]) -> Table:
    """Traced estimate beside the standard formulas, with the formulas' error."""
    mem = result.memory
    assert mem is not None
    inference = result.inference is not None
    zero3 = " (model states: ZeRO-3, / N per rank)" if result.world_size > 1 else ""
    table = Table(title="Estimate vs the standard formulas" + zero3 + " (which ignore strategies, " + (
        "the prefill's working set and the logits)" if inference else "embeddings and the loss)"),
                  title_justify="left")
    for col in ("", "traced estimate", "formula", "formula is off by"):
        table.add_column(col, justify="left" if not col else "right")
    if inference:
        traced = {"params": mem.state_bytes["params"], "kv_cache": mem.category_peak_bytes["kv_cache"],
                  "peak": mem.peak_bytes}
    else:
        traced = {"params": mem.state_bytes["params"], "grads": mem.state_bytes["grads"],
                  "optimizer": mem.state_bytes["optimizer"], "activations": mem.category_peak_bytes["activations"],
                  "peak": mem.peak_bytes}
    for key, value in traced.items():
        formula = formulas.get(key)
        off = f"{100 * (formula - value) / value:+.1f}%" if formula is not None and value else "-"
        table.add_row(key, format_bytes(value), format_bytes(formula) if formula is not None else "-", off,
                      style="bold" if key == "peak" else None)
    return table


def optimize_table(outcome: Any, top: int) -> Table:
    """The ranked sets that fit: peaks, predicted and measured step time against the baseline, drift, and why each
    is where it is."""
    base = outcome.baseline
    table = Table(title=f"memopt optimize - budget {format_bytes(outcome.budget)}: {outcome.evaluated} sets estimated "
                        f"in {outcome.seconds:.0f} s", title_justify="left")
    for col in ("#", "strategies", "est. peak", "measured peak", "predicted", "measured", "drift", "why"):
        table.add_column(col, justify="left" if col in ("strategies", "why") else "right")
    shown = [c for c in outcome.ranked if c.ratio is not None or c.error]
    shown += [c for c in outcome.ranked if c not in shown][:max(top, 1) + 2 - len(shown)]
    for i, c in enumerate(shown, start=1):
        if c is outcome.winner:
            why = "fastest measured set that fits" if c.ratio is not None else "fastest predicted set that fits"
        elif c.error:
            why = c.error if c.error.startswith("over") else f"failed: {c.error}"
        elif c.ratio is not None:
            why = "slower when measured" if c.lossy <= outcome.winner.lossy else "more lossy strategies"
        else:
            why = "predicted slower" + (" (lossy)" if c.lossy else "")
        predicted = f"{c.predicted_s / base.predicted_s:.2f}x" if base.predicted_s else "-"
        table.add_row(str(i), c.label, format_bytes(c.peak),
                      format_bytes(c.measured_peak) if c.measured_peak is not None else "-",
                      predicted, c.ratio.text() if c.ratio is not None else "-",
                      drift_text(c.drift), why,
                      style="bold green" if c is outcome.winner else None)
    measured = (f"baseline measured at {base.measured_s:.2f} s a step" if base.measured_s is not None
                else "not measured here")
    table.caption = (f"predicted and measured: step time / the baseline's ({measured}); measured: the mean ratio over "
                     "rounds run side by side with the baseline, ± half their range; same: within that noise")
    table.caption_justify = "left"
    return table


def print_check(found: list[Any], tolerance: float, peak: int, baseline_peak: int) -> None:
    console = stdout_console()
    if found:
        print_tables([growth_table(found, tolerance)], console)
        return
    console.print(f"[green]OK[/green]: peak {format_bytes(peak)} (baseline {format_bytes(baseline_peak)}); "
                  f"nothing grew more than {100 * tolerance:g}%")


def print_estimate(spec: Spec, result: RunResult, formulas: dict[str, int | None], fit: Any,
                   capacity: Any = None) -> None:
    tables = profile_tables(spec, result)
    how = "(XLA's buffer assignment)" if result.tensorflow is not None else "(traced, nothing allocated)"
    tables[0].title = str(tables[0].title).replace("memopt profile", f"memopt estimate {how}")
    console = stdout_console()
    extra = [capacity_table(spec, capacity)] if capacity is not None else []
    print_tables([*tables, estimate_table(result, formulas), *extra], console)
    for line in fit_lines(fit) if fit else []:
        console.print(line)


def capacity_table(spec: Spec, cap: Any) -> Table:
    """What fits in the budget, by estimates, beside the formula's answers."""
    g, batch = spec.generate, spec.train.batch_size
    table = Table(title=f"What fits in {format_bytes(cap.budget)} ({cap.estimates} estimates, {cap.seconds:.0f} s)",
                  title_justify="left")
    for col in ("question", "traced", "peak", "formula", "formula is off by"):
        table.add_column(col, justify="left" if col == "question" else "right")
    b = cap.batch[0] if cap.batch else 0
    table.add_row(f"sequences of {g.prompt_len} + {g.new_tokens} tokens", f"{b:,}",
                  format_bytes(cap.batch[1]) if cap.batch else "-", f"{cap.formula['max_batch']:,}",
                  apart(cap.formula["max_batch"], b))
    c = cap.context[0] if cap.context else 0
    limit = " (max_seq_len)" if c == cap.context_limit else ""
    table.add_row(f"context at batch {batch} (tokens)", f"{c:,}{limit}", format_bytes(cap.context[1]) if cap.context
                  else "-", f"{cap.formula['max_context']:,}", apart(cap.formula["max_context"], c))
    return table


def print_optimize(outcome: Any, top: int, cap: Any, output: str | None) -> None:
    console = stdout_console()
    print_tables([optimize_table(outcome, top)], console)
    if outcome.rejected:
        assert cap is not None
        console.print(f"left out for their own drift over {cap.option} {100 * cap.limit:g}%: "
                      f"{', '.join(outcome.rejected)}")
    console.print(f"winner: [bold]{outcome.winner.label}[/bold]" + (f" -> {output}" if output else ""))


def view_tables(seen: Any, top: int) -> list[Table]:
    """``memopt view``: the peak, the groups by top user frame, the largest allocations alive at the peak."""
    summary = Table(title=f"memopt view {seen.path} - device {seen.device}", show_header=False,
                    title_justify="left")
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    summary.add_column(style="dim")
    summary.add_row("peak", format_bytes(seen.peak_bytes), f"{seen.peak_bytes:,} B, at event {seen.peak_index} of "
                    f"{len(seen.trace.kinds) - 1}")
    summary.add_row("alive at the peak", str(len(seen.alive)), "allocations")
    if len(seen.devices) > 1:
        summary.add_row("devices", ", ".join(f"{d}: {format_bytes(p)}" for d, p in seen.devices.items()),
                        "--device N picks one")
    if seen.note:
        summary.caption, summary.caption_justify = f"note: {seen.note}", "left"
    groups = Table(title="alive at the peak, by the top frame of your code", title_justify="left")
    for col in ("top frame", "bytes", "share", "allocations"):
        groups.add_column(col, justify="left" if col == "top frame" else "right", overflow="fold")
    for name, nbytes, count in seen.groups[:top]:
        groups.add_row(name, format_bytes(nbytes), percent_of(nbytes, seen.peak_bytes), str(count))
    largest = Table(title=f"the {min(top, len(seen.alive))} largest allocations alive at the peak",
                    title_justify="left")
    for col in ("size", "top frame", "made in (innermost first)"):
        largest.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
    for x in seen.alive[:top]:
        frames = [f"{name} {f.rsplit('/', 1)[-1]}:{line}" for f, line, name in (x.allocation.frames or [])
                  if f.endswith(".py")][:3]
        largest.add_row(format_bytes(x.nbytes), x.allocation.op or "-", " < ".join(frames) or "-")
    return [summary, groups, largest]
