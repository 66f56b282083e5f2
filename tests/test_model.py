"""The model builders: exact parameter counts, working forward/backward, eager == sdpa."""

import pytest
import torch

from memopt.model.transformer import build_model, parameter_count
from memopt.spec import load_spec, spec_from_data

from .helpers import CONFIGS


@pytest.mark.parametrize("source", ["tiny.yaml", "tiny-decoder.yaml", "seed.yaml", "gpt2", "tinyllama-1.1b"])
def test_built_model_matches_analytic_count(source):
    path = CONFIGS / source
    spec = load_spec(path if path.exists() else source)
    model = build_model(spec.model, device="meta")
    assert sum(p.numel() for p in model.parameters()) == parameter_count(spec.model)


def test_seed_model_has_the_documented_parameter_count():
    assert parameter_count(load_spec(None).model) == 51_976_448


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_eager_and_sdpa_attention_compute_the_same_loss(arch):
    spec = spec_from_data({"model": {"arch": arch, "d_model": 32, "n_heads": 4, "n_layers": 2, "vocab_size": 50,
                                     "max_seq_len": 16, "attention": "eager"}, "train": {"seq_len": 16}})
    torch.manual_seed(0)
    model = build_model(spec.model)
    tokens = torch.randint(50, (2, 16))
    eager = model(tokens, tokens)
    for layer in model.layers:
        layer.attention = "sdpa"
    assert torch.allclose(eager, model(tokens, tokens), rtol=1e-5)


def test_tied_embeddings_share_one_tensor():
    spec = spec_from_data({"model": {"arch": "decoder", "d_model": 32, "n_heads": 4, "n_layers": 1, "vocab_size": 50,
                                     "max_seq_len": 16, "tie_embeddings": True}, "train": {"seq_len": 16}})
    model = build_model(spec.model)
    assert model.head.weight is model.tok.weight
    assert sum(p.numel() for p in model.parameters()) == parameter_count(spec.model)


def test_build_in_low_precision():
    model = build_model(load_spec(CONFIGS / "tiny.yaml").model, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
