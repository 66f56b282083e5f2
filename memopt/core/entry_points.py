"""``pkg.module:attr`` entry points: a user's model factory, batch maker and loss function.

Importing the module runs its code, as ``python -m`` would; the current directory is on the import path. User
code runs ``fenced``: a ``sys.exit`` or ``os._exit`` in it is an error naming it, never memopt's exit code.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from memopt.core.errors import MemoptError


class _Exited(BaseException):
    """Raised in place of ``os._exit`` while user code runs (os._exit would end memopt there, exit code and all)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


@contextlib.contextmanager
def fenced(what: str) -> Iterator[None]:
    """Run user code (``what`` names it: ``model.python: pkg.mod:factory``): ``sys.exit`` or ``os._exit`` in it
    becomes a MemoptError naming it, so that it can neither end memopt nor choose its exit code (0 would pass a CI
    gate, 3 reads as check's regression)."""
    original = os._exit

    def refuse(code: int) -> NoReturn:
        raise _Exited(code)

    os._exit = refuse  # type: ignore[assignment]
    try:
        yield
    except SystemExit as exc:
        raise MemoptError(f"{what} called sys.exit({exc.code!r}) (user code may not end memopt's run)") from None
    except _Exited as exc:
        raise MemoptError(f"{what} called os._exit({exc.code}) (user code may not end memopt's run)") from None
    finally:
        os._exit = original


def call_user(label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, user code ``label`` names (``model.python: pkg.mod:make``), fenced; what it raises
    becomes one MemoptError naming it."""
    try:
        with fenced(label):
            return fn(*args, **kwargs)
    except MemoptError:
        raise
    except Exception as exc:
        raise MemoptError(f"{label} raised {exception_text(exc)}") from None


def kind_of(value: Any) -> str:
    """What a user's function returned, for a message: ``None`` or ``a value of type int`` (not "a int")."""
    return "None" if value is None else f"a value of type {type(value).__name__}"


def exception_text(exc: BaseException) -> str:
    """``Type: message`` on one line, for a message naming an entry point ('; ' becomes ', ': it separates spec
    problems)."""
    text = " ".join(str(exc).split()).replace("; ", ", ")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def find_entry_point_module(text: str, field: str) -> None:
    """That the module ``text`` names can be found, without importing it (its code may choose, by importing Keras,
    what cannot be chosen later); ValueError("FIELD: TEXT why") when it cannot."""
    module_name = text.partition(":")[0]
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        found = None
    except Exception as exc:  # a parent package that raises on import
        raise ValueError(f"{field}: {text} cannot be imported, importing {module_name} raised "
                         f"{exception_text(exc)}") from None
    if found is None:
        raise ValueError(f"{field}: {text} cannot be imported, no module named {module_name!r} (the import path "
                         "holds the current directory and PYTHONPATH)")


def load_entry_point(text: str, field: str) -> Callable[..., Any]:
    """The callable ``text`` names; ValueError("FIELD: TEXT why") when it cannot be had.

    No colon follows TEXT in a message: a terminal renderer (rich) reads ``:name:`` as an emoji code, so
    ``pkg.mod:factory: ...`` would print a factory emoji.
    """
    module_name, _, attr = text.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        with fenced(f"{field}: importing {module_name}"):
            obj: Any = importlib.import_module(module_name)
    except MemoptError as exc:
        raise ValueError(f"{field}: {text} cannot be imported, {str(exc).split(': ', 1)[1]}") from None
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
