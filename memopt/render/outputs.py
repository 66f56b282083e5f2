"""A command's output files: checked before the run, rendered after it, written only when it succeeded."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from memopt.core.errors import MemoptError


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
        from memopt.core.files import refuse_overwriting_inputs

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
        from memopt.core.files import write_output

        for path, data in self.pending:
            write_output(path, data)
        self.pending.clear()

    def print_json(self) -> None:
        if self.document is not None:
            print(json_text(self.document), end="")
