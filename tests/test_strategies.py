"""Each strategy keeps the numbers (loss, gradients) and really saves the bytes its theory says."""

from __future__ import annotations

import tempfile

import pytest
import torch

from memopt.analysis.theory import amp_saving, expected_saving, layer_input_bytes, one_layer_spec
from memopt.core.errors import SpecError, StrategyError
from memopt.engine.step import forward_backward, make_batch, prepare, train_step
from memopt.spec import Spec, load_spec, spec_from_data

from .helpers import CONFIGS, invoke, memtracker_peak, run


def with_strategies(spec: Spec, *names: str) -> Spec:
    return load_spec(CONFIGS / "tiny.yaml", strategies=list(names)) if spec is None else spec_from_data(
        spec.to_dict(), strategies=list(names))


def loss_and_grads(spec: Spec) -> tuple[float, list[torch.Tensor]]:
    session = prepare(spec)
    tokens, targets = make_batch(spec, session.device)
    loss = forward_backward(session, (tokens, targets))
    return loss, [p.grad.clone() for p in session.model.parameters()]


def assert_same_numbers(reference, other, rel: float):
    (loss_a, grads_a), (loss_b, grads_b) = reference, other
    assert abs(loss_a - loss_b) <= rel * abs(loss_a)
    assert len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b):
        assert (a - b).norm() <= rel * a.norm() + 1e-12


@pytest.mark.parametrize("strategy", ["ckpt", "ckpt:policy=every,every=2", "ckpt:policy=selective",
                                      "chunked_ce:chunk_size=48", "accum:micro_batches=4", "sdpa"])
@pytest.mark.parametrize("config", ["tiny.yaml", "tiny-decoder.yaml"])
def test_lossless_strategies_keep_loss_and_gradients(config, strategy):
    base = load_spec(CONFIGS / config)
    assert_same_numbers(loss_and_grads(base), loss_and_grads(spec_from_data(base.to_dict(), strategies=[strategy])),
                        rel=1e-5)


