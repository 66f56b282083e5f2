"""memopt.files: outputs written safely (devices, symlinks, modes, failures), inputs bounded (FIFOs, devices,
sizes, encodings), outputs never overwriting inputs; and the YAML reader's bounds (alias bombs, nesting)."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memopt.core import files
from memopt.core.errors import MemoptError, SpecError
from memopt.core.files import read_input, refuse_overwriting_inputs, write_output
from memopt.render.outputs import json_text
from memopt.spec import load_spec, read_yaml

from .helpers import CONFIGS, ROOT, invoke


def _char_device(tmp_path: Path) -> Path | None:
    """A /dev/null of our own (same device numbers), where mknod is allowed and the mount opens devices."""
    clone = tmp_path / "null"
    try:
        os.mknod(clone, stat.S_IFCHR | 0o666, os.stat("/dev/null").st_rdev)
        with open(clone, "wb") as fh:
            fh.write(b"")
    except OSError:
        clone.unlink(missing_ok=True)
        return None
    return clone


def _real_devices_are_safe(tmp_path: Path) -> None:
    """Before a test writes to /dev/null, /dev/full or /dev/stdout: as root a regression would replace them
    with regular files (today's main did), so the same writes go to a clone and a symlink to it first."""
    if not os.access("/dev", os.W_OK):
        return  # a rename into /dev would fail: nothing there can be replaced
    guard = tmp_path / "guard"
    guard.mkdir()
    clone = _char_device(guard)
    if clone is None:
        pytest.skip("root without mknod: not risking the real /dev entries")
    link = clone.parent / "link"
    link.symlink_to(clone)
    write_output(clone, "x")
    write_output(link, "x")
    assert stat.S_ISCHR(os.lstat(clone).st_mode) and link.is_symlink(), "would replace /dev entries"


# ---- write_output ---------------------------------------------------------------------------------------


def test_a_character_device_is_written_in_place_not_replaced(tmp_path):
    clone = _char_device(tmp_path)
    if clone is not None:
        write_output(clone, "discarded\n")
        write_output(clone, json_text({"a": 1}))
        assert stat.S_ISCHR(os.lstat(clone).st_mode)
        assert [p.name for p in tmp_path.iterdir()] == ["null"]  # no temp file beside it
    _real_devices_are_safe(tmp_path)
    write_output("/dev/null", "discarded\n")
    write_output("/dev/null", json_text({"a": 1}))
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)


def test_dev_full_is_one_clear_error(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    _real_devices_are_safe(tmp_path)
    with pytest.raises(MemoptError, match=r"^cannot write /dev/full: No space left on device$"):
        write_output("/dev/full", "x" * 100)
    assert stat.S_ISCHR(os.lstat("/dev/full").st_mode)


def test_dev_stdout_writes_to_this_process_stdout(tmp_path):
    _real_devices_are_safe(tmp_path)
    out = tmp_path / "out.txt"
    code = ("from memopt.core.files import write_output; print('before', flush=True); "
            "write_output('/dev/stdout', 'JSON\\n'); print('after')")
    with out.open("wb") as fh:  # stdout redirected to a regular file: written at its place, not truncated
        subprocess.run([sys.executable, "-c", code], stdout=fh, check=True, timeout=60)
    assert out.read_text() == "before\nJSON\nafter\n"
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert piped.stdout == "before\nJSON\nafter\n"
    assert os.path.islink("/dev/stdout") or not os.path.isfile("/dev/stdout")


def test_a_fifo_is_written_in_place(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = subprocess.Popen([sys.executable, "-c", f"print(open({str(fifo)!r}).read(), end='')"],
                              stdout=subprocess.PIPE, text=True)
    write_output(fifo, "through the pipe\n")
    assert reader.communicate(timeout=30)[0] == "through the pipe\n"
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_symlink_stays_a_link_and_its_target_changes(tmp_path):
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(Path("data") / "real.json")
    write_output(link, "new")
    assert link.is_symlink() and os.readlink(link) == os.path.join("data", "real.json")
    assert target.read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["real.json"]


def test_a_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "link.md"
    link.symlink_to(tmp_path / "made" / "later.md")
    write_output(link, "text")
    assert link.is_symlink() and (tmp_path / "made" / "later.md").read_text() == "text"


def test_an_existing_file_keeps_its_mode_a_new_one_follows_the_umask(tmp_path):
    private = tmp_path / "private.json"
    private.write_text("old")
    private.chmod(0o600)
    write_output(private, "new")
    assert private.read_text() == "new" and stat.S_IMODE(private.stat().st_mode) == 0o600
    old = os.umask(0o027)
    try:
        write_output(tmp_path / "sub" / "fresh.json", "x")  # the missing folder is created
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "sub" / "fresh.json").stat().st_mode) == 0o640


