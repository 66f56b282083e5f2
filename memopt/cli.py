"""Typer commands only: options -> one memopt.app.commands call -> render what it returned -> exit code.

memopt.app is imported when a command runs (``_commands``), so that ``memopt --help`` answers without torch.
"""

from __future__ import annotations

import atexit
import functools
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Optional

import typer

from memopt.core.errors import MemoptError
from memopt.core.processes import user_output_to_stderr
from memopt.core.version import __version__
from memopt.render.progress import PlainProgress

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Memory profiler and optimizer for Transformer language models.\n\n"
                       "Example: [bold]memopt profile configs/tiny.yaml --strategies ckpt+chunked_ce[/bold]")

STRATEGY_GRAMMAR = ("Strategies: name[:key=value,...], joined with + (e.g. 'quant:bits=4,format=nf4,lora=8+sdpa'); "
                    "a key=value piece belongs to the strategy before it. -s may be repeated.")
ConfigArg = Annotated[Optional[str], typer.Argument(
    help="YAML spec file or preset name (gpt2, llama-7b, ...); the design document's model if omitted.",
    show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of tables.")]
JsonOutOpt = Annotated[Optional[str], typer.Option(
    "--json-out", metavar="FILE", help="Also write JSON to FILE (only when the command succeeds).",
    show_default=False)]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or auto.", show_default=False)]
DtypeOpt = Annotated[Optional[str], typer.Option(
    "--dtype", help="float32, bfloat16 or float16: parameters, gradients, optimizer state and compute all in it "
    "(what --precision bf16-true means).", show_default=False)]
PrecisionOpt = Annotated[Optional[str], typer.Option(
    "--precision", help="As Lightning names it: fp32, bf16-mixed or fp16-mixed (fp32 parameters, gradients and "
    "AdamW moments, autocast compute: Trainer bf16=True), bf16-true or fp16-true (all in 16 bits).",
    show_default=False)]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Override train.batch_size.",
                                                 show_default=False)]
SeqOpt = Annotated[Optional[int], typer.Option("--seq-len", help="Override train.seq_len.", show_default=False)]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="Override train.steps.", show_default=False)]
StrategiesOpt = Annotated[Optional[list[str]], typer.Option(
    "--strategies", "-s", metavar="SET", help="Strategies replacing the spec's, all applied to this run, e.g. "
    "ckpt+chunked_ce or 'ckpt:policy=every,every=2'. " + STRATEGY_GRAMMAR, show_default=False)]
DeviceMemoryOpt = Annotated[Optional[str], typer.Option(
    "--device-memory", help="Simulate a device of this size, e.g. 24GiB: a run whose live tensors exceed it stops "
                            "as out of memory (from the model's build on).", show_default=False)]
HfOpt = Annotated[Optional[str], typer.Option(
    "--hf", metavar="PATH", help="A Hugging Face causal LM instead of the spec's model: a local config.json, a "
    "checkpoint folder (its safetensors weights are loaded), or a model_type's default config (llama, mistral, gpt2, "
    "qwen2, gemma, ...). Needs pip install 'memopt\\[hf]'.", show_default=False)]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", metavar="PKG.MODULE:FACTORY", help="Your own nn.Module instead of the spec's model: the factory is "
    "imported (which runs that module's code) and called; see README.", show_default=False)]
KerasOpt = Annotated[Optional[str], typer.Option(
    "--keras", metavar="PKG.MODULE:FACTORY", help="A Keras 3 model instead of the spec's model: the factory returns a "
    "keras.Model, compiled or not (then the spec's optimizer and sparse cross-entropy on logits). Needs pip install "
    "'memopt\\[tf]'.", show_default=False)]
BackendOpt = Annotated[Optional[str], typer.Option(
    "--backend", metavar="torch|tensorflow", help="The Keras model's backend: torch (memopt's tracker) or tensorflow "
    "(TensorFlow's allocator, in a process of its own).", show_default=False)]
DataOpt = Annotated[Optional[str], typer.Option(
    "--data", metavar="FILE", help="Batches from this text file (train.data): a Hugging Face checkpoint's tokenizer "
    "when it has one, else UTF-8 bytes. Default: seeded random token ids.", show_default=False)]
