"""pytest fixtures only; the shared helpers (ROOT, CONFIGS, invoke, ...) are in tests/helpers.py."""

from __future__ import annotations

import pytest

from memopt.spec import Spec, load_spec

from .helpers import CONFIGS


@pytest.fixture(autouse=True, scope="session")
def _rates_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """optimize's machine probes cache their rates in a folder of the test session, never the user's."""
    import os

    os.environ["MEMOPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("memopt-cache"))


@pytest.fixture
def tiny() -> Spec:
    return load_spec(CONFIGS / "tiny.yaml")


@pytest.fixture
def tiny_decoder() -> Spec:
    return load_spec(CONFIGS / "tiny-decoder.yaml")
