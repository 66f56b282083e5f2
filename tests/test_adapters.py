"""The model seam: strategies reach the model only through its adapter, and say so when it lacks a part."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from memopt.adapters import AdapterError
from memopt.adapters.build import adapter_for
from memopt.adapters.builtin import BuiltinAdapter
from memopt.engine.step import make_batch, prepare
from memopt.model.transformer import build_model
from memopt.spec import load_spec
from memopt.strategies import build_strategies

from .helpers import CONFIGS, ROOT

PACKAGE = ROOT / "memopt"
STRATEGY_FILES = sorted((PACKAGE / "strategies").glob("*.py"))
MODEL_CLASSES = {"LanguageModel", "EncoderLayer", "DecoderLayer", "SelfAttention", "SwiGLU", "Rope",
                 "CrossEntropyHead"}


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("path", STRATEGY_FILES, ids=[p.name for p in STRATEGY_FILES])
def test_no_strategy_knows_memopts_model_classes(path: Path):
    tree = ast.parse(path.read_text())
    assert "memopt.model.transformer" not in _imports(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
            assert not (MODEL_CLASSES & {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)})
        if isinstance(node, ast.Attribute):
            assert node.attr not in ("layers", "loss_head", "tok", "_cdata"), f"{path.name} reaches into {node.attr}"
    assert "type: ignore" not in path.read_text()  # options are typed per strategy: Strategy[TheirOptions]


def test_storage_identity_and_saved_tensor_reporting_have_one_home_each():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if path.name != "_torch_private.py":
            assert "._cdata" not in text, path
        assert "_ACTIVE" not in text, path  # no module-global tracker: strategies get an observer


@pytest.mark.parametrize("config", ["tiny.yaml", "tiny-decoder.yaml"])
def test_the_builtin_adapter_answers_in_the_models_terms(config):
    spec = load_spec(CONFIGS / config)
    adapter = adapter_for(build_model(spec.model))
    m = spec.model
    assert isinstance(adapter, BuiltinAdapter) and len(adapter.blocks()) == m.n_layers
    names = adapter.linears()
    per_layer = 6 if m.arch == "encoder" else 7  # q, k, v, o + the FFN's 2 (encoder) or 3 (SwiGLU) Linears
    assert len(names) == m.n_layers * per_layer and all(n.startswith("layers.") for n in names)
    assert len(adapter.linears(lambda _mod, fqn: fqn.endswith(".q"))) == m.n_layers
    assert adapter.head()[0] == "head" and adapter.embedding()[0] == "tok"
    assert adapter.attention_kind() == m.attention
    assert [len(f.up) for f in adapter.feed_forwards()] == [1 if m.arch == "encoder" else 2] * m.n_layers
    batch = make_batch(spec, "cpu")
    hidden = adapter.hidden_states(batch)
    assert hidden.shape == (spec.train.batch_size, spec.train.seq_len, m.d_model)
    assert adapter.loss_from_hidden(hidden, batch).item() == pytest.approx(adapter.loss(batch).item(), rel=1e-6)


class _Headless(BuiltinAdapter):
    def head(self):
        return None


def test_a_strategy_that_lacks_a_part_refuses_with_the_reason():
    spec = load_spec(CONFIGS / "tiny.yaml", strategies=["chunked_ce"])
    (strategy,) = build_strategies(spec, "cpu")
    with pytest.raises(AdapterError, match="chunked_ce: this model has no separable output head"):
        strategy.apply(_Headless(build_model(spec.model)))


def test_strategies_get_their_device_at_construction_and_check_only_checks():
    spec = load_spec(CONFIGS / "tiny.yaml", strategies=["offload", "amp"])
    strategies = build_strategies(spec, "cpu")
    assert all(s.device == "cpu" for s in strategies)
    offload = next(s for s in strategies if s.name == "offload")
    before = dict(vars(offload))
    offload.check()
    assert vars(offload) == before and offload.target == "disk"


def test_ckpt_reports_recomputed_tensors_through_the_session_observer(tiny):
    """Recomputation saves tensors through checkpoint's own hooks: they reach the tracker via the observer."""
    from .helpers import run

    spec = tiny.with_strategies(load_spec(CONFIGS / "tiny.yaml", strategies=["ckpt"]).strategies)
    session = prepare(spec)
    assert session.saved.observer is None  # connected only while a tracker measures
    assert run(spec).memory.category_peak_bytes["activations"] > 0


def test_the_readmes_strategy_is_added_by_its_own_file_alone(tmp_path):
    """The README's "Add a strategy" example, saved as one new module in a copy of the package, is listed,
    validated and run, and saves exactly the embedding's gradient and AdamW state."""
    import json
    import os
    import re
    import shutil
    import subprocess
    import sys

    code = re.search(r"## Add a strategy.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    shutil.copytree(PACKAGE, tmp_path / "memopt", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "memopt" / "strategies" / "freeze_embedding.py").write_text(code)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}

    def profile(*strategies: str) -> dict:
        args = [sys.executable, "-m", "memopt.cli", "profile", str(CONFIGS / "tiny.yaml"), "--steps", "1", "--json",
                *(a for s in strategies for a in ("-s", s))]
        out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["runs"][0]

    base, frozen = profile(), profile("freeze_embedding")
    embedding = 1000 * 64 * 4  # vocab x d_model x float32
    assert base["state_bytes"]["grads"] - frozen["state_bytes"]["grads"] == embedding
    assert base["state_bytes"]["optimizer"] - frozen["state_bytes"]["optimizer"] == 2 * embedding + 4