HeldOutOpt = Annotated[Optional[str], typer.Option(
    "--held-out", metavar="FILE", help="A text file the model did not train on (train.held_out): lossy strategies "
    "report the change of the loss on it, tokenized as --data.", show_default=False)]
WorldOpt = Annotated[Optional[int], typer.Option(
    "--world-size", help="Run on N ranks (processes) with FSDP2 (the spec's fsdp/ddp strategy on N ranks, or fsdp "
    "added): memopt launches them, or runs under torchrun's (torchrun ... -m memopt profile).", show_default=False)]
ModeOpt = Annotated[Optional[str], typer.Option(
    "--mode", help="train (a training step), infer (one forward pass under inference_mode) or generate (prefill + "
    "greedy decode with a KV cache); run.mode.", show_default=False)]
PromptLenOpt = Annotated[Optional[int], typer.Option("--prompt-len", help="--mode generate: prompt tokens per "
                                                     "sequence (generate.prompt_len).", show_default=False)]
NewTokensOpt = Annotated[Optional[int], typer.Option("--new-tokens", help="--mode generate: tokens generated per "
                                                     "sequence (generate.new_tokens).", show_default=False)]
CacheOpt = Annotated[Optional[str], typer.Option("--cache", help="--mode generate: static (preallocated) or dynamic "
                                                 "(grows each step) KV cache (generate.cache).", show_default=False)]
FitCheckOpt = Annotated[bool, typer.Option(
    "--no-fit-check", help="Start even when memopt's estimate says the run (or its --world-size ranks, one Python "
    "interpreter each) will not fit in this machine's memory or --device-memory: the OS may then kill it.")]
HtmlOpt = Annotated[Optional[str], typer.Option(
    "--html", metavar="FILE.html", help="Write the interactive report: one self-contained page (hover, zoom, the "
    "tensors alive at the peak, per-phase and per-module peaks).", show_default=False)]
SnapshotOpt = Annotated[Optional[str], typer.Option(
    "--snapshot", metavar="FILE.pickle", help="Write the step as a PyTorch memory snapshot (open it at "
    "pytorch.org/memory_viz, or read it back with memopt view).", show_default=False)]
TraceOpt = Annotated[Optional[str], typer.Option(
    "--trace", metavar="FILE.json", help="Write the step as a Chrome trace (ui.perfetto.dev, chrome://tracing): a "
    "counter per category, slices for phases and modules.", show_default=False)]
StacksOpt = Annotated[bool, typer.Option(
    "--stacks", help="Record the Python stack where each tensor was made, for --html and --snapshot (slower).")]
MarkdownOpt = Annotated[Optional[str], typer.Option("--markdown", metavar="FILE",
                                                    help="Also write the table as Markdown (for a PR comment).")]


def _stderr() -> Any:
    from rich.console import Console

    return Console(stderr=True, emoji=False)  # user text such as pkg.mod:factory: is not an emoji code


