"""pytest fixtures only; the shared helpers (ROOT, CONFIGS, invoke, ...) are in tests/helpers.py."""

from __future__ import annotations

import pytest

from memopt.spec import Spec, load_spec

from .helpers import CONFIGS


@pytest.fixture
def tiny() -> Spec:
    return load_spec(CONFIGS / "tiny.yaml")


@pytest.fixture
def tiny_decoder() -> Spec:
    return load_spec(CONFIGS / "tiny-decoder.yaml")
