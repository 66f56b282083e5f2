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


__all__ = ["REGISTRY", "Options", "StepPlan", "Strategy", "build_strategies", "register", "registry",
           "validate_options"]
