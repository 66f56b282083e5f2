"""The one grammar of ``-s/--strategies`` on every command.

    -s SETS        SETS  = SET [, SET ...]          (``-s`` may be repeated: each value is its own sets)
                   SET   = STRAT [+ STRAT ...]
                   STRAT = name [: key=value [, key=value ...]]

A ``key=value`` piece never starts a set or a strategy: it adds an option to the strategy just before it,
so ``quant:bits=4,format=nf4,lora=8+sdpa`` is one set of two strategies. Commas and ``+`` inside
brackets belong to the value (``quant:lora={rank: 8, targets: [layers.0.*]}``). Values are read as YAML
scalars (``8`` is an int, ``true`` a bool). ``compare`` runs each set; commands that run one set
(profile, check, estimate) apply every strategy named, so there ``,`` and ``+`` both join.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from memopt.errors import MemoptError

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


def _add_option(entry: StrategyEntry, piece: str, option: str) -> None:
    key, _, value = piece.partition("=")
    name = next(iter(entry))
    key = key.strip()
    if key in entry[name]:
        raise MemoptError(f"{option}: {name}.{key} is given twice")
    entry[name][key] = _value(value.strip())


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


def set_label(entries: list[StrategyEntry]) -> str:
    """[{'quant': {'bits': 4}}, {'ckpt': {}}] -> 'quant:bits=4+ckpt' (parses back to the same set)."""
    return "+".join(strategy_text(e) for e in entries)


def strategy_text(entry: StrategyEntry) -> str:
    name, options = next(iter(entry.items()))
    if not options:
        return name
    shown = ",".join(f"{k}={yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix('...').strip()}"
                     for k, v in options.items())
    return f"{name}:{shown}"
