"""Results -> the JSON documents each command writes (schema 1) and the spec optimize writes as YAML."""

from __future__ import annotations

from typing import Any

import torch

from memopt.core.results import RunResult
from memopt.core.units import format_bytes
from memopt.core.version import __version__
from memopt.spec import Spec

SCHEMA = 1


def to_json(spec: Spec, results: list[RunResult], device: str) -> dict[str, Any]:
    """The schema-1 document of these runs."""
    return runs_document(spec, results, device)


def runs_document(spec: Spec | dict[str, Any], runs: list[RunResult], device: str, **extra: Any) -> dict[str, Any]:
    """The schema-1 document of these runs (profile, compare, check, estimate; memopt.app.track gives its ``spec``
    as a mapping of what it knows)."""

    return {"schema": SCHEMA, "memopt_version": __version__, "torch_version": torch.__version__,
            "device": device, "spec": spec if isinstance(spec, dict) else spec.to_dict(),
            "runs": [r.to_json() for r in runs], **extra}


def check_document(doc: dict[str, Any], found: list[Any], tolerance: float) -> dict[str, Any]:
    return {**doc, "check": {"tolerance": tolerance, "regressions": [g.__dict__ for g in found]}}


def estimate_document(spec: Spec, result: RunResult, formulas: dict[str, int | None], fit: Any,
                      capacity: Any = None) -> dict[str, Any]:
    doc = to_json(spec, [result], result.device)
    doc["estimated"] = True
    doc["analytic"] = formulas
    if fit is not None:
        doc["fits"] = {"budget_bytes": fit.budget, "fits": fit.fits, "margin_bytes": fit.margin,
                       "single_strategies_that_fit": fit.helpers, "not_tried": fit.not_tried}
    if capacity is not None:
        doc["capacity"] = capacity.to_json()
    return doc


def winner_yaml(best: dict[str, Any], outcome: Any, budget: str) -> str:
    """The winning spec as YAML, with a header saying where it came from."""
    import yaml

    header = (f"# written by memopt optimize --budget {budget}: {outcome.winner.label}, estimated peak "
              f"{format_bytes(outcome.winner.peak)}\n")
    return header + yaml.safe_dump(best, sort_keys=False)


def optimize_document(best: dict[str, Any], outcome: Any, cap: Any) -> dict[str, Any]:
    return {"schema": SCHEMA, "budget_bytes": outcome.budget, "winner": best["strategies"],
            "candidates": [c.to_dict() for c in outcome.ranked], "evaluated": outcome.evaluated,
            "search_s": outcome.seconds, "measured_here": outcome.measured_here,
            "max_drift": cap.limit if cap is not None and cap.option == "--max-drift" else None,
            "max_loss_increase": cap.limit if cap is not None and cap.option == "--max-loss-increase" else None,
            "left_out_for_drift": outcome.rejected,
            "baseline_step_s": outcome.baseline.measured_s}


def view_document(seen: Any, top: int) -> dict[str, Any]:
    """``memopt view``'s document (schema 1): the snapshot's peak, the ``top`` largest allocations alive at it with
    their frames (innermost first) and the groups by top user frame."""
    return {"schema": SCHEMA, "memopt_version": __version__, "snapshot": seen.path, "device": seen.device,
            "devices": {str(d): peak for d, peak in seen.devices.items()}, "peak_bytes": seen.peak_bytes,
            "events": len(seen.trace.kinds), "alive_at_peak_count": len(seen.alive),
            "alive_at_peak": [{"bytes": x.nbytes, "top_frame": x.allocation.op,
                               "frames": [{"filename": f, "line": line, "name": name}
                                          for f, line, name in x.allocation.frames or []]}
                              for x in seen.alive[:top]],
            "groups": [{"top_frame": name, "bytes": nbytes, "allocations": count}
                       for name, nbytes, count in seen.groups[:top]],
            "note": seen.note}
