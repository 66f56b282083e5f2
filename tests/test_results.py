"""memopt.core.results without a model: every run type round-trips through schema-1 JSON unchanged."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from memopt.core.results import HostPeaks, RunResult, StepMemory, VsBaseline
from memopt.render.outputs import json_text

from .helpers import ROOT

BASELINE = ROOT / "tests" / "baselines" / "tiny.json"

# a schema-1 run dict, key by key in the order memopt writes it (vs_baseline only in a compare)
RUN_KEYS = ["name", "strategies", "ok", "error", "estimated", "params", "state_bytes", "peak_bytes", "peak_breakdown",
            "category_peak_bytes", "phase_peak_bytes", "peak_phase", "peak_module", "python_heap_peak_bytes",
            "rss_peak_bytes", "cuda", "step_time_s", "loss", "drift", "strategy_facts", "notes",
            "warnings", "pid"]


def _ok_run(**changes: object) -> RunResult:
    categories = {"params": 4096, "buffers": 0, "grads": 4096, "optimizer": 8192, "activations": 70_000,
                  "temporaries": 3000}
    memory = StepMemory(peak_bytes=80_000, peak_breakdown={**categories, "grads": 0},
                        category_peak_bytes=categories,
                        phase_peak_bytes={"forward": 60_000, "backward": 80_000, "optimizer": 20_000},
                        state_bytes={"params": 4096, "buffers": 0, "grads": 4096, "optimizer": 8192},
                        peak_phase="backward", peak_module="layers.1.attn")
    run = RunResult(name="quant:bits=4+ckpt", strategies=[{"quant": {"bits": 4}}, {"ckpt": {}}], device="cuda",
                    params_total=1000, params_trainable=10, memory=memory,
                    host=HostPeaks(rss_peak_bytes=3 * 2**20, python_heap_peak_bytes=5000,
                                   cuda={"max_allocated_bytes": 81_920, "max_reserved_bytes": 2**21}),
                    step_time_s=0.25, loss=6.5, drift={"logits_rel_error": 0.004, "loss_delta": 0.01},
                    strategy_facts={"quant": {"packed_bytes": 512}}, notes=["4-bit weights"],
                    warnings=["the loss is nan"], pid=4321,
                    vs_baseline=VsBaseline(saving=0.4, slowdown=1.3, loss_delta=-0.02, grad_cosine=0.998))
    for key, value in changes.items():
        setattr(run, key, value)
    return run


def test_an_ok_run_round_trips_with_memory_drift_vs_baseline_and_warnings():
    run = _ok_run()
    data = run.to_json()
    assert list(data) == [*RUN_KEYS, "vs_baseline"]
    assert data["params"] == {"total": 1000, "trainable": 10} and data["peak_bytes"] == 80_000
    assert data["vs_baseline"] == {"saving": 0.4, "slowdown": 1.3, "loss_delta": -0.02, "grad_cosine": 0.998,
                                   "slowdown_spread": None, "same_time": False}
    back = RunResult.from_json(json.loads(json.dumps(data)), device="cuda")
    assert back == run
    assert back.to_json() == data and list(back.to_json()) == list(data)


def test_vs_baseline_is_written_only_when_present():
    data = _ok_run(vs_baseline=None).to_json()
    assert list(data) == RUN_KEYS
    assert RunResult.from_json(data).vs_baseline is None


def test_a_failed_run_is_its_name_strategies_and_error():
    run = RunResult.failed("sdpa", [{"sdpa": {}}], "out of memory during backward", device="cpu")
    data = run.to_json()
    assert data == {"name": "sdpa", "strategies": [{"sdpa": {}}], "ok": False, "error": "out of memory during backward"}
    back = RunResult.from_json(json.loads(json.dumps(data)), device="cpu")
    assert back == run and back.to_json() == data
    assert not back.ok and back.memory is None


def test_the_repository_baseline_loads_and_writes_back_the_same_run():
    original = json.loads(BASELINE.read_text())["runs"][0]
    again = RunResult.from_json(original, device="cpu").to_json()
    # written before estimated and warnings existed: those are added with their defaults, all else is kept
    assert {k: v for k, v in again.items() if k in original} == original
    assert [k for k in again if k in original] == list(original)
    assert {k: v for k, v in again.items() if k not in original} == {"estimated": False, "warnings": []}


def test_strict_json_nulls_read_back_as_nan():
    text = json_text(_ok_run(loss=math.nan, vs_baseline=VsBaseline(0.1, 1.0, math.nan, None)).to_json())
    back = RunResult.from_json(json.loads(text))
    assert math.isnan(back.loss) and math.isnan(back.vs_baseline.loss_delta)
    assert json.loads(json_text(back.to_json())) == json.loads(text)


def test_memory_of_a_baseline_that_holds_only_what_check_compares():
    data = {"peak_bytes": 10, "category_peak_bytes": {"params": 1}, "phase_peak_bytes": {"forward": 10}}
    memory = StepMemory.from_json(data)
    assert (memory.peak_bytes, memory.category_peak_bytes, memory.phase_peak_bytes) == (10, {"params": 1},
                                                                                         {"forward": 10})
    assert memory.peak_breakdown == {} and memory.state_bytes == {} and memory.peak_module is None


def test_results_imports_no_torch():
    code = "import sys, memopt.core.results; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
