"""Pictures: the step's timeline (PNG, or the interactive HTML report) and compare's bar chart (PNG).

PNG needs matplotlib, an optional extra (``pip install 'memopt[plot]'``); HTML needs nothing.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from memopt.core.errors import MemoptError
from memopt.core.results import RunResult, StepMemory
from memopt.core.units import format_bytes
from memopt.render.report_html import COLORS, is_html, run_report

PHASE_COLORS = {"forward": "#eef5ff", "backward": "#fff4e6", "optimizer": "#f3f0ff", "prefill": "#eef5ff",
                "decode": "#fff4e6"}
MIB = 2**20


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MemoptError("PNG output needs matplotlib: pip install 'memopt[plot]' (or write .html instead)") from None
    return plt


def timeline_data(memory: StepMemory) -> dict[str, Any]:
    """The timeline as plain data: per event the phase, module and live bytes per category."""
    trace = memory.timeline
    if trace is None or not trace.kinds:
        raise MemoptError("no timeline was recorded (run with timeline=True)")
    peak_at = trace.peak_index()
    return {"categories": trace.categories, "phases": trace.phases, "modules": trace.modules,
            "bytes": trace.bytes, "peak_bytes": memory.peak_bytes, "peak_index": peak_at,
            "peak_module": trace.modules[peak_at], "peak_phase": trace.phases[peak_at]}


def _phase_spans(phases: list[str]) -> list[tuple[str, int, int]]:
    spans: list[tuple[str, int, int]] = []
    for i, phase in enumerate(phases):
        if spans and spans[-1][0] == phase:
            spans[-1] = (phase, spans[-1][1], i)
        else:
            spans.append((phase, i, i))
    return spans


def check_timeline_path(path: str | Path) -> None:
    """Refuse a timeline file name whose suffix names no format, or PNG without matplotlib (before a run)."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".png", ".html", ".htm"):
        raise MemoptError(f"--timeline {path}: use a .png or .html file name")
    if suffix == ".png":
        _pyplot()


def check_png_path(path: str | Path, option: str) -> None:
    """Refuse a chart file name that is not .png, or PNG without matplotlib (before a run)."""
    if Path(path).suffix.lower() != ".png":
        raise MemoptError(f"{option} {path}: use a .png file name")
    _pyplot()


def render_timeline(result: RunResult, path: str | Path, title: str) -> bytes | str:
    """The run's timeline as PNG bytes or the interactive HTML report, chosen by the file's suffix."""
    check_timeline_path(path)
    assert result.memory is not None
    if is_html(path):
        return run_report([result], title)
    return _timeline_png(timeline_data(result.memory), title)


def _timeline_png(data: dict[str, Any], title: str) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 5))
    x = list(range(len(data["bytes"])))
    for phase, start, end in _phase_spans(data["phases"]):
        ax.axvspan(start, end + 1, color=PHASE_COLORS.get(phase, "#fff"), zorder=0)
        ax.text((start + end) / 2, 0, phase, ha="center", va="bottom", fontsize=8, color="#555")
    categories = data["categories"]
    series = [[b[i] / MIB for b in data["bytes"]] for i in range(len(categories))]
    ax.stackplot(x, *series, labels=categories, colors=[COLORS[c] for c in categories], zorder=1)
    peak = data["peak_index"]
    ax.annotate(f"peak {format_bytes(data['peak_bytes'])}\n{data['peak_phase']} in {data['peak_module']}",
                (peak, data["peak_bytes"] / MIB), xytext=(25, -25), textcoords="offset points", fontsize=9,
                arrowprops={"arrowstyle": "->"})
    ax.set_xlabel("allocation / free events during the measured step")
    ax.set_ylabel("live tensor memory (MiB)")
    ax.set_title(title, fontsize=10, pad=14)
    ax.set_ylim(0, data["peak_bytes"] / MIB * 1.12)
    ax.legend(loc="upper right", fontsize=8)
    return _png_bytes(plt, fig, {"memopt-timeline": json.dumps(data)})  # the data rides along, as in the HTML


def _png_bytes(plt: Any, fig: Any, metadata: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata=metadata)
    plt.close(fig)
    return buf.getvalue()


def render_compare_png(runs: list[RunResult], title: str) -> bytes:
    """Bar chart: peak by category (the split at each run's peak) for every run that finished."""
    plt = _pyplot()
    done = [(r.name, r.memory) for r in runs if r.ok and r.memory is not None]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(done)), 5))
    bottom = [0.0] * len(done)
    categories = list(dict.fromkeys(c for _, mem in done for c in mem.peak_breakdown))
    for category in categories:
        values = [mem.peak_breakdown.get(category, 0) / MIB for _, mem in done]
        ax.bar([name for name, _ in done], values, bottom=bottom, label=category, color=COLORS[category])
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("peak tensor memory (MiB)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    return _png_bytes(plt, fig)
