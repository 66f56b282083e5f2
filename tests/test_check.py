"""``memopt check``'s baseline: validated like a spec, every bad field named, nothing that could hang or pass
the gate by accident (NaN, infinities, booleans, strings). Bad baselines are refused before anything runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from memopt.analysis.check import growths, load_baseline
from memopt.core.errors import MemoptError
from memopt.core.results import StepMemory
from memopt.measure.tracker import CATEGORIES, PHASES

from .helpers import CONFIGS, ROOT, invoke

GOOD = ROOT / "tests" / "baselines" / "tiny.json"


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change to the good baseline: 'runs.0.peak_bytes' = value (the key removed when value is DELETE)."""
    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return change


DELETE = object()
NAN, INF = float("nan"), float("inf")

BAD_FIELDS = [
    ("negative peak", _set("runs.0.peak_bytes", -1), "runs[0].peak_bytes: must be a non-negative integer (got -1)"),
    ("NaN peak", _set("runs.0.peak_bytes", NAN), "runs[0].peak_bytes: must be a non-negative integer (got nan)"),
    ("infinite peak", _set("runs.0.peak_bytes", INF), "runs[0].peak_bytes: must be a non-negative integer (got inf)"),
    ("boolean peak", _set("runs.0.peak_bytes", True), "runs[0].peak_bytes: must be a non-negative integer (got true)"),
    ("string peak", _set("runs.0.peak_bytes", "8173432"),
     "runs[0].peak_bytes: must be a non-negative integer (got \"8173432\")"),
    ("float peak", _set("runs.0.peak_bytes", 1.5), "runs[0].peak_bytes: must be a non-negative integer (got 1.5)"),
    ("null peak", _set("runs.0.peak_bytes", None), "runs[0].peak_bytes: must be a non-negative integer (got null)"),
    ("missing peak", _set("runs.0.peak_bytes", DELETE), "runs[0].peak_bytes: required"),
    ("NaN category", _set("runs.0.category_peak_bytes.activations", NAN),
     "runs[0].category_peak_bytes.activations: must be a non-negative integer (got nan)"),
    ("missing category", _set("runs.0.category_peak_bytes.grads", DELETE),
     "runs[0].category_peak_bytes.grads: required"),
    ("categories not a mapping", _set("runs.0.category_peak_bytes", [1, 2]),
     "runs[0].category_peak_bytes: must be a mapping (got [1, 2])"),
    ("negative phase", _set("runs.0.phase_peak_bytes.backward", -5),
     "runs[0].phase_peak_bytes.backward: must be a non-negative integer (got -5)"),
    ("missing phases", _set("runs.0.phase_peak_bytes", DELETE), "runs[0].phase_peak_bytes: required"),
    ("no runs", _set("runs", []), "runs: must be a list whose first entry is a run (got [])"),
    ("run not an object", _set("runs", ["baseline"]), "runs: must be a list whose first entry is a run"),
    ("missing runs", _set("runs", DELETE), "runs: required"),
    ("device not a string", _set("device", 0), "device: must be a string (got 0)"),
    ("spec not a mapping", _set("spec", "tiny"), "spec: must be a mapping (got \"tiny\")"),
    ("missing spec", _set("spec", DELETE), "spec: required"),
    ("schema 2", _set("schema", 2), "schema 2, this memopt reads schema 1"),
    ("schema true", _set("schema", True), "schema True, this memopt reads schema 1"),
    ("missing schema", _set("schema", DELETE), "schema: required"),
    ("NaN elsewhere", _set("runs.0.loss", NAN), "runs[0].loss: must be a finite number (got nan)"),
    ("nested deep", _set("spec.run.seed", json.loads("[" * 100 + "]" * 100)), "nested more than 64 deep"),
]

BAD_TEXTS = [
    ("deep JSON", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("not JSON", "{schema: 1}", "not JSON (Expecting property name"),
    ("a list", "[1, 2]", "expected a JSON object (a memopt profile JSON), got an array"),
    ("a number", "1", "expected a JSON object (a memopt profile JSON), got a number"),
    ("empty", "", "not JSON"),
    ("huge integer", '{"schema": 1, "x": ' + "9" * 5000 + "}", "not JSON"),
]


def _check(baseline: Path) -> Any:
    return invoke(["check", CONFIGS / "tiny.yaml", "--baseline", baseline])


def _assert_refused(result: Any, baseline: Path, expected: str) -> None:
    assert result.exit_code == 1, result.output
    assert f"baseline {baseline}: " in result.output and expected in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("label", "change", "expected"), BAD_FIELDS, ids=[c[0] for c in BAD_FIELDS])
def test_a_bad_field_is_named(tmp_path, label, change, expected):
    doc = json.loads(GOOD.read_text())
    change(doc)
    baseline = tmp_path / "b.json"
    baseline.write_text(json.dumps(doc))  # NaN and Infinity as Python's json writes them
    _assert_refused(_check(baseline), baseline, expected)


