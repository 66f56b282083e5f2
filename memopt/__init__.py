"""memopt: memory profiler and optimizer for Transformer language models."""

from __future__ import annotations

from typing import TYPE_CHECKING

from memopt.core import catalog as _catalog
from memopt.core.version import __version__

if TYPE_CHECKING:
    import torch

    from memopt.app.track import Tracking


def _load_strategies() -> None:
    import memopt.strategies  # noqa: F401 - importing it provides the spec layer's strategy catalog


_catalog.set_loader(_load_strategies)  # run when a strategy is first validated: import memopt stays light

__all__ = ["__version__", "track"]


def track(model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None, *,
          timeline: bool = False, stacks: bool = False) -> Tracking:
    """``with memopt.track(model, optimizer) as t:`` measures your own training loop (see memopt.app.track); a
    model or optimizer not given is found as it runs (``with memopt.track() as t: trainer.train()``).
    ``timeline=True``: every event is kept, for ``t.save("step.html")`` (or ``.pickle``, ``.json``).

    Imports torch only when called: ``import memopt`` stays cheap."""
    from memopt.app.track import track as track_

    return track_(model, optimizer, timeline=timeline, stacks=stacks)
