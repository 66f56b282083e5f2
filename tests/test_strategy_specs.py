"""One parsed form of a strategy (StrategySpec), typed candidates with the labels printed before, the search's
settings beside the search, and the wording at the bottom of the imports (no spec <-> strategies circle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from memopt.core.errors import SpecError
from memopt.spec import load_spec, spec_from_data
from memopt.strategies import StrategySpec, candidate_specs, registry, strategy_spec

from .helpers import CONFIGS

PACKAGE = Path(__file__).resolve().parents[1] / "memopt"


def _runtime_imports(path: Path) -> set[str]:
    """The memopt modules a file imports when it runs (imports under ``if TYPE_CHECKING:`` left out)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
               for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "memopt" or name.startswith("memopt.")}


def test_memopt_help_imports_neither_the_strategies_nor_pydantic_nor_torch():
    code = ("import sys, memopt, memopt.cli; "
            "print(*(m in sys.modules for m in ('memopt.strategies', 'pydantic', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]


def test_a_spec_finds_the_strategy_catalog_on_its_own():
    code = "from memopt.spec import spec_from_data; print(spec_from_data({}, strategies=['ckpt']).strategies[0].label)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["ckpt"]


def test_importing_memopt_and_the_strategy_registry_loads_no_torch():
    code = ("import sys, memopt, memopt.strategies, memopt.spec, memopt.cli; "
            "print('memopt.spec.strategy_spec' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]  # the spec layer, wired to the catalog; no torch


def test_the_wording_module_imports_only_the_errors():
    assert _runtime_imports(PACKAGE / "core" / "wording.py") <= {"memopt.core.errors"}


# the labels printed before candidates were typed (optimize tables, estimate --fits, README), lightest first
LABELS = {
    "ckpt": ["ckpt:policy=selective", "ckpt:policy=every,every=2", "ckpt"],
    "accum": ["accum:micro_batches=2", "accum:micro_batches=4", "accum:micro_batches=8"],
    "quant": ["quant:bits=8,lora=8", "quant:bits=4,format=nf4,lora=8", "quant:bits=4,lora=8",
              "quant:bits=4,lora=8,group_size=128"],
    "prune": ["prune:ffn=0.25", "prune:ffn=0.5"],
    "amp": ["amp:dtype=bf16"],
    "sdpa": ["sdpa"],
}


@pytest.mark.parametrize("name", list(LABELS))
def test_candidate_labels_are_the_strings_printed_before(name):
    assert [s.label for s in candidate_specs(name)] == LABELS[name]


def test_every_candidate_is_a_validated_strategy_spec_equal_to_its_label_parsed():
    for name in registry():
        for setting in candidate_specs(name):
            assert isinstance(setting.options, registry()[name].Options)
            parsed = spec_from_data({}, strategies=[setting.label]).strategies[0]
            assert parsed == setting and parsed.label == setting.label
            assert setting.to_dict() == {name: setting.options.model_dump()}


def test_equality_looks_at_the_validated_options_not_their_spelling():
    a, b = strategy_spec("quant", {"bits": 4, "lora": 8}), strategy_spec("quant", {"lora": {"rank": 8}, "bits": 4})
    assert a == b and hash(a) == hash(b) and a.label != b.label
    assert a != strategy_spec("quant", {"bits": 4})
    direct = StrategySpec(name="ckpt", options=registry()["ckpt"].Options(policy="every"))
    assert direct.label == "ckpt:policy=every"


def test_with_strategies_takes_strategy_specs_and_serialises_as_before():
    spec = load_spec(CONFIGS / "tiny.yaml")
    chosen = spec.with_strategies(candidate_specs("quant")[:1])
    assert chosen.to_dict()["strategies"] == [{"quant": {"bits": 8, "format": "int", "group_size": 64,
                                                         "embedding": False, "head": False,
                                                         "lora": {"rank": 8, "alpha": 16.0,
                                                                  "targets": ["*"]}}}]
    assert spec_from_data(chosen.to_dict()) == chosen


def test_a_spec_string_entry_is_read_with_the_strategies_grammar():
    spec = spec_from_data({}, strategies=["quant:bits=4,lora={rank: 4, targets: [layers.0.*, layers.1.*]}"])
    assert spec.strategies[0].options.lora.targets == ["layers.0.*", "layers.1.*"]
    with pytest.raises(SpecError) as err:
        spec_from_data({}, strategies=["quant:4", "ckpt:every=2,every=3"])
    assert err.value.problems == ["strategies[0].quant: option '4' should look like key=value",
                                  "strategies[1].ckpt: option every is given twice"]
