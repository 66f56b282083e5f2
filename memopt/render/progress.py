"""Progress as plain lines, for a stderr that is not a terminal (CI logs, ``2> log``): a line when the stage changes,
and on long work at most one every ``every_s`` seconds, each with the time since the command started. Nothing in the
first ``quiet_s`` seconds: a quick command (or a quick error) prints only its own output."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

_NUMBERS = re.compile(r"\d+(\.\d+)?")


class PlainProgress:
    """Feed it every progress message; it prints the ones a log reader needs through ``write``."""

    def __init__(self, write: Callable[[str], None], every_s: float = 10.0, quiet_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self.write, self.every_s, self.quiet_s, self.clock = write, every_s, quiet_s, clock
        self.started = clock()
        self.stage: str | None = None
        self.last = -every_s

    def update(self, message: str) -> None:
        """Print ``message`` when its stage (the message with its numbers left out) is new, or ``every_s`` passed
        since the last line."""
        now = self.clock()
        stage = _NUMBERS.sub("#", message)
        if now - self.started < self.quiet_s or (stage == self.stage and now - self.last < self.every_s):
            return
        self.stage, self.last = stage, now
        self.write(f"[{now - self.started:5.0f} s] {message}")
