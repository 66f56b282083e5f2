"""The doors hold: ranks are checked before any starts and never outlive their launcher, user code cannot fake a
result, HF inputs that would hang or flood are refused at once, and a killed write leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from memopt.core.files import write_output

from .helpers import CONFIGS, ROOT, invoke

USER_MODULE = '''
import os, sys
import torch
from torch import nn
print("printed at import")
CALLS = os.path.join(os.path.dirname(__file__), "calls.txt")

class Tiny(nn.Module):
    def __init__(self, exit_in_forward=False):
        super().__init__()
        self.emb, self.out, self.exit_in_forward = nn.Embedding(50, 8), nn.Linear(8, 50), exit_in_forward
    def forward(self, x):
        print("printed in forward")
        if self.exit_in_forward:
            sys.exit(3)
        return self.out(self.emb(x))

class Empty(nn.Module):
    def forward(self, x):
        return torch.zeros(*x.shape, 50, requires_grad=True)

def tiny():
    with open(CALLS, "a") as f:
        f.write("call\\n")
    print("printed in the factory")
    return Tiny()
def exits0():
    sys.exit(0)
def hard_exit():
    os._exit(0)
def exit_in_forward():
    return Tiny(exit_in_forward=True)
def empty():
    return Empty()
def batch_exits(batch_size, seq_len, device):
    sys.exit(0)
'''


@pytest.fixture
def user_module(tmp_path: Path) -> Path:
    (tmp_path / "usermod.py").write_text(USER_MODULE)
    return tmp_path


def memopt(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memopt.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"})


SMALL = ["--batch-size", "2", "--seq-len", "8"]


# -- ranks before checks ---------------------------------------------------------------------------------------------

@pytest.fixture
def no_rank_may_start(monkeypatch):
    import memopt.engine.ranks

    def refuse(*_args, **_kwargs):
        raise AssertionError("a rank process was started")

    monkeypatch.setattr(memopt.engine.ranks.subprocess, "Popen", refuse)


def test_ranks_whose_batch_does_not_split_are_refused_before_any_starts(no_rank_may_start):
    result = invoke(["profile", CONFIGS / "tiny.yaml", "--world-size", "3"])
    assert result.exit_code == 1, result.output
    assert "train.batch_size 4 does not split over 3 ranks" in " ".join(result.output.split())


def _machine(monkeypatch: pytest.MonkeyPatch, available_mib: int, interpreter_mib: int) -> None:
    """A machine with this much memory available, each memopt process this large (a test's small fake limit)."""
    import memopt.analysis.preflight as preflight

    monkeypatch.setattr(preflight, "available_bytes", lambda device: (available_mib * 2**20, "available memory"))
    monkeypatch.setattr(preflight, "interpreter_bytes", lambda: interpreter_mib * 2**20)


@pytest.mark.parametrize("machine,args,says", [
    ((4096, 300), ["--batch-size", "1000", "--world-size", "1000"],
     "1000 rank processes need about 292.97 GiB for their Python interpreters alone"),
    ((1164, 290), ["--batch-size", "4", "--world-size", "4"],
     "each rank's estimated peak is"),  # 4 interpreters fit, with 1 MiB left to each rank
])
def test_ranks_the_machine_cannot_hold_are_refused_before_any_starts(no_rank_may_start, monkeypatch, machine, args,
                                                                     says):
    _machine(monkeypatch, *machine)
    result = invoke(["profile", CONFIGS / "tiny.yaml", *args])
    shown = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert says in shown and "nothing was started" in shown


def test_no_fit_check_starts_the_ranks_all_the_same(monkeypatch):
    import memopt.engine.ranks

    def launch(*_args, **_kwargs):
        raise RuntimeError("the ranks were launched")

    _machine(monkeypatch, 1164, 290)  # 4 interpreters fit, with 1 MiB left to each rank
    monkeypatch.setattr(memopt.engine.ranks, "launch", launch)
    refused = invoke(["profile", CONFIGS / "tiny.yaml", "--world-size", "4"])
    assert refused.exit_code == 1 and "nothing was started" in refused.output, refused.output
    launched = invoke(["profile", CONFIGS / "tiny.yaml", "--world-size", "4", "--no-fit-check"])
    assert "the ranks were launched" in launched.output


def _ranks_of(launcher: psutil.Process, count: int, deadline_s: float = 90) -> list[psutil.Process]:
    started = time.monotonic()
    while time.monotonic() - started < deadline_s:
        found = [p for p in launcher.children(recursive=True) if "memopt.engine.rank_worker" in " ".join(p.cmdline())]
        if len(found) >= count:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{count} ranks did not start in {deadline_s} s")


def _gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGKILL, -9)])
def test_no_rank_outlives_a_signalled_launcher(tmp_path, signum, code):
    out = tmp_path / "out.json"
    out.write_text("before")
    proc = subprocess.Popen([sys.executable, "-m", "memopt.cli", "profile", str(CONFIGS / "tiny-decoder.yaml"),
                             "--world-size", "2", "--steps", "200", "--json-out", str(out)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks: list[psutil.Process] = []
    try:
        ranks = _ranks_of(psutil.Process(proc.pid), 2)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        if signum != signal.SIGKILL:
            assert f"interrupted ({signal.Signals(signum).name}); nothing was written" in err
        time.sleep(5)
        assert all(_gone(rank) for rank in ranks), [r.pid for r in ranks if not _gone(r)]
        assert out.read_text() == "before"
    finally:
        for p in [*ranks, psutil.Process(proc.pid) if proc.poll() is None else None]:
            if p is not None and not _gone(p):
                p.kill()
        proc.wait(timeout=30)


# -- user code cannot fake a result ----------------------------------------------------------------------------------

@pytest.mark.parametrize("factory,says", [
    ("exits0", "model.python: usermod:exits0 called sys.exit(0)"),
    ("hard_exit", "model.python: usermod:hard_exit called os._exit(0)"),
    ("exit_in_forward", "model.python: usermod:exit_in_forward's forward called sys.exit(3)"),
])
def test_user_code_that_exits_is_an_error_naming_it(user_module, factory, says):
    done = memopt(["profile", "--model", f"usermod:{factory}", *SMALL, "--json"], user_module)
    assert done.returncode == 1, done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_a_batch_function_that_exits_is_an_error_naming_it(user_module):
    (user_module / "spec.yaml").write_text("model: {python: 'usermod:tiny', batch: 'usermod:batch_exits'}\n"
                                           "train: {batch_size: 2, seq_len: 8}\n")
    done = memopt(["profile", "spec.yaml"], user_module)
    assert done.returncode == 1 and "model.batch: usermod:batch_exits called sys.exit(0)" in done.stderr


def test_what_user_code_prints_goes_to_stderr_and_the_factory_is_called_once_per_model(user_module):
    done = memopt(["profile", "--model", "usermod:tiny", *SMALL, "--json"], user_module)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["schema"] == 1
    for printed in ("printed at import", "printed in the factory", "printed in forward"):
        assert printed in done.stderr and printed not in done.stdout
    # once on the meta device (parameters, vocabulary), once for the measured model
    assert (user_module / "calls.txt").read_text().count("call") == 2


def test_a_rank_whose_factory_exits_names_the_rank_and_the_entry_point(user_module):
    done = memopt(["profile", "--model", "usermod:exits0", "--batch-size", "2", "--seq-len", "8", "--world-size",
                   "2", "--no-fit-check"], user_module)
    assert done.returncode == 1
    shown = " ".join(done.stderr.split())
    assert "of 2 failed: model.python: usermod:exits0 called sys.exit(0)" in shown and "every rank was stopped" in shown


def test_a_model_without_parameters_is_a_clear_error(user_module, monkeypatch):
    monkeypatch.chdir(user_module)
    (user_module / "spec.yaml").write_text("model: {python: 'usermod:empty', vocab_size: 50}\n"
                                           "train: {batch_size: 2, seq_len: 8}\n")
    result = invoke(["profile", user_module / "spec.yaml"])
    assert result.exit_code == 1, result.output
    assert "model: python usermod:empty has no parameters" in " ".join(result.output.split())


# -- Hugging Face inputs that would hang -----------------------------------------------------------------------------

LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 1000, "max_position_embeddings": 128}


@pytest.mark.parametrize("field,value,says", [
    ("vocab_size", 10**12, "vocab_size: expected a whole number from 1 to 16,777,216, got 1000000000000"),
    ("num_hidden_layers", 0, "num_hidden_layers: expected a whole number from 1 to 1,024, got 0"),
    ("intermediate_size", -176, "intermediate_size: expected a whole number from 1 to 1,048,576, got -176"),
    ("num_key_value_heads", 3, "num_key_value_heads: 3 does not divide num_attention_heads 4"),
])
def test_hf_size_fields_are_checked_before_anything_runs(tmp_path, field, value, says):
    pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, field: value}))
    started = time.monotonic()
    done = memopt(["profile", "--hf", str(tmp_path / "config.json"), *SMALL], tmp_path, timeout=120)
    assert done.returncode == 1 and says in done.stderr, done.stderr
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("command", ["estimate", "profile"])
def test_a_fifo_in_a_checkpoint_folder_is_refused_not_read(tmp_path, command):
    pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    os.mkfifo(tmp_path / "model.safetensors")
    done = memopt([command, "--hf", str(tmp_path), *SMALL], tmp_path, timeout=60)
    assert done.returncode == 1
    assert f"{tmp_path / 'model.safetensors'}: is a FIFO, expected a checkpoint file" in done.stderr


