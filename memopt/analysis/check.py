"""``memopt check``: a memory-regression gate against a saved baseline (memopt's own JSON)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memopt.core.errors import MemoptError
from memopt.core.files import read_input
from memopt.core.results import StepMemory
from memopt.measure.tracker import MODE_CATEGORIES, MODE_PHASES
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


BASELINE_LIMIT_BYTES = 16 * 2**20
MAX_DEPTH = 64  # a memopt document nests 4 deep; JSON's own limit is near the recursion limit


def load_baseline(path: Path) -> dict[str, Any]:
    """Read and validate a baseline (memopt's schema-1 JSON): every number the gate compares must be a
    non-negative integer, NaN and infinities are refused anywhere; one MemoptError names the field."""
    if not os.path.lexists(path):
        raise MemoptError(f"baseline {path} does not exist; create it with: "
                          f"memopt check ... --baseline {path} --update")
    try:
        text = read_input(path, "baseline", BASELINE_LIMIT_BYTES)
    except MemoptError as exc:
        raise MemoptError(f"baseline {exc}") from None
    try:
        doc = json.loads(text)
    except RecursionError:
        raise MemoptError(f"baseline {path}: nested too deeply for a memopt profile JSON") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
        raise MemoptError(f"baseline {path}: not JSON ({exc})") from None
    problems = _baseline_problems(doc)
    if problems:
        raise MemoptError(f"baseline {path}: " + "; ".join(problems))
    return doc


def _baseline_problems(doc: Any) -> list[str]:
    """What is wrong with a parsed baseline, each as 'runs[0].peak_bytes: ...' (empty when it is sound)."""
    if not isinstance(doc, dict):
        return [f"expected a JSON object (a memopt profile JSON), got {_json_type(doc)}"]
    if "schema" not in doc:
        return ["schema: required (not a memopt profile JSON)"]
    if type(doc["schema"]) is not int or doc["schema"] != 1:
        return [f"schema {doc['schema']!r}, this memopt reads schema 1"]
    problems: list[str] = []
    if type(doc.get("device")) is not str:
        problems.append(_expected(doc, "device", "a string"))
    if not isinstance(doc.get("spec"), dict):
        problems.append(_expected(doc, "spec", "a mapping"))
    runs = doc.get("runs")
    if not isinstance(runs, list) or not runs or not isinstance(runs[0], dict):
        problems.append(_expected(doc, "runs", "a list whose first entry is a run"))
        return problems
    run = runs[0]
    problems += _byte_problems(run, "peak_bytes", "runs[0].peak_bytes")
    mode = _mode(doc)
    for field, names in (("category_peak_bytes", MODE_CATEGORIES[mode]),
                         ("phase_peak_bytes", MODE_PHASES[mode])):
        where = f"runs[0].{field}"
        if not isinstance(run.get(field), dict):
            problems.append(_expected(run, field, "a mapping", where))
            continue
        for name in names:
            problems += _byte_problems(run[field], name, f"{where}.{name}")
    return problems or _odd_values(doc)


def _mode(doc: dict[str, Any]) -> str:
    """The run mode a baseline was measured in (train when its spec names none, as before generation existed)."""
    run = doc.get("spec", {}).get("run") if isinstance(doc.get("spec"), dict) else None
    mode = run.get("mode", "train") if isinstance(run, dict) else "train"
    return mode if mode in MODE_CATEGORIES else "train"


def _byte_problems(parent: dict[str, Any], key: str, where: str) -> list[str]:
    if key not in parent:
        return [f"{where}: required"]
    value = parent[key]
    if type(value) is not int or value < 0:
        return [f"{where}: must be a non-negative integer (got {_shown(value)})"]
    return []


def _expected(parent: dict[str, Any], key: str, what: str, where: str | None = None) -> str:
    where = where or key
    if key not in parent:
        return f"{where}: required"
    return f"{where}: must be {what} (got {_shown(parent[key])})"


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _odd_values(doc: dict[str, Any]) -> list[str]:
    """NaN / Infinity (Python's json reads them; JSON has no such numbers) and nesting past MAX_DEPTH,
    anywhere in the document, by path."""
    stack: list[tuple[Any, str, int]] = [(doc, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            return [f"{where}: nested more than {MAX_DEPTH} deep"]
        if isinstance(value, float) and not math.isfinite(value):
            return [f"{where}: must be a finite number (got {value!r})"]
        if isinstance(value, dict):
            stack += [(v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    return []


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


def baseline_memory(baseline: dict[str, Any]) -> StepMemory:
    """The memory of a validated baseline's first run (what the gate compares)."""
    return StepMemory.from_json(baseline["runs"][0])


def growths(baseline: StepMemory, now: StepMemory, tolerance: float) -> list[Growth]:
    """Every number (peak, each category's own peak, each phase's peak) that grew past the tolerance."""
    pairs = [("peak", "total", baseline.peak_bytes, now.peak_bytes)]
    pairs += [(c, "category", old, now.category_peak_bytes.get(c, 0))
              for c, old in baseline.category_peak_bytes.items()]
    pairs += [(p, "phase", old, now.phase_peak_bytes.get(p, 0)) for p, old in baseline.phase_peak_bytes.items()]
    return [Growth(what, kind, old, new) for what, kind, old, new in pairs if new > old * (1 + tolerance)]
