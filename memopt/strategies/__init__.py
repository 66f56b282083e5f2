"""The strategy registry: name -> Strategy class. Adding a strategy means adding a module here."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from memopt.errors import SpecError, StrategyError
from memopt.strategies.base import Options, StepPlan, Strategy

REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    from memopt.strategies import builtin  # noqa: F401 - importing registers every built-in strategy


def registry() -> dict[str, type[Strategy]]:
    _load_all()
    return dict(sorted(REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))


def validate_options(name: str, options: dict[str, Any]) -> Options:
    """Validate one strategy's options; SpecError with ``name.key`` paths otherwise."""
    from memopt.spec import _describe, _suggest

    known = registry()
    if name not in known:
        raise SpecError([f"{name}: unknown strategy{_suggest(name, known)}; known: {', '.join(known)}"])
    cls = known[name]
    try:
        return cls.Options.model_validate(options)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            text = _describe(err)
            if err["type"] == "extra_forbidden":
                text = f"{err['loc'][-1]}: unknown option{_suggest(str(err['loc'][-1]), cls.Options.model_fields)}"
            problems.append(f"{name}.{text}")
        raise SpecError(problems) from None


def build_strategies(spec: Any, device: str) -> list[Strategy]:
    """Instantiate the spec's strategies in composition order, refusing combinations that cannot work."""
    known = registry()
    chosen = [known[s.name](s.options, spec) for s in spec.strategies]
    names = {s.name for s in chosen}
    for strategy in chosen:
        for other, why in strategy.refuses.items():
            if other in names:
                raise StrategyError(f"{strategy.name}+{other}: refused: {why}")
        if device not in strategy.devices:
            raise StrategyError(f"{strategy.name}: works only on {', '.join(strategy.devices)}, "
                                f"not on {device}")
        strategy.check(device)
    return sorted(chosen, key=lambda s: s.order)


def candidate_settings(spec: Any, device: str, *, allow_lossy: bool = True,
                       exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, list[str]]:
    """Per strategy, its typical settings (lightest first) that its own checks accept for ``spec``.

    What estimate --fits and optimize try; a setting the strategy would refuse here is left out.
    """
    from memopt.errors import MemoptError
    from memopt.spec import spec_from_data

    out: dict[str, list[str]] = {}
    for name, cls in registry().items():
        if name in exclude or (cls.lossy and not allow_lossy):
            continue
        accepted = []
        for setting in cls.candidates or (name,):
            try:
                build_strategies(spec_from_data(spec.to_dict(), strategies=[setting]), device)
            except MemoptError:
                continue
            accepted.append(setting)
        if accepted:
            out[name] = accepted
    return out


__all__ = ["candidate_settings", "REGISTRY", "Options", "StepPlan", "Strategy", "build_strategies", "register", "registry",
           "validate_options"]
