"""The interactive HTML report: one self-contained page (inline CSS and JS, no network) per command.

Per run: the stacked category timeline over the step (hover: each category's bytes and the event's op, module and
phase; drag to zoom, double-click or 0 to reset; keyboard: arrows, + and -, p for the peak), the peak marked, the
tensors alive at the peak largest first, and the per-phase and per-module peaks. Several runs (compare) are drawn
side by side on one scale. The page's data is embedded as JSON (``<script id="memopt-timeline">``).
"""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path
from typing import Any

from memopt.core.results import RunResult
from memopt.core.trace import MemoryTrace
from memopt.core.units import format_bytes

MAX_POINTS = 4000   # samples drawn per run; more events are thinned to each bucket's highest total
MAX_TENSORS = 200   # rows of the alive-at-peak table
MAX_MODULES = 40    # rows of the per-module table
COLORS = {"params": "#4e79a7", "buffers": "#9c755f", "grads": "#f28e2b", "optimizer": "#e15759",
          "activations": "#59a14f", "kv_cache": "#76b7b2", "unshard": "#b07aa1", "temporaries": "#bab0ac"}
OTHER_COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7")


def color_of(category: str, index: int) -> str:
    return COLORS.get(category, OTHER_COLORS[index % len(OTHER_COLORS)])


def thinned(totals: list[int], keep: int, limit: int = MAX_POINTS) -> list[int]:
    """The event indices to draw: all of them, or each bucket's highest total when there are more than ``limit``
    (``keep``, the peak, always among them)."""
    n = len(totals)
    if n <= limit:
        return list(range(n))
    chosen = set()
    for b in range(limit):
        lo, hi = b * n // limit, (b + 1) * n // limit
        if hi > lo:
            chosen.add(max(range(lo, hi), key=totals.__getitem__))
    chosen.add(keep)
    return sorted(chosen)


def run_view(name: str, trace: MemoryTrace, stacks: bool = False) -> dict[str, Any]:
    """What the page draws for one run, as plain data."""
    totals = trace.totals()
    peak = trace.peak_index()
    drawn = thinned(totals, peak)
    names: dict[str | None, int] = {}

    def name_id(text: str | None) -> int:
        return names.setdefault(text, len(names))

    def op_at(event: int) -> str | None:
        subject = trace.subjects[event]
        if subject < 0:
            return "step begins"
        allocation = trace.allocations[subject]
        return f"{trace.kinds[event]} {allocation.op or allocation.category}"

    samples = {"index": drawn, "bytes": [trace.bytes[i] for i in drawn],
               "phase": [name_id(trace.phases[i]) for i in drawn],
               "module": [name_id(trace.modules[i]) for i in drawn],
               "op": [name_id(op_at(i)) for i in drawn],
               "ms": [round(trace.times_ns[i] / 1e6, 3) for i in drawn]}
    alive = trace.alive_at(peak)
    tensors = [{"bytes": x.nbytes, "category": x.category, "shape": x.allocation.shape, "dtype": x.allocation.dtype,
                "op": x.allocation.op, "module": x.allocation.module, "phase": x.allocation.phase,
                "frames": [f"{f[0]}:{f[1]} in {f[2]}" for f in x.allocation.frames or []]}
               for x in alive[:MAX_TENSORS]]
    modules = sorted(trace.peaks_by("modules").items(), key=lambda kv: -kv[1][0])[:MAX_MODULES]
    return {"name": name, "categories": trace.categories,
            "colors": [color_of(c, i) for i, c in enumerate(trace.categories)],
            "names": list(names), "samples": samples, "events": len(totals),
            "peak_bytes": totals[peak] if totals else 0, "peak_index": peak,
            "peak_breakdown": dict(zip(trace.categories, trace.bytes[peak])) if totals else {},
            "peak_phase": trace.phases[peak] if totals else None,
            "peak_module": trace.modules[peak] if totals else None,
            "alive_at_peak": tensors, "alive_count": len(alive), "alive_bytes": sum(x.nbytes for x in alive),
            "stacks": stacks,
            "phase_peaks": [[p, b] for p, (b, _) in trace.peaks_by("phases").items()],
            "module_peaks": [[m, b] for m, (b, _) in modules]}


def report_html(title: str, views: list[dict[str, Any]], note: str = "") -> str:
    """The page for these runs (one: profile, estimate, run, view; several: compare, on one scale)."""
    data = {"title": title, "note": note, "runs": views}
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").replace("&", "\\u0026")
    summary = "; ".join(f"{v['name']}: peak {format_bytes(v['peak_bytes'])}" for v in views)
    here = resources.files("memopt.render")
    css, js = (here.joinpath(name).read_text(encoding="utf-8") for name in ("report.css", "report.js"))
    return (_PAGE.replace("__TITLE__", html.escape(title)).replace("__SUMMARY__", html.escape(summary))
            .replace("__CSS__", css).replace("__JS__", js).replace("__DATA__", payload))


def run_report(runs: list[RunResult], title: str, note: str = "", stacks: bool = False) -> str:
    """The page of runs that recorded their timeline (failed runs and runs without one are left out)."""
    views = [run_view(r.name, r.memory.timeline, stacks) for r in runs
             if r.ok and r.memory is not None and r.memory.timeline is not None]
    return report_html(title, views, note)


def is_html(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".html", ".htm")


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__CSS__</style></head>
<body>
<header><h1>__TITLE__</h1><p id="summary">__SUMMARY__</p><p id="note"></p>
<p class="help">Hover or focus a chart and use the arrow keys to read the bytes at each event; drag (or + and -)
to zoom, double-click (or 0) to reset, p jumps to the peak.</p></header>
<main id="runs"></main>
<noscript>This report draws its charts with JavaScript; the data is in the page's memopt-timeline JSON.</noscript>
<script type="application/json" id="memopt-timeline">__DATA__</script>
<script>__JS__</script>
</body></html>
"""
