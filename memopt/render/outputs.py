"""A command's output files: checked before the run, rendered after it, written only when it succeeded."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memopt.core.errors import MemoptError
from memopt.core.files import refuse_overwriting_inputs, write_output


def strict(data: Any) -> Any:
    """The data with NaN and infinities as None: strict JSON, which every parser reads."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: strict(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict(v) for v in data]
    return data


def json_text(data: Any) -> str:
    return json.dumps(strict(data), indent=2, allow_nan=False) + "\n"


class Outputs:
    """The files one command writes, by option (``--json-out``, ``--markdown``, ...).

    Created before the run: an output that is an input (the spec, a baseline) or another output is refused
    there. ``add`` renders content; ``write`` writes every rendered file (each atomically) at the end.
    """

    def __init__(self, inputs: dict[str, str | Path | None], **paths: str | None):
        self.paths: dict[str, str | Path | None] = {"--" + option.replace("_", "-"): path
                                                     for option, path in paths.items()}
        refuse_overwriting_inputs(self.paths, inputs)
        self.pending: list[tuple[str | Path, str | bytes]] = []
        self.document: dict[str, Any] | None = None

    def wants(self, option: str) -> bool:
        return self.paths.get(option) is not None

    def add(self, option: str, data: str | bytes) -> None:
        path = self.paths.get(option)
        if path is None:
            raise MemoptError(f"{option}: no file was given")
        self.pending.append((path, data))

    def set_json(self, document: dict[str, Any], also: str | None = None) -> None:
        """The command's JSON document: for ``--json`` (stdout), ``--json-out FILE`` and the option ``also``
        (``check --update``'s ``--baseline``)."""
        self.document = document
        for option in ("--json-out", also):
            if option is not None and self.wants(option):
                self.add(option, json_text(document))

    def write(self) -> None:
        for path, data in self.pending:
            write_output(path, data)
        self.pending.clear()

    def print_json(self) -> None:
        if self.document is not None:
            print(json_text(self.document), end="")


@dataclass
class CommandOutput:
    """What a command produced, for the command line to render: its files and JSON document (``files``), the
    tables it shows on stdout (``show``), warnings for stderr, and how it ends."""

    files: Outputs
    show: Callable[[], None] = lambda: None
    warnings: list[str] = field(default_factory=list)
    exit_code: int = 0        # memopt check: 3 when it found a regression
    error: str | None = None  # failed after its tables were made (compare: the baseline failed); nothing is written
    silent: bool = False      # nothing to show or write (a torchrun rank other than 0)
