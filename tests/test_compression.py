"""Compression strategies: exact packed bytes, real savings, and their accuracy cost, asserted."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from memopt.analysis.estimate import estimate
from memopt.engine.step import prepare, train_step
from memopt.model.quantize import QuantLinear
from memopt.model.transformer import count_parameters
from memopt.spec import Spec, load_spec, spec_from_data
from memopt.strategies.optim8bit import AdamW8bit
from memopt.strategies.quant import Quant

from .helpers import CONFIGS, packed_bytes, run

TINY = {"model": {"d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 1000, "ffn_dim": 256, "max_seq_len": 64},
        "train": {"batch_size": 4, "seq_len": 64, "steps": 1}, "run": {"device": "cpu"}}


def tiny(*strategies: str, **model: object) -> Spec:
    return spec_from_data({**TINY, "model": {**TINY["model"], **model}}, strategies=list(strategies))


@pytest.mark.parametrize(("bits", "fmt"), [(8, "int"), (4, "int"), (4, "nf4")])
def test_quantized_weights_take_exactly_their_packed_bytes(bits, fmt):
    d, f, layers, v, s = 64, 256, 2, 1000, 64
    result = run(tiny(f"quant:bits={bits},format={fmt},group_size=32"))
    quantized = layers * (4 * d * d + 2 * d * f)                       # q, k, v, o, linear1, linear2 weights
    floats = v * d + s * d + v * d + v + layers * (4 * d + f + d + 4 * d)  # embeddings, head, biases, LayerNorms
    mem = result.memory
    assert mem.state_bytes["params"] == quantized * bits // 8 + quantized // 32 * 4 + floats * 4
    assert result.params_trainable == floats
    assert mem.state_bytes["grads"] == floats * 4
    n_float_tensors = 3 + 1 + layers * (6 + 4)  # tok, pos, head w/b; per layer 6 biases, 4 norms
    assert mem.state_bytes["optimizer"] == 2 * floats * 4 + n_float_tensors * 4


@pytest.mark.parametrize(("bits", "fmt"), [(8, "int"), (4, "int"), (4, "nf4")])
@pytest.mark.parametrize("embedding", [False, True])
def test_padded_shapes_take_exactly_their_padded_bytes(bits, fmt, embedding):
    """d_model 48 and ffn 176 with group 32: every row is padded to whole groups and the padding is stored."""
    d, f, layers, v, s = 48, 176, 2, 1000, 64
    spec = tiny(f"quant:bits={bits},format={fmt},group_size=32,embedding={str(embedding).lower()}",
                d_model=d, ffn_dim=f)
    shapes = layers * [(d, d)] * 4 + layers * [(f, d), (d, f)] + ([(v, d)] if embedding else [])
    quantized = sum(sum(packed_bytes(o, i, bits, 32)) for o, i in shapes)
    floats = (0 if embedding else v * d) + s * d + v * d + v + layers * (4 * d + f + d + 4 * d)
    result = run(spec)
    assert result.memory.state_bytes["params"] == quantized + floats * 4
    assert result.params_trainable == floats
    assert result.params_total == floats + sum(o * i for o, i in shapes)  # codes count what they stand for


def test_tiny_decoder_takes_4_bit_quant_with_lora():
    """ffn 176 is no multiple of the default group size 64: padded, no longer refused."""
    spec = load_spec(CONFIGS / "tiny-decoder.yaml", strategies=["quant:bits=4,lora=8"])
    session = prepare(spec)
    quantized = [m for m in session.model.modules() if isinstance(m, QuantLinear)]
    assert any(m.in_features % 64 for m in quantized)
    for m in quantized:
        assert (m.codes.nbytes, m.scales.nbytes) == packed_bytes(m.out_features, m.in_features, 4, 64)
    result = run(spec)
    assert math.isfinite(result.loss)
    assert result.params_trainable == sum(m.lora_a.numel() + m.lora_b.numel() for m in quantized)


@pytest.mark.parametrize("spec", [
    load_spec(CONFIGS / "tiny-decoder.yaml", strategies=["quant:bits=4,lora=8"]),
    tiny("quant:bits=4,format=nf4,group_size=32,embedding=true", d_model=48, ffn_dim=176),
    tiny("quant:bits=8,group_size=128"),
], ids=["tiny-decoder", "d48-nf4-embedding", "group-over-width"])
def test_estimate_equals_profile_on_padded_shapes(spec):
    real, traced = run(spec).memory, estimate(spec).memory
    assert traced.peak_bytes == real.peak_bytes
    assert traced.state_bytes == real.state_bytes


def test_quant_candidates_save_more_down_the_list_and_include_a_larger_group():
    """Where 128 divides the widths (as on the seed), group_size=128 halves the strongest setting's scales."""
    assert any("group_size" in c for c in Quant.candidates)
    models = [prepare(tiny({"quant": c}, d_model=128, ffn_dim=512)).model for c in Quant.candidates]
    params = [sum(p.untyped_storage().nbytes() for p in model.parameters()) for model in models]
    assert params == sorted(params, reverse=True) and params[-1] < params[-2]


def test_with_lora_only_the_adapters_train_exactly():
    d, f, layers, r = 64, 256, 2, 8
    result = run(tiny("quant:bits=4,lora=8"))
    adapters = layers * (4 * r * (d + d) + r * (d + f) + r * (f + d))
    assert result.params_trainable == adapters
    assert result.memory.state_bytes["grads"] == adapters * 4
    assert result.memory.state_bytes["optimizer"] == 2 * adapters * 4 + layers * 6 * 2 * 4


