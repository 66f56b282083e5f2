"""The house in layers: imports point down only (import-linter's contracts in pyproject.toml), no import circle,
and few function-local imports of memopt (each one keeps torch or an optional extra out of ``import memopt``)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT

grimp = pytest.importorskip("grimp")  # comes with import-linter (the test extra)
LINT = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
LOCAL_IMPORT_LIMIT = 20


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    if not Path(LINT).exists():
        pytest.skip("import-linter is not installed")
    return subprocess.run([LINT, "--config", str(root / "pyproject.toml")], cwd=root, capture_output=True,
                          text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=300)


def test_the_layer_contracts_hold():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout


def test_a_lower_layer_importing_a_higher_one_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "memopt", tmp_path / "memopt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    units = tmp_path / "memopt" / "core" / "units.py"
    units.write_text(units.read_text() + "\n\ndef _up() -> None:\n    import memopt.engine.run  # noqa: F401\n")
    done = _lint(tmp_path)
    assert done.returncode != 0
    assert "memopt.core is not allowed to import memopt.engine" in done.stdout


def test_no_import_circle_among_memopts_modules():
    graph = grimp.build_graph("memopt")
    circles = [(module, other) for module in sorted(graph.modules)
               for other in sorted(graph.find_modules_directly_imported_by(module))
               if graph.find_shortest_chain(importer=other, imported=module)]
    assert circles == []


def _local_memopt_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("memopt"):
                    found.append(f"{path.relative_to(ROOT)}:{inner.lineno} {inner.module}")
    return found


def test_function_local_imports_of_memopt_stay_few():
    local = [hit for path in sorted((ROOT / "memopt").rglob("*.py")) for hit in _local_memopt_imports(path)]
    assert len(local) < LOCAL_IMPORT_LIMIT, "\n".join(local)


def test_lazy_package_names_stay_what_they_name_after_every_submodule_is_imported():
    """A lazily exported name that is also a submodule's name turns into the module once that submodule is imported
    (CI found ``memopt.spec.strategy_spec`` a module in one test order). Every package's exports stay what they name."""
    script = (
        "import importlib, pkgutil, types, memopt\n"
        "bad = []\n"
        "for info in pkgutil.walk_packages(memopt.__path__, 'memopt.'):\n"
        "    if info.name.endswith('__main__'):\n"
        "        continue\n"
        "    try:\n"
        "        importlib.import_module(info.name)\n"
        "    except ImportError:\n"
        "        continue\n"
        "for info in pkgutil.walk_packages(memopt.__path__, 'memopt.'):\n"
        "    if not info.ispkg:\n"
        "        continue\n"
        "    package = importlib.import_module(info.name)\n"
        "    for name in getattr(package, '__all__', ()):\n"
        "        if isinstance(getattr(package, name), types.ModuleType):\n"
        "            bad.append(f'{info.name}.{name}')\n"
        "print(bad)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
