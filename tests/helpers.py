"""Shared test helpers: the repository's paths, the CLI in-process, and independent references.

The pytest fixtures live in conftest.py; test modules import these with ``from .helpers import ...``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from memopt.app.profile import profile
from memopt.cli import app
from memopt.core.results import RunResult
from memopt.engine.run import run as engine_run
from memopt.spec import Spec

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def invoke(args: list[str]):
    """Run the CLI in-process the way the console script does."""
    return CliRunner().invoke(app, [str(a) for a in args])


def run(spec: Spec, name: str = "baseline", *, fake: bool = False, **options: Any) -> RunResult:
    """A spec's run as the command line makes it: profiled (preflight, drift, the run) or, ``fake``, estimated."""
    if fake:
        return engine_run(spec, name, fake=True, **options)
    return profile(spec, name, **options)


def memtracker_peak(spec: Spec) -> int:
    """PyTorch's own MemTracker peak for one steady-state step of ``spec`` (an independent reference)."""
    import torch

    from memopt.engine.step import prepare, train_step

    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    session = prepare(spec)
    train_step(session)  # warm-up: optimizer state exists from here on
    reference = mem_tracker.MemTracker()
    reference.track_external(session.model, session.optimizer)
    with reference:
        train_step(session)
    return reference.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def packed_bytes(out_f: int, in_f: int, bits: int, group: int) -> tuple[int, int]:
    """(codes, float32 scales) bytes of an (out_f, in_f) weight: each row padded to whole groups,
    4-bit codes rounded up to whole bytes per row."""
    groups = math.ceil(in_f / group)
    return out_f * math.ceil(groups * group * bits / 8), out_f * groups * 4