def _fail(message: str, code: int = 1) -> None:
    _stderr().print(f"[bold red]error:[/bold red] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C; timeout, CI, docker stop; a closed terminal


class _Interrupted:
    """SIGINT, SIGTERM or SIGHUP seen: raised as KeyboardInterrupt at once, and again at the next progress update or
    write (an interrupt raised inside a weakref callback or a destructor is swallowed by Python). The command
    stops what it started (ranks, child runs), writes nothing and exits 128 + the signal: 130, 143, 129."""

    signum = 0

    @classmethod
    def handler(cls, signum: int, _frame: Any) -> None:
        cls.signum = signum
        raise KeyboardInterrupt

    @classmethod
    def check(cls) -> None:
        if cls.signum:
            raise KeyboardInterrupt

    @classmethod
    def install(cls) -> dict[int, Any]:
        """Handle the stop signals; what was there before (empty when not on the main thread)."""
        try:
            return {signum: signal.signal(signum, cls.handler) for signum in STOP_SIGNALS}
        except ValueError:  # not the main thread
            return {}


def _interrupted() -> None:
    """Exit 128 + the stop signal seen (130, 143, 129), nothing written."""
    signum = _Interrupted.signum or signal.SIGINT
    name = "" if signum == signal.SIGINT else f" ({signal.Signals(signum).name})"
    _fail(f"interrupted{name}; nothing was written", 128 + signum)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """memopt errors -> one message and exit 1; anything else too, with the traceback only under MEMOPT_DEBUG=1;
    Ctrl-C (or SIGTERM, SIGHUP) -> exit 130 (143, 129) with nothing written."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _Interrupted.signum = 0
        previous = _Interrupted.install()
        try:
            result = fn(*args, **kwargs)
            _Interrupted.check()
            return result
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            _interrupted()
        except Exception as exc:
            if _Interrupted.signum:  # the interrupt reached a library that wrapped it (pydantic: SchemaError)
                _interrupted()
            if os.environ.get("MEMOPT_DEBUG"):
                raise
            text = str(exc) if isinstance(exc, MemoptError) else \
                f"{type(exc).__name__}: {exc} (run with MEMOPT_DEBUG=1 for the traceback)"
            _fail(text.replace("[", "\\["))
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return wrapper


class _StderrUi:
    """Progress on stderr: a spinner the commands update (nothing when stderr is not a terminal), notes as lines,
    one line per isolated run with its elapsed time; every update also notices Ctrl-C."""

    def __init__(self) -> None:
        self.console = _stderr()
        self.status: Any = None
        self.runs: Any = None
        self.current: list[Any] = []
        self.plain = PlainProgress(self.note)

    def progress(self, message: str) -> None:
        _Interrupted.check()
        if self.status is not None:
            self.status.update(message)
        elif self.runs is None:
            self.plain.update(message)

    def note(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)

    def run_started(self, name: str, total: int) -> None:
        _Interrupted.check()
        if self.runs is None:
            self.plain.update(f"run {len(self.current) + 1}/{total}: {name}")
            self.current.append(name)
            return
        if self.current:
            self.runs.update(self.current[-1], completed=1, total=1)
        self.current.append(self.runs.add_task(f"run {len(self.current) + 1}/{total}: {name}", total=None))


@contextmanager
def _ui(runs: bool = False) -> Iterator[_StderrUi]:
    """Progress on stderr while a command runs; meanwhile anything printed on stdout (user code: a factory, a
    forward, an import) goes to stderr too, so that stdout holds memopt's output alone."""
    with user_output_to_stderr():
        ui = _StderrUi()
        if not ui.console.is_terminal:
            yield ui
        elif runs:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=ui.console,
                          transient=False) as ui.runs:
                yield ui
                if ui.current:
                    ui.runs.update(ui.current[-1], completed=1, total=1)
        else:
            with ui.console.status("starting") as ui.status:
                yield ui


def _finish(out: Any, json_stdout: bool) -> None:
    """Render what a command returned: warnings, then the files (all or none), then JSON or tables; its exit code."""
    if out.silent:
        return
    for warning in out.warnings:
        _stderr().print(f"[bold yellow]warning:[/bold yellow] {warning}", highlight=False, soft_wrap=True)
    if out.error is not None:
        if not json_stdout:
            out.show()
        _fail(out.error)
    _Interrupted.check()
    out.files.write()
    if json_stdout:
        out.files.print_json()
    else:
        out.show()
    if out.exit_code:
        raise typer.Exit(out.exit_code)


def _exports(html: str | None, snapshot: str | None = None, trace: str | None = None, stacks: bool = False) -> Any:
    from memopt.render.exports import Exports

    return Exports(html, snapshot, trace, stacks)


def _spec(config: str | None, strategies: list[str] | None = None, **overrides: Any) -> Any:
    return _commands().SpecOptions(config, strategies, overrides)


def _commands() -> Any:
    from memopt.app import commands  # here, not at the top: ``memopt --help`` answers without importing torch

    return commands


