"""estimate: the traced step on fake tensors equals the real profile, for models of any size."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from memopt.analysis.estimate import analytic, estimate
from memopt.spec import load_spec

from .helpers import CONFIGS, invoke, run

STRATEGIES = [[], ["ckpt"], ["ckpt:policy=selective"], ["ckpt:policy=every"], ["chunked_ce"], ["amp"],
              ["accum:micro_batches=4"], ["offload"], ["optim_in_bwd"], ["quant:bits=4,lora=8,group_size=16"],
              ["optim8bit"], ["prune:ffn=0.5,heads=0.5"], ["ckpt", "chunked_ce", "optim_in_bwd"]]


@pytest.mark.parametrize("strategies", STRATEGIES, ids=["+".join(s) or "baseline" for s in STRATEGIES])
@pytest.mark.parametrize("config", ["tiny.yaml", "tiny-decoder.yaml"])
def test_estimate_equals_profile(config, strategies):
    spec = load_spec(CONFIGS / config, strategies=strategies)
    real, traced = run(spec).memory, estimate(spec).memory
    assert abs(traced.peak_bytes - real.peak_bytes) <= 0.01 * real.peak_bytes
    for key, value in real.state_bytes.items():
        assert abs(traced.state_bytes[key] - value) <= 0.01 * max(value, 1)


def test_sdpa_estimate_equals_profile(tiny):
    spec = load_spec(CONFIGS / "tiny.yaml", strategies=["sdpa"])
    assert estimate(spec).memory.peak_bytes == run(spec).memory.peak_bytes


def test_cuda_estimate_rounds_to_allocator_blocks():
    spec = load_spec(CONFIGS / "tiny.yaml", {"device": "cuda"})
    result = estimate(spec)
    assert result.device == "cuda" and result.estimated
    assert result.memory.peak_bytes % 512 == 0
    assert result.memory.peak_bytes >= estimate(load_spec(CONFIGS / "tiny.yaml")).memory.peak_bytes


def test_llama_70b_fp32_estimates_in_little_memory():
    """Its weights alone would be 257 GiB; the estimate must stay under 1.5 GiB of RSS."""
    code = ("import json, resource; from memopt.analysis.estimate import estimate; from memopt.spec import load_spec; "
            "r = estimate(load_spec('llama-70b', {'batch_size': 1, 'seq_len': 256})); "
            "print(json.dumps([r.memory.state_bytes['params'], r.params_total, "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    params_bytes, total, rss = json.loads(out.strip().splitlines()[-1])
    assert total == 68_976_648_192 and params_bytes == total * 4
    assert rss < 1.5 * 2**30


def test_fits_answers_consistently_and_suggests_strategies(tmp_path):
    peak = estimate(load_spec(CONFIGS / "tiny.yaml")).memory.peak_bytes
    out = tmp_path / "e.json"
    yes = invoke(["estimate", CONFIGS / "tiny.yaml", "--fits", f"{peak + 1024}B", "--json-out", out])
    assert yes.exit_code == 0 and "fits in" in yes.output
    assert json.loads(out.read_text())["fits"]["fits"] is True
    no = invoke(["estimate", CONFIGS / "tiny.yaml", "--fits", "6MiB", "--json-out", out])
    doc = json.loads(out.read_text())
    assert no.exit_code == 0 and doc["fits"]["fits"] is False and doc["estimated"] is True
    helpers = doc["fits"]["single_strategies_that_fit"]
    assert helpers and all(h["peak_bytes"] <= 6 * 2**20 for h in helpers)
    assert any(h["strategies"] == "ckpt" for h in helpers)


@pytest.mark.parametrize("size", ["24 GB?", "lots", "-5GiB", "0"])
def test_bad_sizes_are_a_clear_error(size):
    result = invoke(["estimate", CONFIGS / "tiny.yaml", "--fits", size])
    assert result.exit_code == 1 and "--fits" in result.output and "Traceback" not in result.output


def test_analytic_formulas_are_exact_for_state_and_show_their_activation_error():
    spec = load_spec(CONFIGS / "tiny.yaml")
    formulas, traced = analytic(spec), estimate(spec).memory
    assert formulas["params"] == traced.state_bytes["params"]
    assert formulas["grads"] == traced.state_bytes["grads"]
    assert formulas["activations"] != traced.category_peak_bytes["activations"]
