from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from memopt.cli import app
from memopt.spec import Spec, load_spec

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


@pytest.fixture
def tiny() -> Spec:
    return load_spec(CONFIGS / "tiny.yaml")


@pytest.fixture
def tiny_decoder() -> Spec:
    return load_spec(CONFIGS / "tiny-decoder.yaml")


def invoke(args: list[str]):
    """Run the CLI in-process the way the console script does."""
    return CliRunner().invoke(app, [str(a) for a in args])


def memtracker_peak(spec: Spec) -> int:
    """PyTorch's own MemTracker peak for one steady-state step of ``spec`` (an independent reference)."""
    import torch

    from memopt.runner import prepare, train_step

    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    session = prepare(spec)
    train_step(session)  # warm-up: optimizer state exists from here on
    reference = mem_tracker.MemTracker()
    reference.track_external(session.model, session.optimizer)
    with reference:
        train_step(session)
    return reference.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