def _version(value: bool) -> None:
    if value:
        typer.echo(f"memopt {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                                callback=_version)] = False) -> None:
    """Memory profiler and optimizer for Transformer language models."""


@app.command()
@handle_errors
def profile(config: ConfigArg = None, *, json_stdout: JsonOpt = False, json_out: JsonOutOpt = None,
            device: DeviceOpt = None, dtype: DtypeOpt = None, precision: PrecisionOpt = None,
            hf: HfOpt = None, model: ModelOpt = None, keras: KerasOpt = None, backend: BackendOpt = None,
            data: DataOpt = None, held_out: HeldOutOpt = None, batch_size: BatchOpt = None, seq_len: SeqOpt = None,
            steps: StepsOpt = None, strategies: StrategiesOpt = None, device_memory: DeviceMemoryOpt = None,
            mode: ModeOpt = None, prompt_len: PromptLenOpt = None, new_tokens: NewTokensOpt = None,
            cache: CacheOpt = None, world_size: WorldOpt = None, no_fit_check: FitCheckOpt = False,
            timeline: Annotated[Optional[str], typer.Option(
                "--timeline", metavar="FILE", help="Write live memory over the step: FILE.png or FILE.html.",
                show_default=False)] = None, html: HtmlOpt = None, snapshot: SnapshotOpt = None,
            trace: TraceOpt = None, stacks: StacksOpt = False) -> None:
    """Build the model, run a warm-up and measured training steps, and show where every byte went.

    Example: [bold]memopt profile configs/tiny.yaml -s ckpt+chunked_ce --json-out out.json[/bold]

    A Hugging Face model: [bold]memopt profile --hf path/to/config.json -s ckpt+chunked_ce[/bold]

    Serving: [bold]memopt profile configs/tiny-decoder.yaml --mode generate --prompt-len 48 --new-tokens 16
    -s kv_quant:bits=4[/bold]

    To look at: [bold]memopt profile configs/tiny.yaml --html step.html --snapshot step.pickle --trace step.json[/bold]

    A Keras model on TensorFlow: [bold]memopt profile --keras mypkg.models:make_lm --backend tensorflow[/bold]
    """
    spec = _spec(config, strategies, device=device, dtype=dtype, precision=precision, batch_size=batch_size,
                 seq_len=seq_len, keras=keras, backend=backend,
                 steps=steps, hf=hf, python=model, data=data, held_out=held_out, mode=mode, prompt_len=prompt_len,
                 new_tokens=new_tokens, cache=cache, world_size=world_size)
    with _ui() as ui:
        out = _commands().profile(spec, ui, json_out=json_out, timeline=timeline, device_memory=device_memory,
                                  fit_check=not no_fit_check, exports=_exports(html, snapshot, trace, stacks))
    _finish(out, json_stdout)


@app.command()
@handle_errors
def compare(config: ConfigArg = None, *, strategies: Annotated[Optional[list[str]], typer.Option(
                "--strategies", "-s", metavar="SETS",
                help="Strategy sets, each run on its own: sets are separated by commas, + joins strategies into "
                     "one set, e.g. 'ckpt,chunked_ce,ckpt+chunked_ce'. " + STRATEGY_GRAMMAR,
                show_default=False)] = None,
            json_stdout: JsonOpt = False, json_out: JsonOutOpt = None, markdown: MarkdownOpt = None,
            plot: Annotated[Optional[str], typer.Option("--plot", metavar="FILE.png",
                                                        help="Bar chart of peak by category per run.")] = None,
            device: DeviceOpt = None, dtype: DtypeOpt = None, precision: PrecisionOpt = None,
            hf: HfOpt = None, model: ModelOpt = None, keras: KerasOpt = None, backend: Annotated[Optional[str],
                typer.Option("--backend", metavar="BACKENDS", help="The Keras model's backend, or several side by "
                             "side: torch,tensorflow (each in its own process).", show_default=False)] = None,
            data: DataOpt = None, held_out: HeldOutOpt = None, batch_size: BatchOpt = None, seq_len: SeqOpt = None,
            steps: StepsOpt = None, device_memory: DeviceMemoryOpt = None, mode: ModeOpt = None,
            prompt_len: PromptLenOpt = None, new_tokens: NewTokensOpt = None, cache: CacheOpt = None,
            world_size: WorldOpt = None, html: HtmlOpt = None, stacks: StacksOpt = False) -> None:
    """Run the baseline and each strategy set side by side, each in its own process.

    Example: [bold]memopt compare configs/tiny.yaml -s ckpt,chunked_ce,ckpt+chunked_ce --markdown pr.md[/bold]

    Every run's timeline on one scale: [bold]memopt compare configs/tiny.yaml -s ckpt,chunked_ce --html cmp.html[/bold]

    A Keras model on both backends: [bold]memopt compare --keras mypkg.models:make_lm --backend torch,tensorflow[/bold]
    """
    backends = [b for b in (backend or "").split(",") if b.strip()]
    spec = _spec(config, None, device=device, dtype=dtype, precision=precision, batch_size=batch_size,
                 seq_len=seq_len, steps=steps, keras=keras, backend=backends[0] if backends else None,
                 hf=hf, python=model, data=data, held_out=held_out, mode=mode, prompt_len=prompt_len,
                 new_tokens=new_tokens, cache=cache, world_size=world_size)
    with _ui(runs=True) as ui:
        out = _commands().compare(spec, ui, strategies or [], backends=backends, json_out=json_out, markdown=markdown,
                                  plot_path=plot,
                                  device_memory=device_memory, exports=_exports(html, stacks=stacks))
    _finish(out, json_stdout)


@app.command()
@handle_errors
def check(config: ConfigArg = None, *, baseline: Annotated[str, typer.Option(
              "--baseline", metavar="FILE", help="memopt JSON to compare with (written by --update).")],
          tolerance: Annotated[str, typer.Option("--tolerance", help="Allowed growth, e.g. 2%.")] = "2%",
          update: Annotated[bool, typer.Option("--update", help="Write the new baseline (atomically).")] = False,
          json_stdout: JsonOpt = False, json_out: JsonOutOpt = None, markdown: MarkdownOpt = None,
          device: DeviceOpt = None, dtype: DtypeOpt = None, precision: PrecisionOpt = None,
          hf: HfOpt = None, model: ModelOpt = None, data: DataOpt = None, held_out: HeldOutOpt = None,
          strategies: StrategiesOpt = None,
          device_memory: DeviceMemoryOpt = None, mode: ModeOpt = None, prompt_len: PromptLenOpt = None,
          new_tokens: NewTokensOpt = None, cache: CacheOpt = None, no_fit_check: FitCheckOpt = False) -> None:
    """CI memory-regression gate: exit 3 when the peak, a category or a phase grew past the tolerance.

    Example: [bold]memopt check configs/tiny.yaml --baseline tests/baselines/tiny.json --tolerance 1%[/bold]
    """
    spec = _spec(config, strategies, device=device, dtype=dtype, precision=precision, hf=hf, python=model, data=data,
                 held_out=held_out, mode=mode, prompt_len=prompt_len, new_tokens=new_tokens, cache=cache)
    with _ui() as ui:
        out = _commands().check(spec, ui, baseline, tolerance=tolerance, update=update, json_out=json_out,
                                markdown=markdown, device_memory=device_memory, fit_check=not no_fit_check)
    _finish(out, json_stdout)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                "allow_interspersed_args": False})
