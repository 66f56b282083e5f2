"""Step-time ratios with their spread: a slowdown is never printed without how well it is known.

A ratio comes from rounds, each a run of the changed set and a run of the baseline measured side by side (its
median step over the baseline's median step). With two rounds or more the ratio is their mean and the spread
half their range; with one round it is the medians' ratio and the spread what the single steps allow (the
slowest changed step over the fastest baseline step, and the other way round). A ratio whose spread reaches 1.0
is "same": the two cannot be told apart on this machine.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Round = tuple[Sequence[float], Sequence[float]]  # (the set's step times, the baseline's), one round


@dataclass(frozen=True)
class Ratio:
    value: float
    spread: float  # value +- spread; inf when one step of each is all there is
    rounds: int = 1

    @property
    def same(self) -> bool:
        """Within noise of 1.0x."""
        return abs(self.value - 1.0) <= self.spread + 1e-9

    def known_to(self, fraction: float) -> bool:
        return self.spread <= fraction * self.value

    def text(self) -> str:
        """``1.26x ±0.03``; ``same (0.98x ±0.04)`` within noise; ``±?`` when nothing says how well it is known."""
        spread = "±?" if math.isinf(self.spread) else f"±{self.spread:.2f}"
        body = f"{self.value:.2f}x {spread}"
        return f"same ({body})" if self.same and not math.isinf(self.spread) else body

    def to_json(self) -> dict[str, Any]:
        return {"ratio": self.value, "spread": None if math.isinf(self.spread) else self.spread,
                "rounds": self.rounds, "same": self.same and not math.isinf(self.spread)}


def ratio_of(rounds: Sequence[Round]) -> Ratio:
    """The ratio of the set's step time to the baseline's over ``rounds`` (see the module's docstring)."""
    usable = [(list(a), list(b)) for a, b in rounds if a and b and min(b) > 0]
    if not usable:
        raise ValueError("no round with step times on both sides")
    ratios = [statistics.median(a) / statistics.median(b) for a, b in usable]
    if len(ratios) >= 2:
        return Ratio(statistics.fmean(ratios), (max(ratios) - min(ratios)) / 2, len(ratios))
    a, b = usable[0]
    if len(a) < 2 and len(b) < 2:
        return Ratio(ratios[0], math.inf)
    return Ratio(ratios[0], max(max(a) / min(b) - ratios[0], ratios[0] - min(a) / max(b)))