def test_errors_name_the_path_and_leave_nothing(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(MemoptError, match=r"^cannot write .*afile/out.json: Not a directory$"):
        write_output(tmp_path / "afile" / "out.json", "x")
    with pytest.raises(MemoptError, match=r"^cannot write .*: is a directory$"):
        write_output(tmp_path, "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["ENOSPC", "KeyboardInterrupt"])
def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch, failure):
    path = tmp_path / "result.json"
    path.write_text("old")

    def fail(fd: int) -> None:
        raise failure

    monkeypatch.setattr(files.os, "fsync", fail)
    expected = MemoptError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as err:
        write_output(path, "new")
    if expected is MemoptError:
        assert str(err.value) == f"cannot write {path}: No space left on device"
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


# ---- refuse_overwriting_inputs ---------------------------------------------------------------------------


def test_an_output_that_is_an_input_is_refused(tmp_path, monkeypatch):
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: {}\n")
    (tmp_path / "alias.yaml").symlink_to(spec)
    monkeypatch.chdir(tmp_path)
    for same in (spec, "spec.yaml", "./spec.yaml", tmp_path / "x" / ".." / "spec.yaml", "alias.yaml"):
        with pytest.raises(MemoptError, match=r"^--markdown: .* is the input spec; refusing to overwrite it$"):
            refuse_overwriting_inputs({"--json-out": None, "--markdown": same}, {"spec": spec, "baseline": None})
    baseline = tmp_path / "b.json"
    baseline.write_text("{}")
    with pytest.raises(MemoptError, match="is the input baseline"):
        refuse_overwriting_inputs({"--json-out": "b.json"}, {"spec": "gpt2", "baseline": baseline})


def test_two_outputs_naming_one_file_are_refused(tmp_path):
    with pytest.raises(MemoptError, match=r"--json-out and --markdown both name"):
        refuse_overwriting_inputs({"--json-out": tmp_path / "r.txt", "--markdown": tmp_path / "." / "r.txt"}, {})
    (tmp_path / "r.txt").write_text("")
    (tmp_path / "l.txt").symlink_to(tmp_path / "r.txt")
    with pytest.raises(MemoptError, match=r"--timeline and --plot both name"):
        refuse_overwriting_inputs({"--timeline": tmp_path / "r.txt", "--plot": tmp_path / "l.txt"}, {})


def test_what_is_not_a_clash(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: {}\n")
    refuse_overwriting_inputs(
        {"--json-out": "-", "--markdown": "-", "--output": "/dev/null", "--plot": "/dev/null", "--timeline": None},
        {"spec": spec, "baseline": "-"})
    refuse_overwriting_inputs({"--json-out": tmp_path / "a.json", "--markdown": tmp_path / "a.md"},
                              {"spec": "gpt2", "baseline": tmp_path / "missing.json"})


# ---- read_input and the spec loader ---------------------------------------------------------------------


def test_read_input_refuses_what_is_not_a_small_utf8_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(MemoptError, match=r"fifo: is a FIFO, expected a spec file"):
        read_input(fifo, "spec", 2**20)
    with pytest.raises(MemoptError, match=r"/dev/zero: is a character device, expected a spec file"):
        read_input("/dev/zero", "spec", 2**20)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (2**20 + 1))
    with pytest.raises(MemoptError, match=r"big.yaml: 1.00 MiB is larger than the 1 MiB a spec may be"):
        read_input(big, "spec", 2**20)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"model: caf\xe9\n")
    with pytest.raises(MemoptError, match=r"latin.yaml: not UTF-8 text \(byte 0xe9 at offset 10\)"):
        read_input(latin, "spec", 2**20)
    (tmp_path / "link.yaml").symlink_to(latin.name)
    latin.write_text("model: café\n")
    assert read_input(tmp_path / "link.yaml", "spec", 2**20) == "model: café\n"


