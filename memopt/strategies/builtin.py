"""Imports every strategy module of this package so that each registers itself: adding a strategy is
adding its module (memopt/strategies/NAME.py with a ``@register``-ed class), nothing else."""

import importlib
import pkgutil

import memopt.strategies as _package

NOT_STRATEGIES = {"base", "builtin"}

for _info in pkgutil.iter_modules(_package.__path__):
    if _info.name not in NOT_STRATEGIES:
        importlib.import_module(f"{_package.__name__}.{_info.name}")
