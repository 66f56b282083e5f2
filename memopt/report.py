"""Results -> JSON (versioned schema), Rich tables and Markdown. Pure rendering, no measuring."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import memopt
from memopt.measure import CATEGORIES, PHASES
from memopt.runner import RunResult
from memopt.spec import Spec
from memopt.units import format_bytes

SCHEMA = 1

CATEGORY_HELP = {
    "params": "weights",
    "buffers": "RoPE tables",
    "grads": "gradients",
    "optimizer": "e.g. Adam moments",
    "activations": "saved for bwd",
    "temporaries": "all else",
}


def run_to_json(result: RunResult) -> dict[str, Any]:
    """One run in the schema-1 layout (sizes as integer bytes)."""
    mem = result.memory
    data: dict[str, Any] = {
        "name": result.name, "strategies": result.strategies, "ok": result.ok, "error": result.error,
        "params": {"total": result.params_total, "trainable": result.params_trainable},
    }
    if mem is not None:
        data.update({
            "state_bytes": mem.state_bytes,
            "peak_bytes": mem.peak_bytes,
            "peak_breakdown": mem.peak_breakdown,
            "category_peak_bytes": mem.category_peak_bytes,
            "phase_peak_bytes": mem.phase_peak_bytes,
            "peak_phase": mem.peak_phase,
            "peak_module": mem.peak_module,
        })
    data.update({
        "python_heap_peak_bytes": result.host.python_heap_peak_bytes,
        "rss_peak_bytes": result.host.rss_peak_bytes,
        "cuda": result.host.cuda,
        "step_time_s": result.step_time_s,
        "loss": result.loss,
        "drift": result.drift,
        "strategy_facts": result.strategy_facts,
        "notes": result.notes,
        "pid": result.pid,
    })
    return data


def to_json(spec: Spec, results: list[RunResult], device: str) -> dict[str, Any]:
    import torch

    return {"schema": SCHEMA, "memopt_version": memopt.__version__, "torch_version": torch.__version__,
            "device": device, "spec": spec.to_dict(), "runs": [run_to_json(r) for r in results]}


def write_json(data: dict[str, Any], target: str) -> None:
    """``-`` -> stdout; otherwise written atomically (temp file + rename), never half-written."""
    text = json.dumps(data, indent=2) + "\n"
    if target == "-":
        print(text, end="")
        return
    write_atomic(Path(target), text)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def profile_tables(spec: Spec, result: RunResult) -> list[Table]:
    """The summary, the breakdown by category and the peak by phase for one run."""
    mem = result.memory
    assert mem is not None
    m = spec.model
    title = (f"memopt profile - {m.arch} d{m.d_model} h{m.n_heads} L{m.n_layers} V{m.vocab_size}, "
             f"batch {spec.train.batch_size} x seq {spec.train.seq_len}, {spec.train.optimizer}, "
             f"{spec.run.dtype}, {result.device}")
    summary = Table(title=title, show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    summary.add_column(style="dim")
    where = f" in {mem.peak_module}" if mem.peak_module else ""
    summary.add_row("Peak tensor memory", format_bytes(mem.peak_bytes), f"during {mem.peak_phase}{where}")
    if result.host.cuda:
        summary.add_row("CUDA max allocated", format_bytes(result.host.cuda["max_allocated_bytes"]),
                        "torch.cuda.max_memory_allocated")
        summary.add_row("CUDA max reserved", format_bytes(result.host.cuda["max_reserved_bytes"]),
                        "allocator cache")
    summary.add_row("Process RSS peak", format_bytes(result.host.rss_peak_bytes),
                    "OS view of the process")
    summary.add_row("Python heap peak", format_bytes(result.host.python_heap_peak_bytes),
                    "tracemalloc: not tensors")
    summary.add_row("Step time (median)", f"{result.step_time_s * 1000:.1f} ms",
                    f"of {len(result.step_times_s)}, after a warm-up")
    summary.add_row("Loss", f"{result.loss:.4f}", "")
    summary.add_row("Parameters", f"{result.params_total:,}", f"{result.params_trainable:,} trainable")
    if result.drift is not None:
        summary.add_row("Accuracy drift", f"{100 * result.drift['logits_rel_error']:.2f}%",
                        f"logits vs unchanged model; loss {result.drift['loss_delta']:+.4f}")
    if result.strategies:
        summary.add_row("Strategies", ", ".join(next(iter(s)) for s in result.strategies), "")
    for name, facts in result.strategy_facts.items():
        for key, value in facts.items():
            shown = format_bytes(value) if key.endswith("bytes") else str(value)
            summary.add_row(f"{name}: {key.replace('_', ' ')}", shown, "")
    for note in result.notes:
        summary.add_row("Note", "", note)

    breakdown = Table(title="Where the bytes go", title_justify="left")
    for col, justify in (("category", "left"), ("at peak", "right"), ("share", "right"),
                         ("own peak", "right"), ("after step", "right"), ("what", "left")):
        breakdown.add_column(col, justify=justify)  # type: ignore[arg-type]
    for c in CATEGORIES:
        state = mem.state_bytes.get(c)
        breakdown.add_row(c, format_bytes(mem.peak_breakdown[c]), _pct(mem.peak_breakdown[c], mem.peak_bytes),
                          format_bytes(mem.category_peak_bytes[c]),
                          format_bytes(state) if state is not None else "-", CATEGORY_HELP[c])
    breakdown.add_row("total", format_bytes(mem.peak_bytes), "100%", "", "", "", style="bold")

    phases = Table(title="Peak by phase", title_justify="left")
    phases.add_column("phase")
    phases.add_column("peak", justify="right")
    phases.add_column("of step peak", justify="right")
    for p in PHASES:
        phases.add_row(p, format_bytes(mem.phase_peak_bytes[p]), _pct(mem.phase_peak_bytes[p], mem.peak_bytes))
    return [summary, breakdown, phases]


def print_tables(tables: list[Table], console: Console | None = None) -> None:
    console = console or Console()
    for t in tables:
        console.print(t)


def strategy_rows(strategies: dict[str, Any]) -> list[dict[str, Any]]:
    """The registry as plain data: name, options with defaults, what it saves, where it works."""
    rows = []
    for name, cls in strategies.items():
        options = {}
        for field_name, info in cls.Options.model_fields.items():
            options[field_name] = {"default": info.default, "type": _type_name(info.annotation),
                                   "help": info.description or ""}
        rows.append({"name": name, "order": cls.order, "summary": cls.summary, "saves": cls.saves,
                     "devices": list(cls.devices), "lossy": cls.lossy, "options": options,
                     "refuses": dict(cls.refuses)})
    return rows


def _type_name(annotation: Any) -> str:
    args = getattr(annotation, "__args__", None)
    if getattr(annotation, "__origin__", None) is not None and args and all(isinstance(a, str) for a in args):
        return " | ".join(args)  # Literal choices
    return getattr(annotation, "__name__", str(annotation))


def strategies_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="memopt strategies (applied in this order when combined with +)", title_justify="left",
                  expand=True)
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("what it does / [dim]what it saves[/dim]", ratio=3)
    table.add_column("options = default", ratio=2)
    table.add_column("devices", no_wrap=True)
    for row in rows:
        opts = "\n".join(f"{k} = {v['default']}" + (f" [dim]({v['type']})[/dim]" if "|" in v["type"] else "")
                         for k, v in row["options"].items()) or "-"
        text = f"{row['summary']}\n[dim]{row['saves']}[/dim]" + ("\n[yellow]lossy[/yellow]" if row["lossy"] else "")
        for other in row["refuses"]:
            text += f"\n[red]refuses {other}[/red]"
        table.add_row(row["name"], text, opts, ", ".join(row["devices"]))
    return table