def test_backward_keeps_at_most_two_dequantized_weights():
    spec = spec_from_data({"model": {"d_model": 256, "n_heads": 4, "n_layers": 2, "vocab_size": 64, "ffn_dim": 1024,
                                     "max_seq_len": 8}, "train": {"batch_size": 1, "seq_len": 8, "steps": 1},
                           "run": {"device": "cpu"}}, strategies=["quant:bits=4,lora=4"])
    largest = 1024 * 256 * 4
    mem = run(spec).memory
    assert mem.category_peak_bytes["temporaries"] <= 2 * largest
    assert mem.category_peak_bytes["activations"] < largest  # no dequantized weight is saved for backward


@pytest.mark.parametrize(("strategy", "limit"), [("quant:bits=8", 0.01), ("quant:bits=4", 0.10),
                                                  ("quant:bits=4,format=nf4", 0.10)])
def test_logits_drift_within_limits_and_reported(strategy, limit):
    drift = run(tiny(strategy)).drift
    assert drift is not None and 0 < drift["logits_rel_error"] <= limit
    assert abs(drift["loss_delta"]) < 0.05


def test_lossless_runs_report_no_drift():
    assert run(tiny("ckpt")).drift is None


def test_lora_gets_gradients_and_quantized_base_stays_bit_identical():
    session = prepare(tiny("quant:bits=4,lora=8"))
    quantized = [m for m in session.model.modules() if isinstance(m, QuantLinear)]
    before = [(m.codes.clone(), m.scales.clone()) for m in quantized]
    from memopt.engine.step import forward_backward, make_batch

    forward_backward(session, make_batch(session.spec, "cpu"))
    for m in quantized:
        assert m.codes.grad is None and m.scales.grad is None
        assert m.lora_a.grad is not None and m.lora_b.grad is not None and m.lora_b.grad.abs().sum() > 0
    session.optimizer.step()
    for m, (codes, scales) in zip(quantized, before):
        assert torch.equal(m.codes, codes) and torch.equal(m.scales, scales)


def test_optim8bit_state_is_a_quarter_of_adamw():
    adamw = run(tiny()).memory.state_bytes["optimizer"]
    eight = run(tiny("optim8bit")).memory.state_bytes["optimizer"]
    assert eight <= 0.27 * adamw


def test_optim8bit_converges_like_adamw_on_a_regression():
    def train(make) -> float:
        torch.manual_seed(0)
        x = torch.randn(512, 32)
        y = x @ torch.randn(32, 1) + 0.01 * torch.randn(512, 1)
        model = nn.Linear(32, 1)
        opt = make(model.parameters())
        for _ in range(200):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return nn.functional.mse_loss(model(x), y).item()

    reference = train(lambda p: torch.optim.AdamW(p, lr=3e-2))
    assert abs(train(lambda p: AdamW8bit(p, lr=3e-2)) - reference) <= 0.05 * reference


def test_prune_ffn_half_cuts_exactly_and_still_trains():
    base = tiny()
    pruned = tiny("prune:ffn=0.5")
    removed = 2 * 128 * (2 * 64 + 1)          # per layer: 128 channels x (linear1 row + bias + linear2 column)
    session = prepare(pruned)
    assert count_parameters(session.model)[0] == count_parameters(prepare(base).model)[0] - removed
    loss = train_step(session)
    assert loss == loss  # not NaN: forward, backward and the step ran


def test_prune_heads_on_grouped_query_decoder():
    spec = spec_from_data({"model": {"arch": "decoder", "d_model": 64, "n_heads": 8, "n_kv_heads": 4, "n_layers": 1,
                                     "vocab_size": 100, "max_seq_len": 16}, "train": {"seq_len": 16, "steps": 1}},
                          strategies=["prune:heads=0.5"])
    session = prepare(spec)
    attn = session.model.layers[0].attn
    assert (attn.n_heads, attn.n_kv_heads, attn.q.out_features, attn.k.out_features) == (4, 2, 32, 16)
    train_step(session)


def test_adafactor_optimizer_keeps_factored_state():
    adamw = run(tiny()).memory.state_bytes["optimizer"]
    spec = spec_from_data({**tiny().to_dict(), "train": {**tiny().to_dict()["train"], "optimizer": "adafactor"}})
    assert run(spec).memory.state_bytes["optimizer"] < 0.1 * adamw


def test_optim8bit_drift_is_taken_after_identical_training_steps():
    """Its cost shows only once the optimizer steps (before a step it read 0 whatever the error): drift is
    taken after 3 identical steps; weight strategies are still taken before any step; lossless ones have none."""
    from memopt.analysis.drift import DRIFT_STEPS, strategy_drift

    drift = strategy_drift(tiny("optim8bit"))
    assert drift is not None and drift["after_steps"] == DRIFT_STEPS == 3
    assert 1e-6 < drift["logits_rel_error"] < 0.5
    assert strategy_drift(tiny("ckpt")) is None
    weights = strategy_drift(tiny("quant:bits=8"))
    assert weights is not None and weights["after_steps"] == 0 and weights["logits_rel_error"] > 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_compression_splits_encoder_attention_in_the_model_dtype(dtype):
    """nn.MultiheadAttention split into Linears for quant/prune keeps the model's dtype (was float32: a
    mixed-dtype LayerNorm error in 16-bit models)."""
    for setting in ("quant:bits=4", "prune:heads=0.5"):
        result = run(spec_from_data({**TINY, "run": {"device": "cpu", "dtype": dtype}}, strategies=[setting]))
        assert result.memory is not None and result.params_total > 0
