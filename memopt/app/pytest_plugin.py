"""A pytest marker that fails a test whose tensor memory passes a limit, by category.

    @pytest.mark.memopt_limit(peak="300 MiB", activations="120 MiB", device="cpu")
    def test_training_step(): ...

Like pytest-memray for host memory, but for tensors: the test body runs under memopt's tracker
(every storage allocated during the test, tensors saved for backward counted as activations, the
rest as temporaries; the ``peak`` limit is the total). Registered through the ``pytest11`` entry point.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

LIMIT_KEYS = ("peak", "activations", "temporaries", "params", "buffers", "grads", "optimizer")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "memopt_limit(peak=..., activations=..., device='cpu'): fail the test when "
                                       "its tensor memory passes a limit (sizes like '300 MiB')")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    marker = item.get_closest_marker("memopt_limit")
    if marker is None:
        return (yield)
    from memopt.core.units import format_bytes, parse_size
    from memopt.measure.tracker import TensorTracker

    options = dict(marker.kwargs)
    device = options.pop("device", "cpu")
    unknown = set(options) - set(LIMIT_KEYS)
    if unknown:
        raise pytest.UsageError(f"memopt_limit: unknown limit {sorted(unknown)}; use {', '.join(LIMIT_KEYS)}")
    limits = {key: parse_size(value) for key, value in options.items()}
    tracker = TensorTracker(device)
    with tracker, tracker.saved_tensors():
        result = yield
    memory = tracker.result()
    seen = {"peak": memory.peak_bytes, **memory.category_peak_bytes}
    over = [f"{key} {format_bytes(seen[key])} > limit {format_bytes(limit)}"
            for key, limit in limits.items() if seen[key] > limit]
    if over:
        pytest.fail("memopt_limit exceeded: " + "; ".join(over), pytrace=False)
    return result
