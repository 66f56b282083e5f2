"""Paths inside a spec resolve against the spec's folder; a written spec names its files from anywhere; a local
folder never silently shadows a Hugging Face model_type."""

from __future__ import annotations

import json

import pytest
import yaml

from memopt.spec import load_spec
from memopt.spec.load import absolute_paths

from .helpers import invoke

LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 500, "max_position_embeddings": 128}


@pytest.fixture
def project(tmp_path):
    """project/specs/run.yaml naming project/specs/llama/config.json, data.txt and a scratch folder, relatively."""
    specs = tmp_path / "project" / "specs"
    (specs / "llama").mkdir(parents=True)
    (specs / "llama" / "config.json").write_text(json.dumps(LLAMA))
    (specs / "data.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    (specs / "run.yaml").write_text(
        "model: {hf: llama/config.json}\ntrain: {batch_size: 2, seq_len: 16, data: data.txt}\n"
        "strategies: [{offload_states: {folder: scratch}}]\n")
    return specs


def test_paths_in_a_spec_resolve_against_its_folder(project, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)  # elsewhere: these paths do not exist from here
    spec = load_spec(project / "run.yaml")
    assert spec.model.hf == str(project / "llama" / "config.json")
    assert spec.train.data == str(project / "data.txt")
    assert spec.strategies[0].options.folder == str(project / "scratch")
    assert spec.strategies[0].label == "offload_states:folder=scratch"  # as written


def test_a_spec_written_by_optimize_reads_back_from_any_folder(project, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(project)
    data = absolute_paths(load_spec("run.yaml").to_dict())
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "best.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    again = load_spec(tmp_path / "elsewhere" / "best.yaml")
    assert again.model.hf == str(project / "llama" / "config.json")
    assert again.train.data == str(project / "data.txt")


def test_a_local_folder_does_not_shadow_a_model_type(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(LLAMA))
    model_type = invoke(["estimate", "--hf", "gpt2", "--json", "--batch-size", "1", "--seq-len", "8"])
    assert model_type.exit_code == 0, model_type.output
    assert json.loads(model_type.stdout)["spec"]["model"]["hf"] == "gpt2"
    assert json.loads(model_type.stdout)["runs"][0]["params"]["total"] > 100_000_000  # GPT-2's, not the tiny llama's
    assert "note: model.hf: gpt2 is the model_type; for the folder of that name write ./gpt2" in model_type.stderr
    folder = invoke(["estimate", "--hf", "./gpt2", "--json", "--batch-size", "1", "--seq-len", "8"])
    assert folder.exit_code == 0 and json.loads(folder.stdout)["runs"][0]["params"]["total"] < 1_000_000
    assert "note:" not in folder.stderr
