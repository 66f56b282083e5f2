"""Results -> Markdown (for a PR comment): compare's table and check's growths."""

from __future__ import annotations

from typing import Any

from memopt.core.results import RunResult
from memopt.core.units import format_bytes
from memopt.render.text import COMPARE_COLUMNS, COMPARE_LEGEND, compare_rows, growth_text


def compare_markdown(runs: list[RunResult], title: str) -> str:
    lines = [f"**{title}**", "", "| " + " | ".join(label for _, label in COMPARE_COLUMNS) + " |",
             "|" + "|".join("---" if key in ("run", "changed", "status") else "---:" for key, _ in COMPARE_COLUMNS)
             + "|"]
    for row in compare_rows(runs):
        lines.append("| " + " | ".join(row[key].replace("|", "/") for key, _ in COMPARE_COLUMNS) + " |")
    return "\n".join([*lines, "", COMPARE_LEGEND]) + "\n"


def growth_markdown(found: list[Any], tolerance: float, peak: int, baseline_peak: int) -> str:
    if not found:
        return (f"memopt check: OK, peak {format_bytes(peak)} (baseline {format_bytes(baseline_peak)}, "
                f"tolerance {100 * tolerance:g}%)\n")
    lines = [f"**memopt check: memory regression** (tolerance {100 * tolerance:g}%)", "",
             "| what | kind | baseline | now | growth |", "|---|---|---:|---:|---:|"]
    for g in found:
        cells = (g.what, g.kind, format_bytes(g.baseline), format_bytes(g.now), growth_text(g))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
