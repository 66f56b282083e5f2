"""Pictures: the step's timeline (PNG or self-contained HTML) and compare's bar chart (PNG).

PNG needs matplotlib, an optional extra (``pip install 'memopt[plot]'``); HTML needs nothing.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import Any

from memopt.core.errors import MemoptError
from memopt.core.results import RunResult, StepMemory
from memopt.core.units import format_bytes

COLORS = {"params": "#4e79a7", "buffers": "#9c755f", "grads": "#f28e2b", "optimizer": "#e15759",
          "activations": "#59a14f", "kv_cache": "#76b7b2", "temporaries": "#bab0ac"}
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
    if not memory.timeline:
        raise MemoptError("no timeline was recorded (run with timeline=True)")
    events = memory.timeline
    totals = [sum(b) for _, _, b in events]
    peak_at = max(range(len(totals)), key=totals.__getitem__)
    return {"categories": list(memory.peak_breakdown), "phases": [p for p, _, _ in events],
            "modules": [m for _, m, _ in events], "bytes": [list(b) for _, _, b in events],
            "peak_bytes": memory.peak_bytes, "peak_index": peak_at, "peak_module": events[peak_at][1],
            "peak_phase": events[peak_at][0]}


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
    """The run's timeline as PNG bytes or HTML text, chosen by the file's suffix."""
    check_timeline_path(path)
    assert result.memory is not None
    data = timeline_data(result.memory)
    return _timeline_png(data, title) if Path(path).suffix.lower() == ".png" else _timeline_html(data, title)


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


def _timeline_html(data: dict[str, Any], title: str) -> str:
    """A self-contained page: an inline SVG stacked-area chart plus the data as JSON."""
    width, height, pad = 1000, 420, 50
    n = len(data["bytes"])
    top = max(data["peak_bytes"], 1)

    def xy(i: int, value: float) -> str:
        x = pad + (width - 2 * pad) * i / max(n - 1, 1)
        return f"{x:.1f},{height - pad - (height - 2 * pad) * value / top:.1f}"

    shapes = []
    for phase, start, end in _phase_spans(data["phases"]):
        x0, x1 = (float(xy(k, 0).split(",")[0]) for k in (start, end))
        shapes.append(f'<rect x="{x0}" y="{pad}" width="{max(x1 - x0, 1)}" height="{height - 2 * pad}" '
                      f'fill="{PHASE_COLORS.get(phase, "#fff")}"/><text x="{(x0 + x1) / 2}" y="{pad - 6}" '
                      f'font-size="11" text-anchor="middle">{phase}</text>')
    lower = [0.0] * n
    for ci, category in enumerate(data["categories"]):
        upper = [lower[i] + data["bytes"][i][ci] for i in range(n)]
        points = [xy(i, upper[i]) for i in range(n)] + [xy(i, lower[i]) for i in reversed(range(n))]
        shapes.append(f'<polygon points="{" ".join(points)}" fill="{COLORS[category]}"><title>{category}</title>'
                      f'</polygon>')
        lower = upper
    px, py = xy(data["peak_index"], data["peak_bytes"]).split(",")
    label = html.escape(f"peak {format_bytes(data['peak_bytes'])}, {data['peak_phase']} in {data['peak_module']}")
    shapes.append(f'<circle cx="{px}" cy="{py}" r="4" fill="black"/><text x="{float(px) + 8}" y="{float(py) - 8}" '
                  f'font-size="12">{label}</text>')
    legend = " ".join(f'<span style="background:{COLORS[c]};padding:2px 6px;color:#fff">{c}</span>'
                      for c in data["categories"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>
<body style="font-family:sans-serif">
<h3>{html.escape(title)}</h3>
<p>Live tensor memory over the measured step, by category (0 to {format_bytes(top)}). {legend}</p>
<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">{''.join(shapes)}</svg>
<script type="application/json" id="memopt-timeline">{json.dumps(data)}</script>
</body></html>
"""


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
