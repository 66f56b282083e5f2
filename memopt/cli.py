"""Typer commands only: parse options, call the library, render, map errors to exit codes.

Heavy imports (torch) happen inside the commands so that ``memopt --help`` answers at once.
"""

from __future__ import annotations

import functools
import os
import sys
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


def _split_strategies(text: str | None) -> list[str] | None:
    """'ckpt:policy=every,every=2,chunked_ce' -> ['ckpt:policy=every,every=2', 'chunked_ce']."""
    if text is None:
        return None
    parts: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if "=" in piece and ":" not in piece and parts:
            parts[-1] += "," + piece  # another key=value of the previous strategy
        elif piece:
            parts.append(piece)
    return parts


def _load(config: str | None, strategies: str | None = None, **overrides: Any) -> Any:
    from memopt.spec import load_spec

    return load_spec(config, overrides, _split_strategies(strategies))


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False) -> None:
    """Memory profiler and optimizer for Transformer language models."""
    if version:
        from memopt import __version__

        typer.echo(f"memopt {__version__}")
        raise typer.Exit()


@app.command()
@handle_errors
def profile(config: ConfigArg = None, *, json_out: JsonOpt = None, device: DeviceOpt = None,
            dtype: DtypeOpt = None, batch_size: BatchOpt = None, seq_len: SeqOpt = None,
            steps: StepsOpt = None, strategies: StrategiesOpt = None) -> None:
    """Build the model, run a warm-up and measured training steps, and show where every byte went.

    Example: [bold]memopt profile configs/tiny.yaml --strategies ckpt,chunked_ce --json out.json[/bold]
    """
    from memopt import report, runner

    spec = _load(config, strategies, device=device, dtype=dtype, batch_size=batch_size, seq_len=seq_len,
                 steps=steps)
    with _progress() as say:
        result = runner.run(spec, progress=say)
    if json_out is not None:
        report.write_json(report.to_json(spec, [result], result.device), json_out)
    if json_out != "-":
        report.print_tables(report.profile_tables(spec, result))


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
