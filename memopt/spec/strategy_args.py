"""The one grammar of ``-s/--strategies`` on every command.

    -s SETS        SETS  = SET [, SET ...]          (``-s`` may be repeated: each value is its own sets)
                   SET   = STRAT [+ STRAT ...]
                   STRAT = name [: key=value [, key=value ...]]

A ``key=value`` piece never starts a set or a strategy: it adds an option to the strategy just before it,
so ``quant:bits=4,format=nf4,lora=8+sdpa`` is one set of two strategies. Commas and ``+`` inside
brackets belong to the value (``quant:lora={rank: 8, targets: [layers.0.*]}``). Values are read as YAML
scalars (``8`` is an int, ``true`` a bool). ``compare`` runs each set; commands that run one set
(profile, check, estimate) apply every strategy named, so there ``,`` and ``+`` both join. A spec's string
entry (``strategies: ["quant:bits=4"]``) is one STRAT of the same grammar (``parse_strategy``). The entries are
validated once, into StrategySpecs, by the strategy registry (memopt.strategies.strategy_spec).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import yaml

from memopt.core.errors import MemoptError

StrategyEntry = dict[str, dict[str, Any]]   # {name: options}, the spec's own form
_OPTION = re.compile(r"\s*[A-Za-z_]\w*\s*=")
_NAME = re.compile(r"[A-Za-z_][\w-]*")


def split_top_level(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside brackets and quotes."""
    parts, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth = max(depth - 1, 0)
        elif char == separator and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    parts.append(current)
    return parts


def _value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _option(piece: str) -> tuple[str, Any] | None:
    """'bits=4' -> ('bits', 4); None when the piece is not ``key=value``."""
    if not _OPTION.match(piece):
        return None
    key, _, value = piece.partition("=")
    return key.strip(), _value(value.strip())


def _add_option(entry: StrategyEntry, piece: str, option: str) -> None:
    parsed = _option(piece)
    assert parsed is not None  # the callers matched _OPTION
    key, value = parsed
    name = next(iter(entry))
    if key in entry[name]:
        raise MemoptError(f"{option}: {name}.{key} is given twice")
    entry[name][key] = value


def _strategy(piece: str, option: str) -> StrategyEntry:
    name, colon, rest = piece.strip().partition(":")
    name = name.strip()
    if not _NAME.fullmatch(name):
        raise MemoptError(f"{option}: {piece.strip()!r} is not a strategy name (see memopt strategies)")
    entry: StrategyEntry = {name: {}}
    if colon:
        for item in split_top_level(rest, ","):
            if not _OPTION.match(item):
                raise MemoptError(f"{option}: option {item.strip()!r} of {name} should look like key=value")
            _add_option(entry, item, option)
    return entry


def parse_strategy(text: str, where: str, problems: list[str]) -> StrategyEntry:
    """A spec's string entry (one STRAT: ``name[:key=value,...]``) -> ``{name: options}``.

    The grammar of ``-s``, with the spec's wording: a piece that is not ``key=value`` (or a key given twice)
    is added to ``problems`` as ``where.name: ...``, and the name is left to the registry to judge (an unknown
    one gets its did-you-mean there)."""
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    options: dict[str, Any] = {}
    for item in filter(None, split_top_level(rest, ",")):
        parsed = _option(item)
        if parsed is None:
            problems.append(f"{where}.{name}: option {item!r} should look like key=value")
        elif parsed[0] in options:
            problems.append(f"{where}.{name}: option {parsed[0]} is given twice")
        else:
            options[parsed[0]] = parsed[1]
    return {name: options}


def parse_sets(values: list[str] | str, option: str = "--strategies") -> list[list[StrategyEntry]]:
    """Every ``-s`` value -> strategy sets, each a list of ``{name: options}``; MemoptError naming the option."""
    sets: list[list[StrategyEntry]] = []
    for value in [values] if isinstance(values, str) else values:
        value_sets: list[list[StrategyEntry]] = []
        for token in split_top_level(value, ","):
            for i, piece in enumerate(split_top_level(token, "+")):
                if not piece.strip():
                    raise MemoptError(f"{option} {value!r}: empty strategy name (around {token.strip()!r})")
                if _OPTION.match(piece):
                    if not value_sets:
                        raise MemoptError(f"{option} {value!r}: {piece.strip()!r} must follow a strategy, "
                                          f"e.g. quant:{piece.strip()}")
                    _add_option(value_sets[-1][-1], piece, option)
                elif i == 0:
                    value_sets.append([_strategy(piece, option)])
                else:
                    value_sets[-1].append(_strategy(piece, option))
        if not value_sets:
            raise MemoptError(f"{option}: empty; name a strategy, e.g. ckpt (see memopt strategies)")
        sets.extend(value_sets)
    return sets


def one_set(values: list[str] | None, option: str = "--strategies") -> list[StrategyEntry] | None:
    """For commands that run one set: every strategy named, in order; None when the option was not given."""
    if values is None:
        return None
    return [entry for group in parse_sets(values, option) for entry in group]


def set_label(entries: Iterable[StrategyEntry]) -> str:
    """[{'quant': {'bits': 4}}, {'ckpt': {}}] -> 'quant:bits=4+ckpt' (parses back to the same set)."""
    return "+".join(strategy_text(e) for e in entries)


def strategy_text(entry: StrategyEntry) -> str:
    """{'quant': {'bits': 4, 'lora': 8}} -> 'quant:bits=4,lora=8': every strategy label (``-s`` sets, the search's
    candidates, StrategySpec.label) is written by this one function, options as given."""
    name, options = next(iter(entry.items()))
    if not options:
        return name
    shown = ",".join(f"{k}={_scalar_text(v)}" for k, v in options.items())
    return f"{name}:{shown}"


def _scalar_text(value: Any) -> str:
    """A value as YAML flow text on one line: 8, nf4, {rank: 4, targets: [layers.0.*]}."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