@handle_errors
def run(ctx: typer.Context, script: Annotated[str, typer.Argument(
            metavar="SCRIPT [ARGS]...", help="A Python script and its arguments (with -m: a module), run unchanged.",
            show_default=False)],
        module: Annotated[bool, typer.Option("-m", help="SCRIPT is a module, run as python -m would.")] = False,
        steps: Annotated[Optional[int], typer.Option(
            "--steps", help="End the script after this many measured steps (the report written, exit 0).",
            show_default=False)] = None,
        device: Annotated[str, typer.Option("--device", help="The device whose tensors are counted: cpu, cuda or "
                                                             "auto.")] = "auto",
        json_stdout: JsonOpt = False, json_out: JsonOutOpt = None, html: HtmlOpt = None,
        snapshot: SnapshotOpt = None, trace: TraceOpt = None, stacks: StacksOpt = False) -> None:
    """Run your training script unchanged and show where every byte of its steps went.

    Example: [bold]memopt run train.py --lr 3e-4[/bold] (memopt's options before the script, the rest is the script's)

    A module, ended after 5 measured steps: [bold]memopt run --steps 5 -m mypkg.train --epochs 1[/bold]

    Models and optimizers are found as they run (HF Trainer, accelerate, Lightning, your own loop).

    A step lies between optimizer steps; the first is the warm-up. Exit code: the script's own.
    """
    with _ui() as ui:
        out = _run_script().run_script(script, list(ctx.args), ui, module=module, steps=steps, device=device,
                                       json_out=json_out, exports=_exports(html, snapshot, trace, stacks))
    _finish(out, json_stdout)


