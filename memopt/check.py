"""``memopt check``: a memory-regression gate against a saved baseline (memopt's own JSON)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memopt.errors import MemoptError
from memopt.measure import CATEGORIES, PHASES
from memopt.spec import Spec


@dataclass(frozen=True)
class Growth:
    """One number that grew past the tolerance."""

    what: str         # "peak", a category or a phase
    kind: str         # "total", "category" or "phase"
    baseline: int
    now: int

    @property
    def growth(self) -> float:
        return (self.now - self.baseline) / self.baseline if self.baseline else float("inf")


def load_baseline(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise MemoptError(f"baseline {path} does not exist; create it with: memopt check ... --baseline {path} --update")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        run = doc["runs"][0]
        run["peak_bytes"], run["category_peak_bytes"], run["phase_peak_bytes"], doc["spec"]  # noqa: B018
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise MemoptError(f"baseline {path}: not a memopt profile JSON ({type(exc).__name__}: {exc})") from None
    if doc.get("schema") != 1:
        raise MemoptError(f"baseline {path}: schema {doc.get('schema')!r}, this memopt reads schema 1")
    return doc


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


IGNORED = {"train.steps", "run.device"}  # do not change per-step memory; the device is compared on its own


def ensure_comparable(baseline: dict[str, Any], spec: Spec, device: str) -> None:
    """Refuse a baseline from another device, dtype or spec, naming the differences."""
    if baseline["device"] != device:
        raise MemoptError(f"baseline was measured on {baseline['device']}, this run is on {device}")
    old, new = _flatten(baseline["spec"]), _flatten(spec.to_dict())
    diffs = [f"{k}: {old.get(k)!r} in the baseline, {new.get(k)!r} now" for k in sorted(old.keys() | new.keys())
             if k not in IGNORED and old.get(k) != new.get(k)]
    if diffs:
        raise MemoptError("baseline is from another spec: " + "; ".join(diffs[:6]) + (" ..." if len(diffs) > 6 else ""))


def growths(baseline_run: dict[str, Any], run: dict[str, Any], tolerance: float) -> list[Growth]:
    """Every number (peak, each category's own peak, each phase's peak) that grew past the tolerance."""
    pairs = [("peak", "total", baseline_run["peak_bytes"], run["peak_bytes"])]
    pairs += [(c, "category", baseline_run["category_peak_bytes"][c], run["category_peak_bytes"][c]) for c in CATEGORIES]
    pairs += [(p, "phase", baseline_run["phase_peak_bytes"][p], run["phase_peak_bytes"][p]) for p in PHASES]
    return [Growth(what, kind, old, new) for what, kind, old, new in pairs if new > old * (1 + tolerance)]
