"""A pytest marker that fails a test whose tensor memory passes a limit, by category.

    @pytest.mark.memopt_limit(peak="300 MiB", activations="120 MiB", device="cpu")
    def test_training_step(): ...

Like pytest-memray for host memory, but for tensors: the test body runs under ``memopt.track()`` (every storage
allocated during the test; the models that run and the optimizers that step are found through PyTorch's global
hooks, so parameters, gradients and optimizer state are known as such; tensors saved for backward count as
activations, the rest as temporaries; the ``peak`` limit is the total). A limit on something the test never ran
(``optimizer`` in a test whose optimizer never steps) fails the test as a usage error. Registered through the
``pytest11`` entry point.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

LIMIT_KEYS = ("peak", "activations", "temporaries", "params", "buffers", "grads", "optimizer")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "memopt_limit(peak=..., activations=..., device='cpu'): fail the test when "
                                       "its tensor memory passes a limit (sizes like '300 MiB')")


# what must have run for a limit to be measurable: a model (its parameters), a backward, an optimizer step
NEEDS = {"params": "a module with parameters ran no forward", "buffers": "a module with parameters ran no forward",
         "grads": "no optimizer stepped, so no parameter's gradient was known",
         "optimizer": "no optimizer stepped"}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    marker = item.get_closest_marker("memopt_limit")
    if marker is None:
        return (yield)
    from memopt.app.track import Tracking
    from memopt.core.units import format_bytes, parse_size

    options = dict(marker.kwargs)
    device = options.pop("device", "cpu")
    unknown = set(options) - set(LIMIT_KEYS)
    if unknown:
        raise pytest.UsageError(f"memopt_limit: unknown limit {sorted(unknown)}; use {', '.join(LIMIT_KEYS)}")
    limits = {key: parse_size(value) for key, value in options.items()}
    tracking = Tracking(device=device, label="memopt_limit")
    with tracking:
        result = yield
    memory = tracking.result.memory
    assert memory is not None
    stepped = tracking.steps > 0
    measurable = {"params": stepped or bool(tracking.models), "buffers": stepped or bool(tracking.models),
                  "grads": stepped, "optimizer": stepped}
    blind = [f"{key} ({NEEDS[key]})" for key in limits if not measurable.get(key, True)]
    if blind:
        pytest.fail("memopt_limit: cannot measure " + "; ".join(blind) + " in this test: a limit that cannot "
                    "fail is a usage error", pytrace=False)
    seen = {"peak": memory.peak_bytes, **memory.category_peak_bytes}
    over = [f"{key} {format_bytes(seen[key])} > limit {format_bytes(limit)}"
            for key, limit in limits.items() if seen[key] > limit]
    if over:
        pytest.fail("memopt_limit exceeded: " + "; ".join(over), pytrace=False)
    return result
