"""``memopt run train.py [ARGS...]`` (or ``-m pkg.module``): the user's script, unchanged, in this process under the
tracker. Models and optimizers are found through PyTorch's global hooks (memopt.measure.discover); a step is what
lies between two steps of the first optimizer that steps; the first step is the warm-up (it creates the optimizer
state) and the report is of the steps after it, each step's peak listed.

Exit codes: the script's own (``sys.exit(3)`` is 3, an exception it raised is 1, after its traceback on stderr), 0
when ``--steps N`` ended it after N measured steps; memopt's own errors (no such script, bad options) are 1 and a
stop signal 130/143/129, as for every command.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from memopt.app.track import StopTracking, Tracking
from memopt.core.errors import MemoptError
from memopt.engine.devices import resolve_device
from memopt.render import documents, tables
from memopt.render.exports import Exports
from memopt.render.outputs import CommandOutput, Outputs, strict


@dataclass
class ScriptRun:
    """How the script ended: its exit code and, when it failed, why (one line)."""

    exit_code: int = 0
    failure: str | None = None
    stopped: bool = False  # --steps N reached


def run_script(target: str, args: list[str], ui: object, *, module: bool = False, steps: int | None = None,
               device: str = "auto", json_out: str | None = None, exports: Exports | None = None) -> CommandOutput:
    """Run the script under the tracker; the report of what it did (also when it failed)."""
    if steps is not None and steps < 1:
        raise MemoptError(f"--steps: expected a number of measured steps >= 1, got {steps}")
    exports = exports or Exports()
    exports.check()
    path = None if module else _script(target)
    if module:
        _checked_module(target)
    outputs = Outputs({"script": str(path) if path else None}, json_out=json_out, **exports.paths())
    # no tracemalloc: over a whole script (its imports, its model build) it would slow it down by half
    tracking = Tracking(warmup_steps=1, stop_after=steps, device=resolve_device(device), label="memopt run",
                        python_heap=False, timeline=exports.wanted, stacks=exports.stacks)
    ended = ScriptRun()
    with tracking:
        ended = _run(target, path, args, module)
    out = _report(tracking, outputs, target, exports)
    if ended.failure is not None:
        out.warnings.append(f"the script failed ({ended.failure}): the report is of what ran before it did")
    if tracking.steps == 0:
        out.warnings.append("no optimizer step was seen: the numbers are of the whole script, not of a training "
                            "step (memopt run measures between the steps of a torch.optim optimizer)")
    elif tracking.steps == 1:
        out.warnings.append("one optimizer step was seen, the warm-up: the numbers include creating the optimizer "
                            "state (run at least 2 steps for a steady-state one)")
    out.exit_code = ended.exit_code
    return out


def _script(target: str) -> Path:
    """The script's path, checked: a readable regular file (a folder, a FIFO or a missing file is an error)."""
    path = Path(target)
    if not path.exists():
        raise MemoptError(f"{target}: no such file (for a module, memopt run -m pkg.module)")
    if not path.is_file():
        raise MemoptError(f"{target}: is not a regular file, expected a Python script")
    if not os.access(path, os.R_OK):
        raise MemoptError(f"{target}: cannot be read (permission denied)")
    return path


def _checked_module(target: str) -> None:
    """The module must be importable from here (as ``python -m`` finds it: the working directory first); no path."""
    sys.path.insert(0, os.getcwd())
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError) as exc:
        raise MemoptError(f"-m {target}: no such module ({exc})") from None
    finally:
        sys.path.pop(0)
    if found is None:
        raise MemoptError(f"-m {target}: no such module")


@contextmanager
def _as_main(argv0: str, args: list[str], folder: str | None) -> Iterator[None]:
    """sys.argv and sys.path[0] as ``python SCRIPT ARGS`` sets them, restored afterwards."""
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [argv0, *args]
    if folder is not None:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.argv[:], sys.path[:] = saved_argv, saved_path


def _run(target: str, path: Path | None, args: list[str], module: bool) -> ScriptRun:
    """Run the script as ``__main__``; how it ended (its exception's traceback printed on stderr, as Python does)."""
    argv0 = target if module else str(path)
    folder = os.getcwd() if module else str(Path(argv0).resolve().parent)
    try:
        with _as_main(argv0, args, folder):
            if module:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(argv0, run_name="__main__")
    except StopTracking:
        return ScriptRun(stopped=True)
    except SystemExit as stop:
        code = stop.code
        if code is None or code == 0:
            return ScriptRun()
        if isinstance(code, int):
            return ScriptRun(code, f"it exited with {code}")
        print(code, file=sys.stderr)  # sys.exit("message"): Python prints it and exits 1
        return ScriptRun(1, f"it exited: {code}")
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        traceback.print_exc()
        return ScriptRun(1, f"{type(exc).__name__}: {exc}")
    return ScriptRun()


def _report(tracking: Tracking, outputs: Outputs, target: str, exports: Exports) -> CommandOutput:
    result = tracking.result
    spec = {**tracking.spec(), "script": target}
    outputs.set_json(strict(documents.runs_document(spec, [result], result.device)))
    title = f"memopt run {target} - " + tracking.title().removeprefix("memopt run - ")
    if exports.wanted:
        exports.add(outputs, [result], title)

    def show() -> None:
        tables.print_tables(tables.profile_tables(None, result, title=title, warmed_up=tracking.steps > 1))
    return CommandOutput(outputs, show)
