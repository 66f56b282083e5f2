"""memopt's processes: what a child said and why it ended (the isolated runs and the rank launcher), a child that
dies with its parent, and stdout kept for memopt's own output."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_ENV = "MEMOPT_PARENT_PID"


def die_with_parent() -> None:
    """In a child memopt started: be killed when the parent dies, however it dies (SIGKILL included), so that no
    child outlives it. Linux's parent-death signal; a parent already gone ends the child at once."""
    parent = int(os.environ.get(PARENT_ENV, "0") or 0)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if parent and os.getppid() != parent:  # the parent died before the signal was set up
        os._exit(1)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child memopt starts: this one, unbuffered, naming this process as its parent."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid()), **extra}


@contextlib.contextmanager
def user_output_to_stderr() -> Iterator[None]:
    """While the block runs, what anyone prints on stdout (user code: a factory, a forward, an import; Python or C)
    goes to stderr: memopt's stdout holds only its own output (``--json`` stays parseable)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved_fd: int | None = os.dup(1) if sys.stdout.fileno() == 1 else None
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is both of the first two
        saved_fd = None  # a replaced stream without a descriptor (a test runner's capture): Python's level only
    saved = sys.stdout
    if saved_fd is not None:
        os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        sys.stdout = saved
        if saved_fd is not None:
            os.dup2(saved_fd, 1)
            os.close(saved_fd)



def last_reply(stdout: str) -> dict[str, Any] | None:
    """The last JSON object a child printed on its own line, or None."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def exit_reason(returncode: int, stderr: str) -> str:
    """Why a child that printed no reply ended: the signal that killed it, or its exit code and last line."""
    if returncode < 0:
        sig = signal.Signals(-returncode).name
        return "killed by the OS, probably out of memory" if sig == "SIGKILL" else f"died with {sig}"
    tail = (stderr.strip().splitlines() or ["no output"])[-1]
    return f"exited with {returncode}: {tail}"
