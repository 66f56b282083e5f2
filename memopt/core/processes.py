"""What a child process of memopt's said and why it ended: shared by the isolated runs and the rank launcher."""

from __future__ import annotations

import json
import signal
from typing import Any


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
