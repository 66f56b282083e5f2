"""The command line: bad input exits 1 with one clear message; JSON stays clean."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .helpers import CONFIGS, invoke

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
    ("seq longer than table",
     TINY.replace("  seq_len: 64", "  seq_len: 128").replace("max_seq_len: 128", "max_seq_len: 64"),
     "train.seq_len: 128 exceeds"),
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
    result = invoke(["profile", CONFIGS / "tiny.yaml", "--steps", "1", "--json-out", out])
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


def test_version_exits_0():
    result = invoke(["--version"])
    assert result.exit_code == 0 and result.output.startswith("memopt ")


def test_json_is_a_flag_and_never_swallows_the_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(["estimate", "--json", "gpt2", "--batch-size", "1", "--seq-len", "8"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["spec"]["model"]["d_model"] == 768  # gpt2 was estimated, not the default model
    assert list(tmp_path.iterdir()) == []  # and no file named gpt2 was written
    old_style = invoke(["profile", "--json", "out.json"])
    assert old_style.exit_code == 1 and "--json-out" in old_style.output


def test_a_file_named_like_a_preset_does_not_shadow_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").write_text("model: {d_model: 64, n_heads: 4}\n")
    preset = invoke(["estimate", "gpt2", "--json", "--batch-size", "1", "--seq-len", "8"])
    assert preset.exit_code == 0 and json.loads(preset.stdout)["spec"]["model"]["d_model"] == 768
    assert "./gpt2" in preset.stderr
    own = invoke(["estimate", "./gpt2", "--json", "--batch-size", "1", "--seq-len", "8"])
    assert own.exit_code == 0 and json.loads(own.stdout)["spec"]["model"]["d_model"] == 64


@pytest.mark.parametrize(("args", "expected"), [
    (["compare", "-s", "+"], "--strategies"),
    (["compare", "-s", "ckpt,"], "--strategies"),
    (["profile", "-s", "bits=4"], "--strategies"),
    (["estimate", "--fits", ""], "--fits"),
    (["estimate", "--fits", "0.5"], "--fits"),
    (["estimate", "--fits", "1e309GiB"], "--fits"),
    (["profile", "--device-memory", "lots"], "--device-memory"),
    (["optimize", "--budget", "0B"], "--budget"),
    (["check", "--baseline", "x.json", "--tolerance", "nan"], "--tolerance"),
    (["profile", "--batch-size", "-3"], "--batch-size"),
    (["profile", "--seq-len", "0"], "--seq-len"),
    (["profile", "--dtype", "int3"], "--dtype"),
    (["profile", "--device", "tpu"], "--device"),
])
def test_every_bad_option_value_is_one_error_naming_the_option(args, expected):
    result = invoke([args[0], CONFIGS / "tiny.yaml", *args[1:]])
    assert result.exit_code == 1, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert "run 1/" not in result.output


def test_profile_accepts_the_compare_spelling_of_a_set():
    joined = invoke(["profile", CONFIGS / "tiny.yaml", "--steps", "1", "-s", "ckpt+chunked_ce", "--json"])
    listed = invoke(["profile", CONFIGS / "tiny.yaml", "--steps", "1", "-s", "ckpt", "-s", "chunked_ce", "--json"])
    assert joined.exit_code == listed.exit_code == 0, joined.output + listed.output
    a, b = json.loads(joined.stdout)["runs"][0], json.loads(listed.stdout)["runs"][0]
    assert [next(iter(s)) for s in a["strategies"]] == ["ckpt", "chunked_ce"]
    assert a["peak_bytes"] == b["peak_bytes"]


def test_float16_on_cpu_warns_and_writes_strict_json(tmp_path):
    out = tmp_path / "p.json"
    result = invoke(["profile", CONFIGS / "tiny.yaml", "--steps", "1", "--dtype", "float16", "--json-out", out])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    run = json.loads(text)["runs"][0]
    assert run["loss"] is None  # tiny overflows in float16 on the CPU: said on stderr and in the JSON
    assert "warning" in result.stderr and "float16" in result.stderr and run["warnings"]


def _interrupt(args: list[str], after_s: float, cwd) -> tuple[int, str]:
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "memopt.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(after_s)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize("after_s", [2.5, 5.0])
def test_ctrl_c_exits_130_and_writes_nothing(tmp_path, after_s):
    out = tmp_path / "p.json"
    out.write_text("old")
    code, err = _interrupt(["profile", str(CONFIGS / "tiny.yaml"), "--steps", "10000", "--json-out", str(out)],
                           after_s, tmp_path)
    assert code == 130 and "interrupted" in err, err
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["p.json"]


def test_an_ascii_locale_prints_every_table(tmp_path):
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "LC_ALL": "C", "LANG": "C"}
    for args in (["compare", str(CONFIGS / "tiny.yaml"), "-s", "ckpt", "--steps", "1"], ["strategies"],
                 ["profile", str(CONFIGS / "tiny.yaml"), "-s", "ckpτ"]):
        proc = subprocess.run([sys.executable, "-m", "memopt.cli", *args], capture_output=True, env=env, timeout=300)
        assert b"UnicodeEncodeError" not in proc.stderr and b"Traceback" not in proc.stderr, proc.stderr
        assert proc.returncode == (1 if "ckpτ" in args else 0)


@pytest.mark.parametrize("option", ["--markdown", "--json-out", "--plot"])
def test_an_output_that_is_the_input_spec_is_refused_before_running(tmp_path, option):
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY)
    target = spec if option != "--plot" else tmp_path / "link.png"
    if option == "--plot":
        target.symlink_to(spec)
    result = invoke(["compare", spec, "-s", "ckpt", option, target])
    assert result.exit_code == 1 and "refusing to overwrite" in result.output, result.output
    assert spec.read_text() == TINY and "run 1/" not in result.output
    update = invoke(["check", spec, "--baseline", spec, "--update"])
    assert update.exit_code == 1 and spec.read_text() == TINY


def test_progress_on_a_stderr_that_is_not_a_terminal_is_plain_lines(tmp_path):
    """CI logs and ``2> log``: a line per stage (a run, a phase), none repeated for each step within 10 s."""
    done = subprocess.run([sys.executable, "-m", "memopt", "compare", str(CONFIGS / "tiny.yaml"), "-s", "ckpt",
                           "--steps", "2"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert any(line.endswith("run 2/2: ckpt") for line in lines)
    assert all(line.startswith("[") and " s] " in line for line in lines), lines


def test_plain_progress_prints_a_stage_once_and_long_work_every_10_s():
    from memopt.render.progress import PlainProgress

    now = [0.0]
    seen: list[str] = []
    plain = PlainProgress(seen.append, clock=lambda: now[0])
    plain.update("baseline: building the model")  # the first 2 s are quiet
    for step in range(1, 6):
        now[0] += 3
        plain.update(f"baseline: measured step {step}/5")
    now[0] += 1
    plain.update("ckpt: building the model")
    assert seen == ["[    3 s] baseline: measured step 1/5", "[   15 s] baseline: measured step 5/5",
                    "[   16 s] ckpt: building the model"]
