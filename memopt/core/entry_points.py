"""``pkg.module:attr`` entry points: a user's model factory, batch maker and loss function.

Importing the module runs its code, as ``python -m`` would; the current directory is on the import path.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any


def exception_text(exc: BaseException) -> str:
    """``Type: message`` on one line, for a message naming an entry point ('; ' becomes ', ': it separates spec
    problems)."""
    text = " ".join(str(exc).split()).replace("; ", ", ")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_entry_point(text: str, field: str) -> Callable[..., Any]:
    """The callable ``text`` names; ValueError("FIELD: TEXT why") when it cannot be had.

    No colon follows TEXT in a message: a terminal renderer (rich) reads ``:name:`` as an emoji code, so
    ``pkg.mod:factory: ...`` would print a factory emoji.
    """
    module_name, _, attr = text.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"{field}: {text} cannot be imported, no module named {exc.name or module_name!r} (the "
                         "import path holds the current directory and PYTHONPATH)") from None
    except (Exception, SystemExit) as exc:
        raise ValueError(f"{field}: {text} cannot be imported, importing {module_name} raised "
                         f"{exception_text(exc)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{field}: {text} not found, {module_name} has no attribute {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{field}: {text} is not callable (a value of type {type(obj).__name__})")
    return obj
