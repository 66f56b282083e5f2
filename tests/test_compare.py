"""compare (isolated runs side by side), check (the CI gate), timelines and the pytest marker."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from .conftest import CONFIGS, ROOT, invoke

pytest_plugins = ["pytester"]


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


def test_profile_device_memory_is_a_clear_error():
    result = invoke(["profile", CONFIGS / "tiny.yaml", "--device-memory", "3MiB"])
    assert result.exit_code == 1 and "out of memory" in result.output and "Traceback" not in result.output


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


@pytest.mark.parametrize("suffix", [".png", ".html"])
def test_timeline_files_peak_at_the_runs_peak(tmp_path, suffix):
    target = tmp_path / f"timeline{suffix}"
    result = invoke(["profile", CONFIGS / "tiny.yaml", "--timeline", target, "--json-out", tmp_path / "p.json"])
    assert result.exit_code == 0, result.output
    peak = json.loads((tmp_path / "p.json").read_text())["runs"][0]["peak_bytes"]
    if suffix == ".png":
        from PIL import Image  # comes with matplotlib

        data = json.loads(Image.open(target).text["memopt-timeline"])
    else:
        page = target.read_text()
        data = json.loads(re.search(r'<script type="application/json" id="memopt-timeline">(.*?)</script>', page,
                                    re.S).group(1))
    assert max(sum(b) for b in data["bytes"]) == peak == data["peak_bytes"]
    assert set(data["phases"]) == {"forward", "backward", "optimizer"}


def test_pytest_marker_fails_over_and_passes_under(pytester):
    pytester.makepyfile("""
        import pytest, torch

        @pytest.mark.memopt_limit(peak="1 MiB")
        def test_under():
            x = torch.ones(1000, requires_grad=True)
            (x * 2).sum().backward()

        @pytest.mark.memopt_limit(peak="64 MiB", activations="1 MiB")
        def test_over():
            w = torch.ones(1024, 1024, requires_grad=True)
            x = torch.ones(512, 1024)
            (x @ w).relu().sum().backward()   # saved: x for the matmul (2 MiB), the relu output (2 MiB)
    """)
    result = pytester.runpytest()  # the plugin loads through its pytest11 entry point
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*memopt_limit exceeded: activations 4.00 MiB > limit 1.00 MiB*"])
