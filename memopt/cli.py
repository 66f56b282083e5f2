"""Typer commands only: parse options, call the library, render, map errors to exit codes.

Heavy imports (torch) happen inside the commands so that ``memopt --help`` answers at once.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Memory profiler and optimizer for Transformer language models.\n\n"
                       "Example: [bold]memopt profile configs/tiny.yaml --strategies ckpt[/bold]")

ConfigArg = Annotated[Optional[str], typer.Argument(
    help="YAML spec file or preset name (gpt2, llama-7b, ...); the design document's model if omitted.",
    show_default=False)]
JsonOpt = Annotated[Optional[str], typer.Option(
    "--json", metavar="[FILE]",
    help="Write JSON to FILE (atomically), or to stdout when no FILE is given.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or auto.", show_default=False)]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="float32, bfloat16 or float16.",
                                                 show_default=False)]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Override train.batch_size.",
                                                 show_default=False)]
SeqOpt = Annotated[Optional[int], typer.Option("--seq-len", help="Override train.seq_len.", show_default=False)]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="Override train.steps.", show_default=False)]
StrategiesOpt = Annotated[Optional[str], typer.Option(
    "--strategies", "-s", help="Comma-separated strategies replacing the spec's, e.g. ckpt,chunked_ce or "
                               "'ckpt:policy=every,every=2'.", show_default=False)]


def _stdout() -> Any:
    from memopt.report import stdout_console

    return stdout_console()


def _stderr() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _fail(message: str, code: int = 1) -> None:
    _stderr().print(f"[bold red]error:[/bold red] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """memopt errors -> one message and exit 1; anything else too, with the traceback only under MEMOPT_DEBUG=1."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from memopt.errors import MemoptError

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except MemoptError as exc:
            if os.environ.get("MEMOPT_DEBUG"):
                raise
            _fail(str(exc).replace("[", "\\["))
        except Exception as exc:  # noqa: BLE001 - the contract is: no traceback without MEMOPT_DEBUG
            if os.environ.get("MEMOPT_DEBUG"):
                raise
            _fail(f"{type(exc).__name__}: {exc} (run with MEMOPT_DEBUG=1 for the traceback)".replace("[", "\\["))
    return wrapper


@contextmanager
def _progress() -> Iterator[Callable[[str], None]]:
    """A spinner on stderr that the library updates through a callback."""
    console = _stderr()
    if not console.is_terminal:
        yield lambda _msg: None
        return
    with console.status("starting") as status:
        yield lambda msg: status.update(msg)


def _load(config: str | None, strategies: str | None = None, **overrides: Any) -> Any:
    from memopt.spec import load_spec, split_strategy_list

    return load_spec(config, overrides, split_strategy_list(strategies) if strategies is not None else None)


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False) -> None:
    """Memory profiler and optimizer for Transformer language models."""
    if version:
        from memopt import __version__

        typer.echo(f"memopt {__version__}")
        raise typer.Exit()


DeviceMemoryOpt = Annotated[Optional[str], typer.Option(
    "--device-memory", help="Simulate a device of this size, e.g. 24GiB: a run whose live tensors exceed it stops "
                            "as out of memory.", show_default=False)]
MarkdownOpt = Annotated[Optional[str], typer.Option("--markdown", metavar="FILE",
                                                    help="Also write the table as Markdown (for a PR comment).")]


@app.command()
@handle_errors
def profile(config: ConfigArg = None, *, json_out: JsonOpt = None, device: DeviceOpt = None,
            dtype: DtypeOpt = None, batch_size: BatchOpt = None, seq_len: SeqOpt = None,
            steps: StepsOpt = None, strategies: StrategiesOpt = None, device_memory: DeviceMemoryOpt = None,
            timeline: Annotated[Optional[str], typer.Option(
                "--timeline", metavar="FILE", help="Write live memory over the step: FILE.png or FILE.html.",
                show_default=False)] = None) -> None:
    """Build the model, run a warm-up and measured training steps, and show where every byte went.

    Example: [bold]memopt profile configs/tiny.yaml --strategies ckpt,chunked_ce --json out.json[/bold]
    """
    from memopt import report, runner
    from memopt.units import parse_size

    spec = _load(config, strategies, device=device, dtype=dtype, batch_size=batch_size, seq_len=seq_len,
                 steps=steps)
    limit = parse_size(device_memory) if device_memory else None
    if timeline:
        from memopt.plot import check_timeline_path, write_timeline

        check_timeline_path(timeline)
    with _progress() as say:
        result = runner.run(spec, progress=say, timeline=timeline is not None, device_memory=limit)
    if timeline:

        assert result.memory is not None
        write_timeline(result.memory, timeline, f"memopt profile - {report.spec_title(spec, result.device)}")
    if json_out is not None:
        report.write_json(report.to_json(spec, [result], result.device), json_out)
    if json_out != "-":
        report.print_tables(report.profile_tables(spec, result))


