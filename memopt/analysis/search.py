"""What the searches try: each strategy's typical settings that apply to a spec.

``memopt optimize`` combines them (memopt.analysis.optimize) and ``memopt estimate --fits`` (and the preflight check)
tries them one at a time (memopt.analysis.estimate.fits). The settings come from each strategy's ``candidates``,
made StrategySpecs by the registry (memopt.strategies.candidate_specs); their labels are the strategy
labels of memopt.spec.strategy_args.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memopt.core.errors import MemoptError
from memopt.strategies import StrategySpec, build_strategies, candidate_specs, registry

if TYPE_CHECKING:
    from memopt.spec import Spec


def candidate_settings(spec: Spec, device: str, *, allow_lossy: bool = True,
                       exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, list[StrategySpec]]:
    """Per strategy, its typical settings (lightest first) that its own checks accept for ``spec`` alone.

    What estimate --fits and optimize try; a setting the strategy would refuse here is left out, and so is a
    strategy named in ``exclude`` or, without ``allow_lossy``, a lossy one.
    """
    out: dict[str, list[StrategySpec]] = {}
    for name, cls in registry().items():
        if name in exclude or (cls.lossy and not allow_lossy) or not cls.searched:
            continue
        accepted = []
        for setting in candidate_specs(name, spec.run.mode):
            try:
                build_strategies(spec.with_strategies((setting,)), device)
            except MemoptError:
                continue
            accepted.append(setting)
        if accepted:
            out[name] = accepted
    return out
