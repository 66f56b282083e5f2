"""Every file memopt reads or writes goes through here: outputs safely, inputs bounded.

- ``write_output``: regular files are replaced atomically (readers never see half a file) keeping their
  mode and owner; symlinks are followed; devices, FIFOs and ``/dev/stdout`` are written in place.
- ``read_input``: only regular files, checked before opening, up to a size limit, as UTF-8 text.
- ``refuse_overwriting_inputs``: an output may not be an input, nor another output.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import stat
import sys
from pathlib import Path

from memopt.core.errors import MemoptError
from memopt.core.units import format_bytes

# /dev/stdout, /dev/fd/1, /proc/self/fd/1: the process's own descriptor, written as it is (never reopened,
# which would truncate a redirected file and write at an offset of its own).
_OWN_FD = re.compile(r"/dev/(stdout|stderr)|/dev/fd/(\d+)|/proc/self/fd/(\d+)")


def _kind(mode: int) -> str:
    """'a directory', 'a FIFO', ... for messages."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _error(path: str | Path, exc: OSError) -> MemoptError:
    return MemoptError(f"cannot write {path}: {exc.strerror or exc}")


def write_output(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` (str as UTF-8) to ``path``; any failure is one MemoptError naming the path.

    A regular file (new or existing, also behind a symlink) is written to a temporary file beside it and
    renamed over it: never half-written, the link stays a link, an existing file keeps its mode (and owner
    where allowed), a new one gets 0666 & ~umask; a missing parent folder is created. Anything else that
    exists (a character device such as /dev/null, a FIFO, /dev/stdout) is opened and written directly.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        info: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        info = None  # a new file (or a dangling symlink: its target is created)
    except OSError as exc:
        raise _error(path, exc) from None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise MemoptError(f"cannot write {path}: is a directory")
    own = _OWN_FD.fullmatch(os.path.abspath(path))
    if own:
        _write_fd(path, {"stdout": 1, "stderr": 2}.get(own.group(1) or "", int(own.group(2) or own.group(3) or 0)),
                  raw)
    elif info is not None and not stat.S_ISREG(info.st_mode):
        _write_special(path, raw)
    else:
        _write_atomic(Path(os.path.realpath(path)), raw, info, shown=path)


def _write_fd(path: str | Path, fd: int, raw: bytes) -> None:
    """Write to one of this process's open descriptors (what /dev/stdout means), after Python's buffers."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None and stream.fileno() == fd:
                stream.flush()
        except (OSError, ValueError, AttributeError):
            pass  # a replaced stream without a descriptor (a test runner's capture)
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        raise _error(path, exc) from None


def _write_special(path: str | Path, raw: bytes) -> None:
    """Open and write a device or FIFO in place (a FIFO waits for its reader, as a shell redirection does)."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        raise _error(path, exc) from None
    try:
        _write_fd(path, fd, raw)
    finally:
        os.close(fd)


def _write_atomic(target: Path, raw: bytes, info: os.stat_result | None, shown: str | Path) -> None:
    """Temporary file beside ``target``, same mode/owner as the file it replaces, fsync, rename."""
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(target)
        for _ in range(100):
            name = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:  # 0o666 & ~umask, applied by the kernel
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except FileExistsError:
                continue
            tmp = name
            break
        else:
            raise FileExistsError(f"no free temporary name beside {target}")
        try:
            if info is not None:
                os.fchmod(fd, stat.S_IMODE(info.st_mode))
                if (info.st_uid, info.st_gid) != (os.geteuid(), os.getegid()):
                    try:
                        os.fchown(fd, info.st_uid, info.st_gid)
                    except PermissionError:
                        pass  # only root may give a file away; the mode is kept all the same
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise _error(shown, exc) from None
    finally:
        if tmp is not None:  # failed or interrupted (KeyboardInterrupt too): leave nothing behind
            tmp.unlink(missing_ok=True)


def _remove_stale_temporaries(target: Path) -> None:
    """Remove the temporary files beside ``target`` that a write killed mid-way left (``kill -9`` gives it no
    chance to clean up): those whose writing process, named in the file name, is gone."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"(\d+)\.[0-9a-f]{8}\.tmp")
    for sibling in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        found = pattern.fullmatch(sibling.name)
        if found and not _alive(int(found.group(1))):
            sibling.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or not a pid at all): leave its file alone
    return True


def read_input(path: str | Path, what: str, limit_bytes: int) -> str:
    """The text of a user's input file (a ``what``: "spec", "baseline"), refusing anything that could hang
    or flood memory: checked with stat before opening (a FIFO or /dev/zero is never read), opened without
    blocking, read up to ``limit_bytes``, decoded as UTF-8. Problems are one MemoptError naming the path."""
    raw = read_input_bytes(path, what, limit_bytes)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MemoptError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None


def read_input_bytes(path: str | Path, what: str, limit_bytes: int) -> bytes:
    """The bytes of a user's input file, checked as ``read_input`` checks it."""
    def too_large(size: int) -> MemoptError:
        return MemoptError(f"{path}: {format_bytes(size)} is larger than the {_size(limit_bytes)} a {what} may be")

    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise MemoptError(f"{path}: is {_kind(info.st_mode)}, expected a {what} file")
        if info.st_size > limit_bytes:
            raise too_large(info.st_size)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):  # swapped since the stat
                raise MemoptError(f"{path}: is not a regular file, expected a {what} file")
            raw = fh.read(limit_bytes + 1)
    except OSError as exc:
        raise MemoptError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > limit_bytes:  # grew since the stat
        raise too_large(len(raw))
    return raw


def ensure_regular(path: str | Path, what: str) -> None:
    """MemoptError unless ``path`` is a regular file (a FIFO would hang whoever opens it, a device flood them):
    for files that a library opens for memopt (a checkpoint's weights and tokenizer)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise MemoptError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise MemoptError(f"{path}: is {_kind(info.st_mode)}, expected a {what} file")


def _size(n: int) -> str:
    """'1 MiB' for the round limits, format_bytes otherwise."""
    return f"{n // 2**20} MiB" if n % 2**20 == 0 else format_bytes(n)


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Same file by device and inode when both exist; else the same path once symlinks are resolved."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _is_regular_or_new(path: str | Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True
    except OSError:
        return False  # unreachable or odd: write_output will say what is wrong


def refuse_overwriting_inputs(outputs: dict[str, str | Path | None], inputs: dict[str, str | Path | None]) -> None:
    """Refuse an output (``{"--markdown": path}``) that is an input (``{"spec": path}``) or another output.

    ``None`` and ``-`` (stdout) never clash; neither do outputs that exist and are not regular files
    (/dev/null, /dev/stdout, a FIFO): writing them twice is what the user asked for. An input that does not
    exist (a preset name) cannot be overwritten. Symlinks count as the file they point to.
    """
    files = {opt: p for opt, p in outputs.items() if p is not None and str(p) != "-" and _is_regular_or_new(p)}
    for option, out in files.items():
        for what, source in inputs.items():
            if source is not None and str(source) != "-" and os.path.exists(source) and _same_file(out, source):
                raise MemoptError(f"{option}: {out} is the input {what}; refusing to overwrite it")
    names = list(files)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            if _same_file(files[first], files[second]):
                raise MemoptError(f"{first} and {second} both name {files[second]}; give each its own file")
