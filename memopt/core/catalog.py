"""How the spec layer finds the strategy catalog without importing the strategies above it: the root package sets a
loader here (importing memopt.strategies, which provides the catalog), run the first time a strategy is validated,
so that ``import memopt`` (and ``memopt --help``) imports neither the strategies nor pydantic."""

from __future__ import annotations

from collections.abc import Callable

_loaders: list[Callable[[], None]] = []


def set_loader(loader: Callable[[], None]) -> None:
    _loaders[:] = [loader]


def load() -> None:
    """Run the loader (it provides the catalog to memopt.spec.strategy_spec); RuntimeError when none is set."""
    if not _loaders:
        raise RuntimeError("no strategy catalog loader: import memopt first")
    _loaders[0]()
