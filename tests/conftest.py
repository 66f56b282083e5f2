from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from memopt.cli import app, normalize_argv
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
    return CliRunner().invoke(app, normalize_argv([str(a) for a in args]))