@pytest.mark.parametrize(("label", "text", "expected"), BAD_TEXTS, ids=[c[0] for c in BAD_TEXTS])
def test_a_bad_document_is_one_clear_error(tmp_path, label, text, expected):
    baseline = tmp_path / "b.json"
    baseline.write_text(text)
    _assert_refused(_check(baseline), baseline, expected)


def test_every_problem_is_reported_at_once(tmp_path):
    doc = json.loads(GOOD.read_text())
    doc["runs"][0]["peak_bytes"] = NAN
    del doc["runs"][0]["phase_peak_bytes"]["optimizer"]
    baseline = tmp_path / "b.json"
    baseline.write_text(json.dumps(doc))
    with pytest.raises(MemoptError) as err:
        load_baseline(baseline)
    assert str(err.value) == (f"baseline {baseline}: runs[0].peak_bytes: must be a non-negative integer (got nan); "
                              "runs[0].phase_peak_bytes.optimizer: required")


def test_a_nan_baseline_never_passes_the_gate(tmp_path):
    """Today a NaN peak compares False with everything: no growth is ever found and the gate says OK."""
    doc = json.loads(GOOD.read_text())
    for c in CATEGORIES:
        doc["runs"][0]["category_peak_bytes"][c] = NAN
    for p in PHASES:
        doc["runs"][0]["phase_peak_bytes"][p] = NAN
    doc["runs"][0]["peak_bytes"] = NAN
    baseline = tmp_path / "b.json"
    baseline.write_text(json.dumps(doc))
    now = StepMemory.from_json(json.loads(GOOD.read_text())["runs"][0])
    assert growths(StepMemory.from_json(doc["runs"][0]), now, 0.0) == []  # why it must be refused
    result = _check(baseline)
    assert result.exit_code == 1 and "must be a non-negative integer (got nan)" in result.output


def test_non_regular_and_oversized_baselines_are_refused_before_reading(tmp_path):
    fifo = tmp_path / "b.json"
    os.mkfifo(fifo)
    cmd = [sys.executable, "-c", "from memopt.cli import main; main()", "check", str(CONFIGS / "tiny.yaml"),
           "--baseline", str(fifo)]
    # today: blocks forever waiting for a writer
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT, check=False)
    assert result.returncode == 1, result.stderr
    assert f"baseline {fifo}: is a FIFO, expected a baseline file" in result.stderr
    _assert_refused(_check(Path("/dev/zero")), Path("/dev/zero"), "is a character device, expected a baseline file")
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"pad": "x" * (17 * 2**20)}))
    _assert_refused(_check(big), big, "MiB is larger than the 16 MiB a baseline may be")
    _assert_refused(_check(tmp_path), tmp_path, "is a directory, expected a baseline file")


def test_missing_baseline_says_how_to_make_one(tmp_path):
    result = _check(tmp_path / "none.json")
    assert result.exit_code == 1 and "does not exist; create it with" in result.output


def test_the_repository_baseline_loads_unchanged():
    assert load_baseline(GOOD) == json.loads(GOOD.read_text())


def test_check_gate(tmp_path):
    baseline = tmp_path / "base.json"
    missing = invoke(["check", CONFIGS / "tiny.yaml", "--baseline", baseline])
    assert missing.exit_code == 1 and "--update" in missing.output
    assert invoke(["check", CONFIGS / "tiny.yaml", "--baseline", baseline, "--update"]).exit_code == 0
    assert invoke(["check", CONFIGS / "tiny.yaml", "--baseline", baseline, "--tolerance", "0.5%"]).exit_code == 0
    doc = json.loads(baseline.read_text())
    run = doc["runs"][0]
    run["peak_bytes"] = int(run["peak_bytes"] * 0.9)
    run["category_peak_bytes"]["activations"] = int(run["category_peak_bytes"]["activations"] * 0.9)
    baseline.write_text(json.dumps(doc))
    grown = invoke(["check", CONFIGS / "tiny.yaml", "--baseline", baseline, "--markdown", tmp_path / "m.md"])
    assert grown.exit_code == 3
    assert "activations" in grown.output and "peak" in grown.output
    assert "memory regression" in (tmp_path / "m.md").read_text()
    other = invoke(["check", CONFIGS / "tiny-decoder.yaml", "--baseline", baseline])
    assert other.exit_code == 1 and "another spec" in other.output and "model.arch" in other.output


def test_check_update_that_fails_leaves_the_old_baseline(tmp_path):
    baseline = tmp_path / "base.json"
    shutil.copy(ROOT / "tests" / "baselines" / "tiny.json", baseline)
    before = baseline.read_bytes()
    result = invoke(["check", CONFIGS / "tiny.yaml", "--baseline", baseline, "--update", "--device-memory", "1MiB"])
    assert result.exit_code == 1 and "out of memory" in result.output
    assert baseline.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_repository_baseline_still_holds():
    result = invoke(["check", CONFIGS / "tiny.yaml", "--baseline", ROOT / "tests" / "baselines" / "tiny.json",
                     "--tolerance", "1%"])
    assert result.exit_code == 0, result.output
