"""``pkg.module:attr`` entry points: a user's model factory, batch maker and loss function.

Importing the module runs its code, as ``python -m`` would; the current directory is on the import path.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any


def load_entry_point(text: str, field: str) -> Callable[..., Any]:
    """The callable ``text`` names; ValueError("FIELD: TEXT: why") when it cannot be had."""
    module_name, _, attr = text.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"{field}: {text}: no module named {exc.name or module_name!r} (on the path: the current "
                         "directory and PYTHONPATH)") from None
    except (Exception, SystemExit) as exc:
        raise ValueError(f"{field}: {text}: importing {module_name} raised {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{field}: {text}: {module_name} has no attribute {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{field}: {text}: {attr} is a {type(obj).__name__}, not callable")
    return obj
