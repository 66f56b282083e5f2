"""The CUDA caching allocator: its settings as a strategy (``allocator``) and the tracker's peak reconciled with
``max_memory_allocated`` / ``max_memory_reserved``. The CPU tests check the settings, the refusals and the
arithmetic; the CUDA ones (skipped without a GPU) the measured figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from memopt.core.results import StepMemory, cuda_reconciliation
from memopt.render.tables import _cuda_rows
from memopt.spec import load_spec
from memopt.strategies import allocated_view, set_up_process
from memopt.strategies.allocator import ENV, AllocatorOptions, alloc_conf, merged_conf

from .helpers import CONFIGS, ROOT


def test_the_options_are_written_as_pytorch_reads_them():
    options = AllocatorOptions(expandable_segments=True, max_split_size_mb=128, garbage_collection_threshold=0.6)
    assert alloc_conf(options) == "expandable_segments:True,max_split_size_mb:128,garbage_collection_threshold:0.6"
    assert alloc_conf(AllocatorOptions(max_split_size_mb=64)) == "max_split_size_mb:64"


def test_ours_go_over_the_users_and_theirs_stay():
    assert merged_conf("expandable_segments:True", "max_split_size_mb:64,expandable_segments:False") == \
        "max_split_size_mb:64,expandable_segments:True"
    assert merged_conf("expandable_segments:True", "") == "expandable_segments:True"


def test_set_before_cuda_initialises(monkeypatch):
    monkeypatch.setenv(ENV, "garbage_collection_threshold:0.8")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    set_up_process(load_spec(CONFIGS / "tiny.yaml", strategies=["allocator:expandable_segments=true"]))
    assert __import__("os").environ[ENV] == "garbage_collection_threshold:0.8,expandable_segments:True"


@pytest.mark.parametrize("args,message", [
    (["profile", "-s", "allocator:expandable_segments=true"], "allocator: works only on cuda, not on cpu"),
    (["estimate", "--device", "cuda", "-s", "allocator:expandable_segments=true"], "an estimate does not model"),
    (["estimate", "--device", "cuda", "-s", "allocator"], "set expandable_segments, max_split_size_mb or"),
    (["estimate", "--device", "cuda", "-s", "allocator:max_split_size_mb=10"], "greater than 20"),
])
def test_what_cannot_work_is_refused_clearly(args, message, tmp_path):
    done = subprocess.run([sys.executable, "-m", "memopt", args[0], str(CONFIGS / "tiny.yaml"), *args[1:]],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_preflight_traces_the_spec_without_the_allocator_settings():
    spec = load_spec(CONFIGS / "tiny.yaml", strategies=["ckpt", "allocator:expandable_segments=true"])
    assert [s.name for s in allocated_view(spec).strategies] == ["ckpt"]


def test_the_difference_is_itemised():
    memory = StepMemory(1_000_000, {}, {}, {}, {"params": 400_000, "optimizer": 200_000}, "backward")
    cuda = {"max_allocated_bytes": 1_300_000, "max_reserved_bytes": 2_000_000, "allocated_at_start_bytes": 700_000}
    assert cuda_reconciliation(memory, cuda) == {
        "tracker_peak": 1_000_000, "max_allocated": 1_300_000, "difference": 300_000, "outside_at_start": 100_000,
        "unexplained": 200_000, "max_reserved": 2_000_000, "reserved_not_allocated": 700_000}
    (_, _, allocated), (_, _, reserved) = _cuda_rows(memory, cuda)
    assert "292.97 KiB, 30.0% above the tracker's peak, 97.66 KiB of it allocated outside any op" in allocated
    assert reserved.startswith("683.59 KiB reserved and not allocated")


def _profiled(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "memopt", "profile", "configs/seed.yaml", "--device", "cuda",
                           "--steps", "2", "--json", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["runs"][0]


@pytest.mark.parametrize("setting", ["", "ckpt", "chunked_ce", "offload_states+ckpt"])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_tracker_is_within_1_percent_of_the_allocator_once_named(setting):
    run = _profiled(*(["-s", setting] if setting else []))
    r = cuda_reconciliation(StepMemory.from_json(run), run["cuda"])
    assert abs(r["unexplained"]) <= 0.01 * r["max_allocated"], r


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_expandable_segments_reach_the_runs_allocator():
    run = _profiled("-s", "allocator:expandable_segments=true")
    assert "expandable_segments:True" in run["strategy_facts"]["allocator"][ENV]
    assert run["cuda"]["max_reserved_bytes"] >= run["cuda"]["max_allocated_bytes"]