def test_estimating_offloaded_states_of_a_huge_model_is_quick(tmp_path):
    """offload_states steps AdamW a chunk at a time; an estimate traces the first and the last chunk (the others
    repeat the first), so an embedding of billions of parameters traces in seconds, reporting every chunk's bytes."""
    (tmp_path / "spec.yaml").write_text("model: {arch: decoder, d_model: 1024, n_heads: 8, n_layers: 1, "
                                        "vocab_size: 16777216, max_seq_len: 64}\ntrain: {batch_size: 1, seq_len: 8}\n")
    started = time.monotonic()
    result = invoke(["estimate", tmp_path / "spec.yaml", "-s", "offload_states", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)["runs"][0]["strategy_facts"]["offload_states"]
    assert time.monotonic() - started < 60
    params = 2 * 16777216 * 1024  # the embedding and the head dominate
    assert facts["moved_off_device_bytes"] >= 2 * 4 * params  # both AdamW moments of every parameter left


# -- a write killed mid-way ------------------------------------------------------------------------------------------

def test_a_temporary_file_left_by_a_killed_write_is_removed_by_the_next(tmp_path):
    dead = tmp_path / ".out.json.999999999.0123abcd.tmp"   # no process has this pid
    alive = tmp_path / f".out.json.{os.getpid()}.0123abcd.tmp"  # a write still under way
    other = tmp_path / ".other.json.999999999.0123abcd.tmp"
    for path in (dead, alive, other):
        path.write_text("half")
    write_output(tmp_path / "out.json", "{}")
    assert not dead.exists() and alive.exists() and other.exists()
    assert (tmp_path / "out.json").read_text() == "{}"


def test_a_killed_write_leaves_a_temporary_file_that_the_next_write_removes(tmp_path):
    """kill -9 mid-write, for real: a child writes 200 MiB and is killed while it does."""
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        from memopt.core.files import write_output
        write_output({str(tmp_path / 'out.bin')!r}, b"x" * (200 * 2**20))
    """)
    child = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.bin.*.tmp")) and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.005)
    child.kill()
    child.wait()
    left = list(tmp_path.glob(".out.bin.*.tmp"))
    if not left:
        pytest.skip("the write finished before it could be killed")
    write_output(tmp_path / "out.bin", b"new")
    assert list(tmp_path.glob(".out.bin.*.tmp")) == [] and (tmp_path / "out.bin").read_bytes() == b"new"


def test_the_preflight_covers_hf_and_python_models(user_module, monkeypatch, tmp_path):
    """A run larger than the machine is refused before anything is allocated, whatever kind of model it is."""
    import memopt.analysis.preflight as preflight

    monkeypatch.setattr(preflight, "available_bytes", lambda device: (2**14, "available memory (a test's)"))
    monkeypatch.chdir(user_module)
    refused = invoke(["profile", "--model", "usermod:tiny", *SMALL])
    assert refused.exit_code == 1 and "estimated peak" in refused.output and "nothing was run" in refused.output
    if __import__("importlib").util.find_spec("transformers") is not None:
        (tmp_path / "config.json").write_text(json.dumps(LLAMA))
        refused = invoke(["profile", "--hf", tmp_path / "config.json", *SMALL])
        assert refused.exit_code == 1 and "estimated peak" in refused.output, refused.output