@app.command()
@handle_errors
def compare(config: ConfigArg = None, *, strategies: Annotated[str, typer.Option(
                "--strategies", "-s", help="Comma-separated strategy sets; + joins strategies into one set, "
                                           "name:key=value sets options, e.g. 'quant:bits=4,ckpt,quant+ckpt'.")],
            json_out: JsonOpt = None, markdown: MarkdownOpt = None,
            plot: Annotated[Optional[str], typer.Option("--plot", metavar="FILE.png",
                                                        help="Bar chart of peak by category per run.")] = None,
            device: DeviceOpt = None, dtype: DtypeOpt = None, batch_size: BatchOpt = None, seq_len: SeqOpt = None,
            steps: StepsOpt = None, device_memory: DeviceMemoryOpt = None) -> None:
    """Run the baseline and each strategy set side by side, each in its own process.

    Example: [bold]memopt compare configs/tiny.yaml --strategies ckpt,chunked_ce,ckpt+chunked_ce --markdown pr.md[/bold]
    """
    from memopt import report
    from memopt.compare import compare as run_compare
    from memopt.compare import parse_sets, set_spec
    from memopt.runner import resolve_device
    from memopt.units import parse_size

    spec = _load(config, None, device=device, dtype=dtype, batch_size=batch_size, seq_len=seq_len, steps=steps)
    sets = parse_sets(strategies)
    if not sets:
        _fail("--strategies: name at least one strategy set, e.g. ckpt,chunked_ce")
    for entries in sets:
        set_spec(spec, entries)  # every set's names and options are checked before anything runs
    limit = parse_size(device_memory) if device_memory else None
    device_name = resolve_device(spec.run.device)
    runs = _compare_with_progress(run_compare, spec, sets, limit)
    title = f"memopt compare - {report.spec_title(spec, device_name)}"
    if json_out is not None:
        report.write_json(report.runs_document(spec, runs, device_name), json_out)
    if markdown:
        report.write_atomic(Path(markdown), report.compare_markdown(runs, title))
    if plot:
        from memopt.plot import write_compare_png

        write_compare_png(runs, plot, title)
    if json_out != "-":
        report.print_tables([report.compare_table(runs, title)])
    if not runs[0]["ok"]:
        _fail(f"the baseline failed: {runs[0]['error']}")