def _run_script() -> Any:
    from memopt.app import run_script  # here, not at the top: ``memopt --help`` answers without importing torch

    return run_script


@app.command()
@handle_errors
def strategies(*, json_stdout: JsonOpt = False, json_out: JsonOutOpt = None) -> None:
    """List the strategies: options and defaults, what each saves, where it works.

    Example: [bold]memopt strategies[/bold], then [bold]memopt profile -s ckpt:policy=selective+chunked_ce[/bold]
    """
    _finish(_commands().strategies(json_out=json_out), json_stdout)


@app.command()
@handle_errors
def estimate(config: ConfigArg = None, *, json_stdout: JsonOpt = False, json_out: JsonOutOpt = None,
             device: DeviceOpt = None, dtype: DtypeOpt = None, precision: PrecisionOpt = None,
             hf: HfOpt = None, model: ModelOpt = None, keras: KerasOpt = None, backend: BackendOpt = None,
             batch_size: BatchOpt = None, seq_len: SeqOpt = None, strategies: StrategiesOpt = None,
             fits: Annotated[Optional[str], typer.Option(
                 "--fits", metavar="SIZE", help="Answer whether it fits in SIZE (e.g. 24GiB); if not, which "
                 "single strategies would make it fit. With --mode generate also the largest batch and the longest "
                 "context that fit.", show_default=False)] = None,
             mode: ModeOpt = None, prompt_len: PromptLenOpt = None, new_tokens: NewTokensOpt = None,
             cache: CacheOpt = None, world_size: WorldOpt = None, html: HtmlOpt = None, snapshot: SnapshotOpt = None,
             trace: TraceOpt = None, stacks: StacksOpt = False) -> None:
    """Predict the profile without allocating (fake tensors): for models larger than this machine.

    Example: [bold]memopt estimate llama-7b --batch-size 1 --seq-len 2048 --dtype bf16 --device cuda --fits 80GiB[/bold]

    On 64 ranks (FSDP2, one rank traced): [bold]memopt estimate llama-7b --batch-size 64 --world-size 64
    --device cuda --dtype bf16[/bold]

    Serving: [bold]memopt estimate llama-7b --mode generate --prompt-len 3968 --new-tokens 128 --dtype fp16
    --device cuda --fits 24GiB[/bold]
    """
    spec = _spec(config, strategies, device=device, dtype=dtype, precision=precision, batch_size=batch_size,
                 seq_len=seq_len, hf=hf, keras=keras, backend=backend,
                 python=model, mode=mode, prompt_len=prompt_len, new_tokens=new_tokens, cache=cache,
                 world_size=world_size)
    with _ui() as ui:
        out = _commands().estimate(spec, ui, json_out=json_out, budget=fits,
                                   exports=_exports(html, snapshot, trace, stacks))
    _finish(out, json_stdout)


