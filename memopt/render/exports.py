"""The step's event-level files a command can write beside its JSON: ``--html`` (the interactive report),
``--snapshot`` (PyTorch's memory_viz format) and ``--trace`` (Chrome/Perfetto). Checked before a run, rendered
after it."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

from memopt.core.errors import MemoptError
from memopt.core.results import RunResult
from memopt.render.chrome_trace import chrome_trace
from memopt.render.outputs import Outputs
from memopt.render.report_html import run_report
from memopt.render.snapshot import to_snapshot

SUFFIXES = {"--html": (".html", ".htm"), "--snapshot": (".pickle", ".pkl"), "--trace": (".json",)}


@dataclass
class Exports:
    """Which of the files were asked for; ``stacks``: record each allocation's Python stack for them."""

    html: str | None = None
    snapshot: str | None = None
    trace: str | None = None
    stacks: bool = False

    def paths(self) -> dict[str, str | None]:
        return {"html": self.html, "snapshot": self.snapshot, "trace": self.trace}

    @property
    def wanted(self) -> bool:
        return any(self.paths().values())

    def check(self, single_run: bool = True) -> None:
        """Refuse what cannot be written, before anything runs: a file name whose suffix names another format,
        ``--stacks`` with nothing to put them in, a snapshot or trace of several runs."""
        for option, path in self.paths().items():
            flag = "--" + option
            if path is not None and Path(path).suffix.lower() not in SUFFIXES[flag]:
                raise MemoptError(f"{flag} {path}: use a {' or '.join(SUFFIXES[flag])} file name")
            if path is not None and flag != "--html" and not single_run:
                raise MemoptError(f"{flag}: one run's file; compare writes --html (all runs on one scale), or "
                                  f"profile a set alone with {flag}")
        if self.stacks and not (self.html or self.snapshot):
            raise MemoptError("--stacks: the stacks go into --html or --snapshot; name one of them")

    def add(self, outputs: Outputs, runs: list[RunResult], title: str) -> None:
        """Render the asked-for files of these runs into ``outputs``."""
        recorded = [r for r in runs if r.ok and r.memory is not None and r.memory.timeline is not None]
        if not recorded:
            raise MemoptError("no run recorded its events, so there is nothing to draw")
        if self.html is not None:
            outputs.add("--html", run_report(runs, title, stacks=self.stacks))
        trace = recorded[0].memory.timeline  # type: ignore[union-attr]
        assert trace is not None
        if self.snapshot is not None:
            outputs.add("--snapshot", pickle.dumps(to_snapshot(trace)))
        if self.trace is not None:
            outputs.add("--trace", json.dumps(chrome_trace(trace, title), separators=(",", ":")))
