"""One strategy as a spec names it: ``StrategySpec(name, options)``, its options validated by the strategy's own
Options model.

The spec sits below the strategies, so it does not know them: the strategies package provides the catalog
(name -> Options model) with ``provide_catalog`` when it is imported; the first time a strategy is validated
without it, memopt.core.catalog's loader (set by ``memopt/__init__.py``) imports that package.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, SerializeAsAny, ValidationError

from memopt.core import catalog as loader
from memopt.core.errors import SpecError
from memopt.core.wording import describe, suggest
from memopt.spec.strategy_args import StrategyEntry, strategy_text


class Options(BaseModel):
    """Base of every strategy's options: frozen, strict, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


@dataclass(frozen=True)
class Catalog:
    """What the spec needs to know of the strategies: each name's Options model, and the strategy that
    ``--world-size N`` adds to a spec that names none of those that run on ranks."""

    options: Callable[[], Mapping[str, type[Options]]]
    on_ranks: str


_catalog: list[Catalog] = []


def provide_catalog(catalog: Catalog) -> None:
    """Called once by memopt.strategies when it is imported."""
    _catalog[:] = [catalog]


def catalog() -> Catalog:
    if not _catalog:
        loader.load()  # imports memopt.strategies, which provides it
    return _catalog[0]


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

    @property
    def on_ranks(self) -> bool:
        """Whether this strategy spreads the run over ranks (its options say how many: ``world_size``)."""
        return "world_size" in type(self.options).model_fields

    @property
    def world_size(self) -> int:
        """The ranks this strategy runs on (1 unless its options say ``world_size``)."""
        return int(getattr(self.options, "world_size", 1))

    @property
    def ranks_per_batch(self) -> int:
        """Ranks that step on the same rows of the batch (a tensor-parallel group; 1 unless its options say)."""
        return int(getattr(self.options, "ranks_per_batch", 1))

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


def validate_options(name: str, options: dict[str, Any]) -> Options:
    """Validate one strategy's options; SpecError with ``name.key`` paths otherwise."""
    known = catalog().options()
    if name not in known:
        raise SpecError([f"{name}: unknown strategy{suggest(name, known)}; known: {', '.join(known)}"])
    model = known[name]
    try:
        return model.model_validate(options)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            text = describe(err)
            if err["type"] == "extra_forbidden":
                text = f"{err['loc'][-1]}: unknown option{suggest(str(err['loc'][-1]), model.model_fields)}"
            problems.append(f"{name}.{text}")
        raise SpecError(problems) from None
