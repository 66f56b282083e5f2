"""How problems are worded: a pydantic error -> ``model.n_head: unknown key; did you mean n_heads?``.

The bottom of the import graph: it imports nothing from memopt, so that the spec (memopt.spec) and the
strategy registry (memopt.strategies) word their problems the same way without importing each other.
"""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails


def suggest(word: str, choices: Any) -> str:
    """'; did you mean X?' for the closest of ``choices``, or ''."""
    match = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


def known_fields(root: Any, loc: tuple[Any, ...]) -> list[str]:
    """The field names of the model that ``loc`` (a path from the pydantic model ``root``) ends in."""
    model: Any = root
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def describe_path(loc: tuple[Any, ...]) -> str:
    """('strategies', 0, 'ckpt') -> 'strategies[0].ckpt'; () -> 'spec'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "spec"


def _is_tag(part: Any) -> bool:
    """Whether a path part is one pydantic added ('function-after[...]', 'list[int]'), not a key."""
    return isinstance(part, str) and re.fullmatch(r"[\w-]+\[.*\]", part, re.DOTALL) is not None


def describe(err: ErrorDetails, root: Any = None) -> str:
    """One pydantic error -> 'model.n_head: unknown key; did you mean n_heads?' (the did-you-mean looks up the
    fields of ``root``, the validated model, along the error's path)."""
    raw = tuple(err["loc"])
    kind = err["type"]
    # pydantic adds tags such as 'function-after[_check(), ModelSpec]' to the path; a key the user typed is
    # the last part of an unknown-key error, whatever characters it holds, and is never dropped
    keep = raw[-1:] if kind == "extra_forbidden" else ()
    loc = tuple(p for p in raw[:len(raw) - len(keep)] if not _is_tag(p)) + keep
    path = describe_path(loc)
    if kind == "extra_forbidden":
        return f"{path}: unknown key{suggest(str(loc[-1]), known_fields(root, loc))}"
    if kind == "missing":
        return f"{path}: required"
    msg = err["msg"]
    if msg.startswith("Value error, "):  # our validators: "field: problem; field: problem", relative to loc
        return describe_value_error(loc, msg[len("Value error, "):])
    got = err.get("input")
    shown = repr(got) if not isinstance(got, dict) else "a mapping"
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{path}: {msg[0].lower() + msg[1:]} (got {shown})"


def describe_value_error(loc: tuple[Any, ...], message: str) -> str:
    """A check's "field: problem; field: problem" message, its fields named relative to the path ``loc``."""
    path = describe_path(loc)
    parts = [part.partition(": ") for part in message.split("; ")]
    return "; ".join(f"{describe_path(loc + (key,))}: {text}" if text and " " not in key
                     else f"{path}: {key}{sep}{text}" for key, sep, text in parts)