def _compare_with_progress(run_compare: Callable[..., Any], spec: Any, sets: list[list[str]],
                           limit: int | None) -> list[dict[str, Any]]:
    """Rich progress on stderr: one line per run with its elapsed time."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=_stderr(), transient=False, disable=not _stderr().is_terminal) as progress:
        current: list[Any] = []

        def on_run(name: str) -> None:
            if current:
                progress.update(current[-1], completed=1, total=1)
            current.append(progress.add_task(f"run {len(current) + 1}/{len(sets) + 1}: {name}", total=None))

        runs = run_compare(spec, sets, device_memory=limit, on_run=on_run)
        if current:
            progress.update(current[-1], completed=1, total=1)
    return runs


@app.command()
@handle_errors
def check(config: ConfigArg = None, *, baseline: Annotated[str, typer.Option(
              "--baseline", metavar="FILE", help="memopt JSON to compare with (written by --update).")],
          tolerance: Annotated[str, typer.Option("--tolerance", help="Allowed growth, e.g. 2%.")] = "2%",
          update: Annotated[bool, typer.Option("--update", help="Write the new baseline (atomically).")] = False,
          json_out: JsonOpt = None, markdown: MarkdownOpt = None, device: DeviceOpt = None,
          dtype: DtypeOpt = None, strategies: StrategiesOpt = None) -> None:
    """CI memory-regression gate: exit 3 when the peak, a category or a phase grew past the tolerance.

    Example: [bold]memopt check configs/tiny.yaml --baseline tests/baselines/tiny.json --tolerance 1%[/bold]
    """
    from memopt import report, runner
    from memopt.check import ensure_comparable, growths, load_baseline
    from memopt.units import parse_percent

    tol = parse_percent(tolerance, "--tolerance")
    spec = _load(config, strategies, device=device, dtype=dtype)
    path = Path(baseline)
    old = None if update else load_baseline(path)
    device_name = runner.resolve_device(spec.run.device)
    if old is not None:
        ensure_comparable(old, spec, device_name)
    with _progress() as say:
        result = runner.run(spec, progress=say)
    doc = report.to_json(spec, [result], result.device)
    if update:
        report.write_json(doc, str(path))
        _stderr().print(f"baseline written to {path}: peak {report.format_bytes(doc['runs'][0]['peak_bytes'])}")
        return
    assert old is not None
    found = growths(old["runs"][0], doc["runs"][0], tol)
    if json_out is not None:
        report.write_json({**doc, "check": {"tolerance": tol, "regressions": [g.__dict__ for g in found]}}, json_out)
    if markdown:
        report.write_atomic(Path(markdown), report.growth_markdown(found, tol, doc["runs"][0]["peak_bytes"],
                                                                   old["runs"][0]["peak_bytes"]))
    if json_out != "-":
        console = _stdout()
        if found:
            console.print(report.growth_table(found, tol))
        else:
            console.print(f"[green]OK[/green]: peak {report.format_bytes(doc['runs'][0]['peak_bytes'])} "
                          f"(baseline {report.format_bytes(old['runs'][0]['peak_bytes'])}); nothing grew more "
                          f"than {100 * tol:g}%")
    if found:
        raise typer.Exit(3)


@app.command()
@handle_errors
def strategies(*, json_out: JsonOpt = None) -> None:
    """List the strategies: options and defaults, what each saves, where it works.

    Example: [bold]memopt strategies[/bold], then [bold]memopt profile --strategies ckpt:policy=selective,chunked_ce[/bold]
    """
    from memopt import report
    from memopt.strategies import registry

    rows = report.strategy_rows(registry())
    if json_out is not None:
        report.write_json({"schema": report.SCHEMA, "strategies": rows}, json_out)
    if json_out != "-":
        report.print_tables([report.strategies_table(rows)])


@app.command()
@handle_errors
def estimate(config: ConfigArg = None, *, json_out: JsonOpt = None, device: DeviceOpt = None,
             dtype: DtypeOpt = None, batch_size: BatchOpt = None, seq_len: SeqOpt = None,
             strategies: StrategiesOpt = None, fits: Annotated[Optional[str], typer.Option(
                 "--fits", metavar="SIZE", help="Answer whether it fits in SIZE (e.g. 24GiB); if not, which "
                                                "single strategies would make it fit.", show_default=False)] = None
             ) -> None:
    """Predict the profile without allocating (fake tensors): for models larger than this machine.

    Example: [bold]memopt estimate llama-7b --batch-size 1 --seq-len 2048 --dtype bf16 --device cuda --fits 80GiB[/bold]
    """
    from memopt import report
    from memopt.estimate import analytic, estimate as run_estimate, fits as check_fits
    from memopt.units import parse_size

    spec = _load(config, strategies, device=device or "cpu", dtype=dtype, batch_size=batch_size,
                 seq_len=seq_len)
    budget = parse_size(fits) if fits else None
    with _progress() as say:
        result = run_estimate(spec, progress=say)
        assert result.memory is not None
        fit = check_fits(spec, result.memory.peak_bytes, budget, say) if budget else None
    formulas = analytic(spec)
    if json_out is not None:
        doc = report.to_json(spec, [result], result.device)
        doc["estimated"] = True
        doc["analytic"] = formulas
        if fit is not None:
            doc["fits"] = {"budget_bytes": fit.budget, "fits": fit.fits, "margin_bytes": fit.margin,
                           "single_strategies_that_fit": fit.helpers}
        report.write_json(doc, json_out)
    if json_out != "-":
        tables = report.profile_tables(spec, result)
        tables[0].title = str(tables[0].title).replace("memopt profile", "memopt estimate (traced, nothing allocated)")
        console = _stdout()
        report.print_tables([tables[0], tables[1], tables[2], report.estimate_table(result, formulas)], console)
        for line in report.fit_lines(fit) if fit else []:
            console.print(line)


@app.command()
@handle_errors
def optimize(config: ConfigArg = None, *, budget: Annotated[str, typer.Option(
                 "--budget", help="Peak tensor memory to fit under, e.g. 8GiB.")],
             allow_lossy: Annotated[bool, typer.Option(
                 "--allow-lossy", help="Also try lossy strategies (quantization, pruning, 8-bit states, amp).")] = False,
             top: Annotated[int, typer.Option("--top", min=1, max=20, help="Candidates to measure for real.")] = 3,
             output: Annotated[Optional[str], typer.Option(
                 "--output", "-o", metavar="FILE.yaml", help="Write the winning spec here.")] = None,
             no_measure: Annotated[bool, typer.Option(
                 "--no-measure", help="Rank on estimates only, even when the model runs here.")] = False,
             max_drift: Annotated[Optional[str], typer.Option(
                 "--max-drift", metavar="PCT", help="Allow lossy strategies whose measured drift (relative error "
                 "of the logits) stays under PCT, e.g. 1%; implies --allow-lossy, needs the model to run here.",
                 show_default=False)] = None,
             json_out: JsonOpt = None, device: DeviceOpt = None, dtype: DtypeOpt = None,
             batch_size: BatchOpt = None, seq_len: SeqOpt = None, steps: StepsOpt = None) -> None:
    """Search strategy combinations; show the fastest that fits the budget and write it as a spec.

    Example: [bold]memopt optimize configs/seed.yaml --budget 1GiB --output best.yaml[/bold], then [bold]memopt profile best.yaml[/bold]
    """
    import yaml

    from memopt import report
    from memopt.optimize import optimize as run_optimize
    from memopt.optimize import winner_spec
    from memopt.units import format_bytes, parse_percent, parse_size

    spec = _load(config, None, device=device, dtype=dtype, batch_size=batch_size, seq_len=seq_len, steps=steps)
    limit = parse_size(budget)
    cap = parse_percent(max_drift, "--max-drift") if max_drift is not None else None
    with _progress() as say:
        outcome = run_optimize(spec, limit, allow_lossy=allow_lossy, top=top, measure=not no_measure,
                               max_drift=cap, progress=say)
    best = winner_spec(spec, outcome)
    if output:
        header = (f"# written by memopt optimize --budget {budget}: {outcome.winner.label}, estimated peak "
                  f"{format_bytes(outcome.winner.peak)}\n")
        report.write_atomic(Path(output), header + yaml.safe_dump(best, sort_keys=False))
    if json_out is not None:
        report.write_json({"schema": report.SCHEMA, "budget_bytes": limit, "winner": best["strategies"],
                           "candidates": [c.__dict__ for c in outcome.ranked], "evaluated": outcome.evaluated,
                           "search_s": outcome.seconds, "measured_here": outcome.measured_here,
                           "max_drift": cap, "left_out_for_drift": outcome.rejected}, json_out)
    if json_out != "-":
        console = _stdout()
        console.print(report.optimize_table(outcome, top))
        if outcome.rejected:
            console.print(f"left out for their own drift over {100 * cap:g}%: {', '.join(outcome.rejected)}")
        console.print(f"winner: [bold]{outcome.winner.label}[/bold]" + (f" -> {output}" if output else ""))


def normalize_argv(args: list[str]) -> list[str]:
    """Give ``--json`` its optional value: a bare ``--json`` (last, or before an option or a YAML file)
    means ``--json -`` (stdout). Typer has no optional-value options, so the entry point does this."""
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg == "--json":
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is None or (nxt.startswith("-") and nxt != "-") or nxt.endswith((".yaml", ".yml")):
                out.append("-")
    return out


def main() -> None:  # pragma: no cover - console entry point
    app(args=normalize_argv(sys.argv[1:]), prog_name="memopt")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
