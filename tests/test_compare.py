"""compare: isolated runs side by side, the sets any run would refuse refused up front, failures reported."""

from __future__ import annotations

import json
import re

import pytest

from .helpers import CONFIGS, invoke


def test_compare_runs_each_set_in_its_own_process_consistent_with_profile(tmp_path):
    out = tmp_path / "compare.json"
    result = invoke(["compare", CONFIGS / "tiny.yaml", "-s", "ckpt,chunked_ce,ckpt+chunked_ce", "--json-out", out,
                     "--markdown", tmp_path / "pr.md"])
    assert result.exit_code == 0, result.output
    runs = json.loads(out.read_text())["runs"]
    assert [r["name"] for r in runs] == ["baseline", "ckpt", "chunked_ce", "ckpt+chunked_ce"]
    assert len({r["pid"] for r in runs}) == 4
    for run in runs[1:]:
        alone = invoke(["profile", CONFIGS / "tiny.yaml", "-s", run["name"].replace("+", ","), "--json"])
        profile = json.loads(alone.stdout)["runs"][0]
        assert profile["peak_bytes"] == run["peak_bytes"]
        assert run["vs_baseline"]["saving"] == pytest.approx(1 - run["peak_bytes"] / runs[0]["peak_bytes"])
        assert run["vs_baseline"]["grad_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert "| ckpt+chunked_ce |" in (tmp_path / "pr.md").read_text()


def test_a_set_any_run_would_refuse_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "c.json"
    for sets, expected in (("ckpt,accum+optim_in_bwd", "refused"), ("ckpt,quant:head=true+chunked_ce", "chunked_ce"),
                           ("ckpt,ckpt", "given twice")):
        result = invoke(["compare", CONFIGS / "tiny.yaml", "-s", sets, "--json-out", out])
        assert result.exit_code == 1 and expected in result.output, result.output
        assert "run 1/" not in result.output and not out.exists()
    sdpa_model = tmp_path / "sdpa.yaml"
    sdpa_model.write_text((CONFIGS / "tiny-decoder.yaml").read_text().replace("attention: eager", "attention: sdpa"))
    decoder = invoke(["compare", sdpa_model, "-s", "ckpt,sdpa"])
    assert decoder.exit_code == 1 and "set sdpa: sdpa: model.attention is already sdpa" in decoder.output


def test_a_run_that_fails_at_run_time_is_reported_while_the_others_complete(tmp_path):
    spec = tmp_path / "ckpt.yaml"
    spec.write_text((CONFIGS / "tiny.yaml").read_text() + "strategies: [ckpt]\n")
    out = tmp_path / "c.json"
    # the baseline (full checkpointing) peaks at ~5.8 MiB, sdpa alone at ~7.2 MiB
    result = invoke(["compare", spec, "-s", "sdpa,ckpt+chunked_ce", "--device-memory", "6.5MiB",
                     "--json-out", out])
    assert result.exit_code == 0, result.output
    runs = {r["name"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs["baseline"]["ok"] and runs["ckpt+chunked_ce"]["ok"]
    assert not runs["sdpa"]["ok"] and "out of memory" in runs["sdpa"]["error"]


def test_device_memory_stops_runs_over_it_and_names_the_phase(tmp_path):
    out = tmp_path / "c.json"
    out.write_text("keep me")
    result = invoke(["compare", CONFIGS / "tiny.yaml", "-s", "ckpt", "--device-memory", "7MiB", "--json-out", out])
    assert result.exit_code == 1  # the baseline itself did not fit
    assert re.search(r"out of memory.*during (forward|backward|optimizer)", result.output)
    assert out.read_text() == "keep me"  # a failed command replaces nothing
    assert "ckpt" in result.stdout  # the table still shows each run