def _profile(spec: Path | str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``memopt profile SPEC`` in its own process (a hang is a failure, not a stuck test run)."""
    return subprocess.run([sys.executable, "-c", "from memopt.cli import main; main()", "profile", str(spec)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)


def test_a_fifo_as_the_spec_is_refused_at_once(tmp_path):
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    result = _profile(fifo, timeout=20)  # today: blocks forever waiting for a writer
    assert result.returncode == 1, result.stderr
    assert "is a FIFO, expected a spec file" in result.stderr and "Traceback" not in result.stderr


def test_dev_zero_as_the_spec_is_a_clear_error():
    result = invoke(["profile", "/dev/zero"])  # today: reads until MemoryError
    assert result.exit_code == 1, result.output
    assert "/dev/zero: is a character device, expected a spec file" in result.output
    assert "Traceback" not in result.output


def test_a_2_mib_spec_is_refused_without_parsing_it(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text((CONFIGS / "tiny.yaml").read_text() + "# padding\n" * (2 * 2**20 // 10))
    start = time.monotonic()
    with pytest.raises(SpecError, match=r"big.yaml: 2.00 MiB is larger than the 1 MiB a spec may be"):
        load_spec(big)
    assert time.monotonic() - start < 1


def _alias_bomb(levels: int = 9) -> str:
    lines = ['lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nmodel: {{d_model: *lol{levels - 1}}}\n"


def test_an_alias_bomb_is_refused_fast(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(_alias_bomb())
    result = _profile(spec, timeout=30)  # today: minutes (validation walks ~10**9 shared nodes)
    assert result.returncode == 1, result.stderr
    assert "spec.yaml: invalid YAML: too many aliases" in result.stderr and "Traceback" not in result.stderr
    start = time.monotonic()
    with pytest.raises(SpecError, match=r"^spec: invalid YAML: too many aliases \(.*\)$"):
        read_yaml(_alias_bomb())
    assert time.monotonic() - start < 5


def test_ordinary_anchors_and_aliases_still_work():
    text = ("defaults: &ckpt {policy: every, every: 2}\n"
            "strategies:\n  - ckpt: *ckpt\n  - chunked_ce\n"
            "model: &m {d_model: 64, n_heads: 4}\ncopy: *m\nrecursive: &r [*r]\n")
    data = read_yaml(text)
    assert data["strategies"][0] == {"ckpt": {"policy": "every", "every": 2}} and data["copy"] == data["model"]
    assert data["recursive"][0] is data["recursive"]
    merged = read_yaml("base: &b {d_model: 64, n_heads: 4}\nmodel:\n  <<: *b\n  n_heads: 8\n")
    assert merged["model"] == {"d_model": 64, "n_heads": 8}  # merge keys work (they did not on main either)
    with pytest.raises(SpecError, match="duplicate key 'n_heads'"):
        read_yaml("model:\n  <<: {d_model: 64}\n  n_heads: 8\n  n_heads: 4\n")
    wide = "base: &b [" + ", ".join(["1"] * 1000) + "]\n" + "\n".join(f"k{i}: *b" for i in range(50)) + "\n"
    assert len(read_yaml(wide)["k49"]) == 1000  # 50,000 nodes added: under the bound


@pytest.mark.parametrize("text", ["[" * 100_000, "{a: " * 100_000, "a:\n" + "".join(" " * i + "- \n" for i in
                                                                                        range(1, 3000))],
                         ids=["sequence", "mapping", "block"])
def test_deep_nesting_is_a_clear_error(text):
    with pytest.raises(SpecError, match=r"^spec: invalid YAML: nested too deeply$"):
        read_yaml(text)


def test_deep_nesting_through_the_cli(tmp_path):
    spec = tmp_path / "deep.yaml"
    spec.write_text("model: " + "{a: " * 100_000)
    result = invoke(["profile", spec])
    assert result.exit_code == 1 and "deep.yaml: invalid YAML: nested too deeply" in result.output
    assert "Traceback" not in result.output


def test_json_written_through_a_symlink_is_read_back(tmp_path):
    (tmp_path / "real.json").write_text("{}")
    (tmp_path / "out.json").symlink_to("real.json")
    write_output(tmp_path / "out.json", json_text({"schema": 1}))
    assert json.loads((tmp_path / "real.json").read_text()) == {"schema": 1}