def test_offload_is_bitwise_equal(tiny):
    (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(tiny), loss_and_grads(with_strategies(tiny, "offload"))
    assert loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_optim_in_bwd_matches_a_normal_adamw_step(tiny):
    params = []
    for spec in (tiny, with_strategies(tiny, "optim_in_bwd")):
        session = prepare(spec)
        train_step(session)
        train_step(session)
        params.append([p.detach().clone() for p in session.model.parameters()])
    for a, b in zip(*params):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


# ---- savings held to their theory --------------------------------------------------------------------

def acts(spec: Spec) -> int:
    return run(spec).memory.category_peak_bytes["activations"]


def test_full_ckpt_keeps_layer_inputs_plus_one_layer(tiny):
    bound = tiny.model.n_layers * layer_input_bytes(tiny) + acts(one_layer_spec(tiny))  # + 1 layer + head
    measured = acts(with_strategies(tiny, "ckpt"))
    assert measured <= 1.15 * bound
    assert measured < 0.5 * acts(tiny)


def test_every_and_selective_ckpt_save_less_than_baseline_more_than_full(tiny):
    base, full = acts(tiny), acts(with_strategies(tiny, "ckpt"))
    for policy in ("ckpt:policy=every,every=2", "ckpt:policy=selective"):
        assert full < acts(with_strategies(tiny, policy)) < base


@pytest.mark.parametrize("policy", ["ckpt", "ckpt:policy=every,every=2", "ckpt:policy=selective"])
@pytest.mark.parametrize("config", ["tiny.yaml", "tiny-decoder.yaml"])
def test_each_ckpt_policy_saves_its_theory(config, policy):
    """memopt/theory.py: what stays is the layer inputs (selective: plus the matmul outputs) and the head's
    activations at the end of forward, or the layers below plus one recomputed layer in backward."""
    spec = load_spec(CONFIGS / config)
    base = run(spec).memory.category_peak_bytes
    category, theory = expected_saving(policy, spec, base, acts(one_layer_spec(spec)))
    saving = base[category] - run(with_strategies(spec, policy)).memory.category_peak_bytes[category]
    assert theory > 0.05 * base[category]
    assert abs(saving - theory) <= 0.02 * theory


def test_chunked_ce_removes_the_logits():
    spec = spec_from_data({"model": {"d_model": 64, "n_heads": 4, "n_layers": 1, "vocab_size": 2000,
                                     "max_seq_len": 64},
                           "train": {"batch_size": 32, "seq_len": 64, "steps": 1}, "run": {"device": "cpu"}})
    b, s, v = 32, 64, 2000
    saving = run(spec).memory.peak_bytes - run(with_strategies(spec, "chunked_ce:chunk_size=64")).memory.peak_bytes
    assert saving >= 0.9 * 3 * b * s * v * 4


def test_auto_chunk_size_rule():
    """Smallest power of two with chunk x vocab >= 2 x tokens x d_model, at least 64, at most the tokens."""
    from memopt.strategies.chunked_ce import auto_chunk_size

    assert auto_chunk_size(4096, 512, 32000) == 256    # the seed shape: what the old fixed default was
    assert auto_chunk_size(16384, 512, 32000) == 1024  # 4x the tokens, 4x the chunk
    assert auto_chunk_size(4096, 4096, 32000) == 2048  # llama-7b's widths
    assert auto_chunk_size(1024, 512, 32000) == 64     # the seed under accum:micro_batches=4
    assert auto_chunk_size(512, 512, 32000) == 64      # ... and 8: the floor
    assert auto_chunk_size(256, 64, 1000) == 64        # tiny: 4 chunks, where 256 was one
    assert auto_chunk_size(256, 64, 20000) == 64
    assert auto_chunk_size(8, 4096, 1000) == 8         # never more than the tokens
    assert auto_chunk_size(1, 8, 100000) == 1


def test_auto_chunk_on_a_large_vocab_saves_like_a_small_chunk():
    """batch 4 x seq 64 = 256 tokens: the old fixed 256 did no chunking (78% of the baseline's peak)."""
    spec = spec_from_data({"model": {"d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 20000,
                                     "ffn_dim": 256, "max_seq_len": 64},
                           "train": {"batch_size": 4, "seq_len": 64, "steps": 1}, "run": {"device": "cpu"}})
    base = run(spec).memory.peak_bytes
    small = run(with_strategies(spec, "chunked_ce:chunk_size=64")).memory.peak_bytes
    auto = run(with_strategies(spec, "chunked_ce")).memory.peak_bytes
    assert auto <= 1.03 * small
    assert auto < 0.65 * base


def test_auto_chunk_is_taken_from_the_micro_batch_and_keeps_the_numbers(tiny, monkeypatch):
    from memopt.strategies import chunked_ce

    seen, rule = [], chunked_ce.auto_chunk_size

    def recording(tokens: int, d_model: int, vocab: int) -> int:
        seen.append((tokens, d_model, vocab))
        return rule(tokens, d_model, vocab)

    monkeypatch.setattr(chunked_ce, "auto_chunk_size", recording)
    run(with_strategies(tiny, "chunked_ce", "accum:micro_batches=4"))
    m, t = tiny.model, tiny.train
    assert seen and set(seen) == {(t.batch_size // 4 * t.seq_len, m.d_model, m.vocab_size)}
    assert_same_numbers(loss_and_grads(tiny), loss_and_grads(with_strategies(tiny, "chunked_ce")), rel=1e-5)


def test_accum_of_four_quarters_activations(tiny):
    assert acts(with_strategies(tiny, "accum:micro_batches=4")) <= 0.3 * acts(tiny)


def test_optim_in_bwd_keeps_at_most_two_gradients_alive(tiny):
    largest = max(p.numel() * 4 for p in prepare(tiny).model.parameters())
    grads = run(with_strategies(tiny, "optim_in_bwd")).memory.category_peak_bytes["grads"]
    assert 0 < grads <= 2 * largest


def test_offload_leaves_under_a_tenth_of_saved_activations(tiny):
    result = run(with_strategies(tiny, "offload"))
    assert result.memory.category_peak_bytes["activations"] <= 0.1 * acts(tiny)
    assert result.strategy_facts["offload"]["moved_off_device_bytes"] > 0.8 * acts(tiny)


def test_sdpa_removes_the_score_tensors(tiny):
    m, t = tiny.model, tiny.train
    scores = m.n_layers * t.batch_size * m.n_heads * t.seq_len ** 2 * 4
    assert acts(tiny) - acts(with_strategies(tiny, "sdpa")) >= 0.9 * scores


@pytest.mark.parametrize("config", ["tiny.yaml", "tiny-decoder.yaml"])
def test_amp_saves_what_autocast_stores_in_16_bits(config):
    """Theory: half of what the matmuls save, less the 16-bit weight copies (exact on the encoder, whose
    only other 16-bit saved tensors are softmax/ReLU outputs the matmuls save too; a lower bound on the
    decoder, whose SiLU and products of matmul outputs stay 16-bit as well)."""
    base_spec = load_spec(CONFIGS / config)
    base, amp = run(base_spec), run(with_strategies(base_spec, "amp"))
    theory = amp_saving(base_spec)
    saving = base.memory.category_peak_bytes["activations"] - amp.memory.category_peak_bytes["activations"]
    assert theory > 0.15 * base.memory.category_peak_bytes["activations"]
    if base_spec.model.arch == "encoder":
        assert abs(saving - theory) <= 0.01 * theory
    else:
        assert theory <= saving <= 0.5 * base.memory.category_peak_bytes["activations"]
    assert abs(amp.loss - base.loss) < 0.01 * base.loss


def test_full_ckpt_peak_agrees_with_pytorch_memtracker(tiny):
    spec = with_strategies(tiny, "ckpt")
    assert run(spec).memory.peak_bytes == memtracker_peak(spec)


# ---- refusals and cleanup ------------------------------------------------------------------------------

def test_refused_combination_names_both_and_why(tiny):
    with pytest.raises(StrategyError, match=r"optim_in_bwd\+accum: refused: gradients must accumulate"):
        prepare(with_strategies(tiny, "accum", "optim_in_bwd"))


@pytest.mark.parametrize(("strategies", "message"), [
    ("accum,optim_in_bwd", "optim_in_bwd+accum: refused"),
    ("ckpt:polcy=full", "ckpt.polcy: unknown option; did you mean policy?"),
    ("ckpt:policy=half", "ckpt.policy"),
    ("ckpt:every=0", "ckpt.every"),
    ("accum:micro_batches=3", "accum.micro_batches: 3 does not divide train.batch_size 4"),
    ("offload:target=cpu", "offload.target: cpu on a CPU device moves nothing"),
    ("sdpa", "sdpa: model.attention is already sdpa"),
    ("chekpoint", "unknown strategy"),
])
def test_bad_strategy_input_exits_1_naming_strategy_and_option(tmp_path, strategies, message):
    config = tmp_path / "spec.yaml"
    text = (CONFIGS / ("tiny-decoder.yaml" if strategies == "sdpa" else "tiny.yaml")).read_text()
    config.write_text(text.replace("attention: eager", "attention: sdpa"))
    result = invoke(["profile", config, "--strategies", strategies])
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_strategy_listed_twice_is_an_error(tiny):
    with pytest.raises(SpecError, match="ckpt is listed more than once"):
        with_strategies(tiny, "ckpt", "ckpt:policy=every")


def test_offload_to_disk_leaves_no_file_also_when_the_step_raises(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    run(with_strategies(tiny, "offload"))
    assert list(tmp_path.iterdir()) == []
    session = prepare(with_strategies(tiny, "offload"))
    first = next(session.model.parameters())

    def boom(grad):
        raise RuntimeError("failure in the middle of backward")

    first.register_hook(boom)
    tokens, targets = make_batch(session.spec, "cpu")
    with pytest.raises(RuntimeError, match="failure in the middle"):
        forward_backward(session, (tokens, targets))
    assert session.strategies[0].moved_tensors > 0
    assert list(tmp_path.iterdir()) == []


def test_strategies_command_lists_every_strategy():
    result = invoke(["strategies"])
    assert result.exit_code == 0
    for name in ("ckpt", "offload", "sdpa", "chunked_ce", "amp", "accum", "optim_in_bwd"):
        assert name in result.output