@app.command()
@handle_errors
def optimize(config: ConfigArg = None, *, budget: Annotated[str, typer.Option(
                 "--budget", help="Peak tensor memory to fit under, e.g. 8GiB.")],
             allow_lossy: Annotated[bool, typer.Option(
                 "--allow-lossy",
                 help="Also try lossy strategies (quantization, pruning, 8-bit states, amp).")] = False,
             top: Annotated[int, typer.Option("--top", min=1, max=20, help="Candidates to measure for real at least "
                                              "(more when the cost model cannot tell them apart).")] = 3,
             output: Annotated[Optional[str], typer.Option(
                 "--output", "-o", metavar="FILE.yaml", help="Write the winning spec here.")] = None,
             no_measure: Annotated[bool, typer.Option(
                 "--no-measure", help="Rank on estimates only, even when the model runs here.")] = False,
             max_drift: Annotated[Optional[str], typer.Option(
                 "--max-drift", metavar="PCT", help="Allow lossy strategies whose measured drift (relative error "
                 "of the logits) stays under PCT, e.g. 1%; implies --allow-lossy, needs the model to run here.",
                 show_default=False)] = None,
             max_loss_increase: Annotated[Optional[str], typer.Option(
                 "--max-loss-increase", metavar="PCT", help="Allow lossy strategies whose loss on --held-out text "
                 "rises by at most PCT, e.g. 1%; implies --allow-lossy (use trained weights: see "
                 "scripts/train_reference.py).", show_default=False)] = None,
             rounds: Annotated[int, typer.Option(
                 "--rounds", min=1, max=20, help="Measuring rounds at most: each runs the baseline, then every "
                 "contender still open, side by side.")] = 3,
             data: DataOpt = None, held_out: HeldOutOpt = None,
             json_stdout: JsonOpt = False, json_out: JsonOutOpt = None, device: DeviceOpt = None,
             dtype: DtypeOpt = None, precision: PrecisionOpt = None,
             hf: HfOpt = None, model: ModelOpt = None, batch_size: BatchOpt = None, seq_len: SeqOpt = None,
             steps: StepsOpt = None, mode: ModeOpt = None, prompt_len: PromptLenOpt = None,
             new_tokens: NewTokensOpt = None, cache: CacheOpt = None, world_size: WorldOpt = None) -> None:
    """Search strategy combinations; show the fastest that fits the budget and write it as a spec.

    Example: [bold]memopt optimize configs/seed.yaml --budget 1GiB --output best.yaml[/bold],
    then [bold]memopt profile best.yaml[/bold]
    """
    spec = _spec(config, None, device=device, dtype=dtype, precision=precision, batch_size=batch_size,
                 seq_len=seq_len, steps=steps, data=data, held_out=held_out,
                 hf=hf, python=model, mode=mode, prompt_len=prompt_len, new_tokens=new_tokens, cache=cache,
                 world_size=world_size)
    with _ui() as ui:
        out = _commands().optimize(spec, ui, budget, allow_lossy=allow_lossy, top=top, output=output,
                                   measure=not no_measure, max_drift=max_drift,
                                   max_loss_increase=max_loss_increase, rounds=rounds, json_out=json_out)
    _finish(out, json_stdout)


@app.command()
@handle_errors
def view(snapshot: Annotated[str, typer.Argument(
             metavar="SNAPSHOT.pickle", help="A memory snapshot: torch.cuda.memory._dump_snapshot() of your own job, "
             "or memopt's --snapshot.", show_default=False)], *,
         top: Annotated[int, typer.Option("--top", min=1, max=1000, help="Rows in each table.")] = 15,
         device: Annotated[Optional[int], typer.Option("--device", help="The CUDA device index to report (default: "
                                                        "the one with the highest peak).", show_default=False)] = None,
         html: HtmlOpt = None, json_stdout: JsonOpt = False, json_out: JsonOutOpt = None) -> None:
    """Read a CUDA memory snapshot you recorded and report it as memopt reports its runs: the peak, what was alive
    at the peak by size with its stack, grouped by the top frame of your code.

    Record one: [bold]torch.cuda.memory._record_memory_history()[/bold], your steps, then
    [bold]torch.cuda.memory._dump_snapshot("snapshot.pickle")[/bold]; then [bold]memopt view snapshot.pickle
    --html view.html[/bold]
    """
    with _ui() as ui:
        out = _commands().view(snapshot, ui, top=top, device=device, html=html, json_out=json_out)
    _finish(out, json_stdout)


def main() -> None:  # pragma: no cover - console entry point
    _Interrupted.install()  # a stop signal while starting up: exit 130 (143, 129) too, no traceback
    for stream in (sys.stdout, sys.stderr):  # an ASCII or Latin-1 locale: replace what it cannot show
        if hasattr(stream, "reconfigure") and "utf" not in (stream.encoding or "").lower():
            stream.reconfigure(errors="replace")
    try:
        app(prog_name="memopt")
    except SystemExit as stop:
        if not (_Interrupted.signum and stop.code == 128 + _Interrupted.signum):
            raise
        # Stopped by a signal: exit 128 + signum every time. Left to the interpreter, CPython sometimes dies by the
        # SIGINT itself after a KeyboardInterrupt it saw pass through C code (same $? in a shell, -2 to a parent's
        # subprocess); the exit functions (temporary folders' cleanup) run first.
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(stop.code)


if __name__ == "__main__":  # pragma: no cover
    main()
