"""The command line: bad input exits 1 with one clear message; JSON stays clean."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import CONFIGS, invoke

TINY = (CONFIGS / "tiny.yaml").read_text()

MALFORMED = [
    ("bad yaml", "model: [1, 2\n", "invalid YAML"),
    ("tab indentation", "model:\n\td_model: 64\n", "invalid YAML"),
    ("unknown key", TINY.replace("n_heads:", "n_head:"), "model.n_head: unknown key; did you mean n_heads?"),
    ("unknown section", TINY + "extra: 1\n", "extra: unknown key"),
    ("wrong type", TINY.replace("d_model: 64", "d_model: sixty-four"), "model.d_model"),
    ("float for int", TINY.replace("n_layers: 2", "n_layers: 2.5"), "model.n_layers"),
    ("negative size", TINY.replace("batch_size: 4", "batch_size: -4"), "train.batch_size"),
    ("zero layers", TINY.replace("n_layers: 2", "n_layers: 0"), "model.n_layers"),
    ("heads do not divide", TINY.replace("n_heads: 4", "n_heads: 5"), "model.n_heads: 5 does not divide d_model 64"),
    ("unknown arch", TINY.replace("arch: encoder", "arch: rnn"), "model.arch"),
    ("unknown strategy", TINY + "strategies: [ckpz]\n", "strategies[0].ckpz: unknown strategy"),
    ("unknown dtype", TINY.replace("dtype: float32", "dtype: int3"), "run.dtype"),
    ("unknown optimizer", TINY.replace("optimizer: adamw", "optimizer: lion"), "train.optimizer"),
    ("seq longer than table", TINY.replace("  seq_len: 64", "  seq_len: 128").replace("max_seq_len: 128", "max_seq_len: 64"), "train.seq_len: 128 exceeds"),
    ("duplicate key", TINY.replace("n_layers: 2", "n_layers: 2\n  n_layers: 3"), "duplicate key 'n_layers'"),
    ("empty file", "", "empty"),
    ("top-level list", "- 1\n- 2\n", "expected a mapping"),
    ("section not a mapping", "model: 5\n", "model"),
    ("dropout out of range", TINY.replace("d_model: 64", "d_model: 64\n  dropout: 1.5"), "model.dropout"),
    ("bool for int", TINY.replace("n_layers: 2", "n_layers: true"), "model.n_layers"),
]


@pytest.mark.parametrize(("label", "text", "expected"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_spec_exits_1_naming_the_field(tmp_path, label, text, expected):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    result = invoke(["profile", path])
    assert result.exit_code == 1, result.output
    assert expected in result.output
    assert "Traceback" not in result.output


def test_missing_file_and_directory(tmp_path):
    for target, expected in ((tmp_path / "nope.yaml", "no such file"), (tmp_path, "is a directory")):
        result = invoke(["profile", target])
        assert result.exit_code == 1 and expected in result.output and "Traceback" not in result.output


def test_cuda_missing_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = invoke(["profile", CONFIGS / "tiny.yaml", "--device", "cuda"])
    assert result.exit_code == 1 and "no CUDA device" in result.output


def test_usage_error_exits_2():
    assert invoke(["profile", "--batch-size", "many"]).exit_code == 2


def test_profile_json_on_stdout_is_pure_and_complete():
    result = invoke(["profile", CONFIGS / "tiny.yaml", "--steps", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == 1 and data["device"] == "cpu"
    run = data["runs"][0]
    for key in ("params", "state_bytes", "peak_bytes", "peak_breakdown", "category_peak_bytes", "phase_peak_bytes",
                "python_heap_peak_bytes", "rss_peak_bytes", "cuda", "step_time_s", "loss"):
        assert key in run
    assert sum(run["peak_breakdown"].values()) == run["peak_bytes"]
    assert run["peak_bytes"] == max(run["phase_peak_bytes"].values())


def test_profile_json_file_is_written_and_tables_printed(tmp_path):
    out = tmp_path / "sub" / "profile.json"
    result = invoke(["profile", CONFIGS / "tiny.yaml", "--steps", "1", "--json", out])
    assert result.exit_code == 0, result.output
    assert "Where the bytes go" in result.stdout
    assert json.loads(out.read_text())["runs"][0]["ok"] is True
    assert [p.name for p in out.parent.iterdir()] == ["profile.json"]  # no temp file left


def test_help_does_not_import_torch():
    code = "import sys, memopt.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    for command in ([], ["profile"], ["compare"], ["check"], ["estimate"], ["optimize"], ["strategies"]):
        result = invoke([*command, "--help"])
        assert result.exit_code == 0 and "Example" in result.output
