"""The strategy registry: name -> Strategy class. Adding a strategy means adding a module here.

Also the one parsed form of a strategy, ``StrategySpec(name, options)``: spec files, ``-s`` and the search's
candidates all become StrategySpecs here (``strategy_spec``, ``candidate_specs``). Importing this package
imports neither torch (the strategy modules load on the first ``registry()``) nor memopt.spec.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, SerializeAsAny, ValidationError

from memopt.errors import SpecError, StrategyError
from memopt.strategies.base import Options, SavedTensors, StepPlan, Strategy
from memopt.strategy_args import StrategyEntry, strategy_text
from memopt.wording import describe, suggest

REGISTRY: dict[str, type[Strategy[Any]]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    from memopt.strategies import builtin  # noqa: F401 - importing registers every built-in strategy


def registry() -> dict[str, type[Strategy]]:
    _load_all()
    return dict(sorted(REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))


class StrategySpec(BaseModel):
    """One strategy with its validated options (the strategy's own Options model): one entry of a spec's
    ``strategies``, of a ``-s`` set, or a search candidate. Made by ``strategy_spec``; serialised as
    ``{name: options.model_dump()}``. ``label`` shows the options as they were given (``quant:bits=4,lora=8``);
    equality looks at the name and the validated options only."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str
    options: SerializeAsAny[Options]
    _given: dict[str, Any] | None = PrivateAttr(default=None)  # the options as written, for the label

    def to_dict(self) -> dict[str, Any]:
        return {self.name: self.options.model_dump()}

    @property
    def entry(self) -> StrategyEntry:
        """``{name: options as given}`` (the non-default ones when it was made from an Options model)."""
        given = self._given if self._given is not None else self.options.model_dump(exclude_defaults=True)
        return {self.name: dict(given)}

    @property
    def label(self) -> str:
        return strategy_text(self.entry)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StrategySpec):
            return NotImplemented
        return (self.name, self.options) == (other.name, other.options)

    def __hash__(self) -> int:
        return hash((self.name, self.options.model_dump_json()))


def strategy_spec(name: str, options: dict[str, Any] | None = None) -> StrategySpec:
    """``{name: options}`` -> a StrategySpec, validated once; SpecError with ``name.key`` paths otherwise."""
    given = {} if options is None else dict(options)
    spec = StrategySpec(name=name, options=validate_options(name, given))
    spec._given = given
    return spec


def candidate_specs(name: str, mode: str = "train") -> tuple[StrategySpec, ...]:
    """The strategy's typical settings for run.mode ``mode`` (its class's ``candidates``, or
    ``inference_candidates`` outside training; none: just the name), lightest first."""
    cls = registry()[name]
    settings = cls.inference_candidates if mode != "train" and cls.inference_candidates is not None else cls.candidates
    return tuple(strategy_spec(name, options) for options in settings or ({},))


def validate_options(name: str, options: dict[str, Any]) -> Options:
    """Validate one strategy's options; SpecError with ``name.key`` paths otherwise."""
    known = registry()
    if name not in known:
        raise SpecError([f"{name}: unknown strategy{suggest(name, known)}; known: {', '.join(known)}"])
    cls = known[name]
    try:
        return cls.Options.model_validate(options)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            text = describe(err)
            if err["type"] == "extra_forbidden":
                text = f"{err['loc'][-1]}: unknown option{suggest(str(err['loc'][-1]), cls.Options.model_fields)}"
            problems.append(f"{name}.{text}")
        raise SpecError(problems) from None


def build_strategies(spec: Any, device: str, saved: SavedTensors | None = None) -> list[Strategy[Any]]:
    """Instantiate the spec's strategies for ``device`` in composition order, refusing combinations that
    cannot work; ``saved`` is where they report tensors they keep for backward (the runner's tracker)."""
    known = registry()
    chosen = [known[s.name](s.options, spec, device, saved) for s in spec.strategies]
    names = {s.name for s in chosen}
    for strategy in chosen:
        for other, why in strategy.refuses.items():
            if other in names:
                raise StrategyError(f"{strategy.name}+{other}: refused: {why}")
        if device not in strategy.devices:
            raise StrategyError(f"{strategy.name}: works only on {', '.join(strategy.devices)}, "
                                f"not on {device}")
        mode = spec.run.mode
        if mode not in strategy.modes:
            where = ", ".join(f"--mode {m}" for m in strategy.modes)
            raise StrategyError(f"{strategy.name}: applies to {where}, not to run.mode {mode}"
                                + ("" if mode == "train" else " (nothing is trained or saved for backward)"))
        kind = getattr(spec.model, "kind", "builtin")
        if strategy.needs_to_know and kind == "python":
            raise StrategyError(f"{strategy.name}: needs to know the model's {strategy.needs_to_know}, which memopt "
                                "cannot for a model from a Python factory")
        strategy.check()
    return sorted(chosen, key=lambda s: s.order)


__all__ = ["REGISTRY", "Options", "StepPlan", "Strategy", "StrategySpec", "build_strategies", "candidate_specs",
           "register", "registry", "strategy_spec", "validate_options"]
