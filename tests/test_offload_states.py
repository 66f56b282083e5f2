"""offload_states: model states off the device, lossless, with the resident bytes its design says."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memopt.analysis.estimate import estimate
from memopt.core.errors import StrategyError
from memopt.engine.step import make_batch, prepare, train_step
from memopt.spec import Spec, load_spec, spec_from_data
from memopt.strategies.base import SavedTensors
from memopt.strategies.offload_states import CHUNK_ELEMENTS
from memopt.strategies.tiers import DiskTier
from memopt.strategies.vocab_stream import VocabRows, embedding_forward, logits_forward, streamed_cross_entropy

from .helpers import CONFIGS, ROOT, run

MIXES = ["offload_states", "offload_states:params=true", "offload_states:params=true+ckpt+chunked_ce",
         "offload_states:params=true+optim_in_bwd", "offload_states:params=true,prefetch=0+ckpt",
         "offload_states+accum:micro_batches=2",
         "offload_states:params=true,vocab_rows=300+chunked_ce+accum:micro_batches=2"]


def spec_with(strategies: str, config: str = "tiny-decoder.yaml") -> Spec:
    return load_spec(CONFIGS / config, strategies=strategies.split("+") if strategies else None)


def trained(spec: Spec, steps: int = 3) -> tuple[list[float], list[torch.Tensor | None], list[torch.Tensor]]:
    """Losses of ``steps`` steps, the last step's gradients (before its update) and the parameters after it."""
    session = prepare(spec)
    losses: list[float] = []
    grads: list[torch.Tensor | None] = []

    def keep_grads(s):
        grads[:] = (s.optimizer.gradients() if hasattr(s.optimizer, "gradients")
                    else [p.grad.clone() if p.grad is not None else None for p in s.model.parameters()])

    for step in range(steps):
        losses.append(train_step(session, step=step, before_step=keep_grads if step == steps - 1 else None))
    units = next((s.units for s in session.strategies if s.name == "offload_states"), None)
    if units is not None:
        for p in units.all_params():
            units.load_param(p)
    return losses, grads, [p.detach().clone() for p in session.model.parameters()]


@pytest.mark.parametrize("mix", ["offload_states", "offload_states:params=true+ckpt+chunked_ce",
                                 "offload_states+accum:micro_batches=2"])
def test_lossless_loss_gradients_and_parameters_equal_the_baseline_after_three_steps(mix):
    base = trained(spec_with("+".join(s for s in mix.split("+") if not s.startswith("offload_states"))))
    new = trained(spec_with(mix))
    assert new[0] == pytest.approx(base[0], rel=1e-6)
    assert len(new[1]) == len(base[1]) and len(new[2]) == len(base[2])
    for a, b in zip(base[1], new[1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    for a, b in zip(base[2], new[2]):  # the streamed head sums its log-sum-exp in another order: AdamW's normalised
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)  # update carries that rounding into parameters


def test_with_optim_in_bwd_parameters_equal_the_baseline_after_three_steps():
    base, new = trained(spec_with("optim_in_bwd")), trained(spec_with("offload_states:params=true+optim_in_bwd"))
    assert new[0] == pytest.approx(base[0], rel=1e-6)
    for a, b in zip(base[2], new[2]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def _units(spec: Spec) -> list[int]:
    strategy = next(s for s in prepare(spec).strategies if s.name == "offload_states")
    return [sum(p.untyped_storage().nbytes() if p.untyped_storage().nbytes() else strategy.units.nbytes[id(p)]
                for p in unit) for unit in strategy.units.params]


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_resident_parameters_are_the_running_unit_and_the_prefetched_ones_exactly(prefetch):
    spec = spec_with(f"offload_states:params=true,prefetch={prefetch}")
    sizes = _units(spec)
    window = prefetch + 1
    embedding = 1000 * 64 * 4  # streamed in chunks of vocabulary rows: one chunk here (64,000 elements < 2^20)
    expected = max(embedding, *(sum(sizes[i:i + window]) for i in range(len(sizes) - window + 1)))
    result = run(spec)
    assert result.memory.category_peak_bytes["params"] == expected
    assert result.memory.state_bytes["params"] == 0  # released after the optimizer step
    assert len(sizes) == 2 + 1 + 1  # the 2 layers, the final norm, the head (no chunked loss: read whole)


@pytest.mark.parametrize("rows", [300, 0])
def test_the_embedding_and_head_are_read_in_chunks_of_vocabulary_rows(rows):
    """With chunked_ce the head streams too; 1000 rows in chunks of 300 (the last one 100); 0 keeps them units."""
    spec = spec_with(f"offload_states:params=true,prefetch=0,vocab_rows={rows}+chunked_ce")
    sizes = _units(spec)
    result = run(spec)
    if rows:
        assert len(sizes) == 2 + 1
        assert result.memory.category_peak_bytes["params"] == max(*sizes, rows * 64 * 4)
        assert result.strategy_facts["offload_states"]["vocab_rows_per_chunk"] == rows
    else:
        assert len(sizes) == 2 + 2 + 1
        assert result.memory.category_peak_bytes["params"] == max(sizes) == 1000 * 64 * 4
        assert "vocab_rows_per_chunk" not in result.strategy_facts["offload_states"]


@pytest.mark.parametrize("mix", ["optim_in_bwd", "accum:micro_batches=2", "ckpt"])
def test_streamed_vocabulary_rows_train_as_the_baseline(mix):
    """Embedding and head in 4 chunks of rows (300, 300, 300, 100): the same losses, gradients and parameters."""
    rest = f"+chunked_ce+{mix}"
    base = trained(spec_with(rest.strip("+")))
    new = trained(spec_with(f"offload_states:params=true,vocab_rows=300{rest}"))
    assert new[0] == pytest.approx(base[0], rel=1e-6)
    if mix != "optim_in_bwd":  # stepped in backward: no gradient is left to compare
        for a, b in zip(base[1], new[1]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    for a, b in zip(base[2], new[2]):  # within 1% of one AdamW update (lr 1e-3): rounding, as above
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_resident_optimizer_state_is_one_parameters_state_exactly():
    spec = spec_with("offload_states")
    session = prepare(spec)
    largest = max(p.numel() for p in session.model.parameters() if p.requires_grad)
    result = run(spec)
    assert result.memory.state_bytes["optimizer"] == 0
    assert result.memory.state_bytes["grads"] == 0
    # exp_avg and exp_avg_sq of one chunk of one parameter (the step count is a Python int)
    assert result.memory.category_peak_bytes["optimizer"] == 2 * min(largest, CHUNK_ELEMENTS) * 4
    baseline = run(spec_with(""))
    assert result.memory.peak_bytes < baseline.memory.peak_bytes
    moved = result.strategy_facts["offload_states"]
    assert moved["moved_off_device_bytes"] > 0 and moved["moved_to_device_bytes"] > 0


@pytest.mark.parametrize("mix", MIXES)
def test_estimate_equals_profile(mix):
    spec = spec_with(mix)
    real, traced = run(spec), estimate(spec)
    assert traced.memory.peak_bytes == real.memory.peak_bytes
    assert traced.strategy_facts["offload_states"]["moved_off_device_bytes"] == pytest.approx(
        real.strategy_facts["offload_states"]["moved_off_device_bytes"] / spec.train.steps, rel=0.35)


@pytest.mark.parametrize(("strategies", "message"), [
    (["offload_states:optimizer=false"], "set optimizer and/or params to true"),
    (["offload_states:target=cpu"], "target: cpu on a CPU device moves nothing"),
    (["offload_states", "optim8bit"], "offload_states+optim8bit: refused"),
])
def test_refusals_name_the_reason(strategies, message):
    from memopt.strategies import build_strategies

    spec = load_spec(CONFIGS / "tiny.yaml", strategies=strategies)
    with pytest.raises(StrategyError, match=message.replace("+", r"\+")):
        build_strategies(spec, "cpu")


def test_a_full_disk_is_one_error_and_leaves_no_files(tmp_path):
    """A write limit (RLIMIT_FSIZE) stands for a full disk: the write fails mid-step."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    def limit():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    out = subprocess.run([sys.executable, "-m", "memopt", "profile", str(CONFIGS / "tiny.yaml"), "-s",
                          f"offload_states:folder={scratch}"], capture_output=True, text=True, cwd=ROOT,
                         preexec_fn=limit, env={**os.environ, "COLUMNS": "200"}, timeout=300)
    assert out.returncode == 1, out.stderr
    lines = [line for line in out.stderr.strip().splitlines() if not line.startswith("[")]  # less progress lines
    assert len(lines) == 1 and "offload_states: writing to" in lines[0] and "File too large" in lines[0], lines
    assert "Traceback" not in out.stderr
    assert list(scratch.iterdir()) == []


def test_files_are_removed_when_the_run_ends(tmp_path):
    spec = load_spec(CONFIGS / "tiny.yaml", strategies=[f"offload_states:params=true,folder={tmp_path}"])
    run(spec)
    assert list(Path(tmp_path).iterdir()) == []


def test_batches_are_untouched(tiny_decoder):
    """The strategy never changes the data: the same batch as the baseline."""
    a = make_batch(tiny_decoder, "cpu", 1)[0]
    b = make_batch(spec_with("offload_states"), "cpu", 1)[0]
    assert torch.equal(a, b)


CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("mix", ["offload_states", "offload_states:params=true+ckpt+chunked_ce",
                                 "offload_states:params=true+optim_in_bwd"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA)])
def test_on_cuda_states_live_in_pinned_cpu_memory_and_training_is_unchanged(device, mix):
    def on(spec_text: str) -> Spec:
        return load_spec(CONFIGS / "tiny-decoder.yaml", {"device": device},
                         strategies=spec_text.split("+") if spec_text else None)

    rest = "+".join(s for s in mix.split("+") if not s.startswith("offload_states"))
    base, new = trained(on(rest)), trained(on(mix))
    # the optimizer steps on the CPU here: CPU and CUDA arithmetic agree to rounding, not to the bit
    assert new[0] == pytest.approx(base[0], rel=1e-4)
    for a, b in zip(base[2], new[2]):
        torch.testing.assert_close(b.cpu(), a.cpu(), rtol=1e-3, atol=1e-5)
    result = run(on(mix))
    assert result.memory.state_bytes["optimizer"] == 0 and result.memory.state_bytes["grads"] == 0
    assert result.strategy_facts["offload_states"]["target"] == "cpu"
    # a CUDA estimate traces CPU kernels: it is off the run by what it is off the run without the strategy
    gap = estimate(on(rest)).memory.peak_bytes - run(on(rest)).memory.peak_bytes
    assert estimate(on(mix)).memory.peak_bytes - result.memory.peak_bytes == pytest.approx(
        gap, abs=0.01 * result.memory.peak_bytes)


class _Gradients:
    """The optimizer's side of VocabRows: keeps the streamed gradient's chunks."""

    def __init__(self, like: torch.Tensor):
        self.grad = torch.zeros_like(like)
        self.done = 0

    def add_streamed_grad(self, p, start_row, grad):
        self.grad[start_row:start_row + grad.shape[0]] += grad

    def streamed_grad_done(self, p):
        self.done += 1


def _streamed(weight: torch.Tensor, rows: int, tmp_path: Path) -> tuple[VocabRows, _Gradients]:
    tier = DiskTier("test", "vocab-", str(tmp_path))
    param = torch.nn.Parameter(torch.empty(0))
    param.data = weight.detach().clone()
    tier.put("w", param.data)
    source = VocabRows(param, "w", tier, rows, SavedTensors())
    source.gradients = gradients = _Gradients(weight)
    return source, gradients


@pytest.mark.parametrize("rows", [7, 64, 1000])
def test_streamed_embedding_and_cross_entropy_equal_torch(rows, tmp_path):
    """Vocabulary 100 in chunks of 7 (the last one 2), 64 and all: the padding row gets no gradient, targets of
    -100 add nothing, and the loss, the hidden states' gradient and the weight's gradient are torch's."""
    gen = torch.Generator().manual_seed(0)
    vocab, d = 100, 16
    weight = torch.randn(vocab, d, generator=gen)
    ids = torch.randint(vocab, (3, 20), generator=gen)
    ids[0, :4] = 5  # the padding id, a few times
    reference = torch.nn.Embedding(vocab, d, padding_idx=5)
    reference.weight.data.copy_(weight)
    out_ref = reference(ids)
    grad_out = torch.randn(out_ref.shape, generator=gen)
    out_ref.backward(grad_out)
    module = torch.nn.Embedding(vocab, d, padding_idx=5)
    source, grads = _streamed(weight, rows, tmp_path)
    out = embedding_forward(module, source)(ids)
    out.backward(grad_out)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(grads.grad, reference.weight.grad)
    assert grads.done == 1 and module.weight.grad is None

    hidden = torch.randn(60, d, generator=gen, requires_grad=True)
    targets = torch.randint(vocab, (60,), generator=gen)
    targets[::7] = -100
    head = torch.nn.Parameter(weight.clone())
    loss_ref = torch.nn.functional.cross_entropy(hidden @ head.t(), targets, reduction="sum") / targets.numel()
    loss_ref.backward()
    grad_hidden_ref, hidden.grad = hidden.grad, None
    source, grads = _streamed(weight, rows, tmp_path)
    loss = streamed_cross_entropy(source, hidden, source.param, targets)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(hidden.grad, grad_hidden_ref)
    torch.testing.assert_close(grads.grad, head.grad)
    with torch.no_grad():
        torch.testing.assert_close(logits_forward(source)(hidden), hidden @ weight.t())


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_hugging_face_embedding_and_head_stream_unless_tied(model_type, tmp_path):
    """A tiny HF llama streams both (vocabulary 500 in chunks of 128) and trains as without offload_states; GPT-2
    ties its head to its embedding, so both stay one unit."""
    pytest.importorskip("transformers")
    shape = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=176, max_position_embeddings=128) if model_type == "llama"
             else dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 500, **shape}))

    def spec(strategies: list[str]) -> Spec:
        return spec_from_data({"model": {"hf": str(tmp_path)}, "train": {"batch_size": 2, "seq_len": 32, "steps": 1},
                               "run": {"device": "cpu"}}, strategies=strategies)

    streamed = spec(["offload_states:params=true,vocab_rows=128", "chunked_ce"])
    base, new = trained(spec(["chunked_ce"])), trained(streamed)
    assert new[0] == pytest.approx(base[0], rel=1e-6)
    for a, b in zip(base[2], new[2]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    facts = run(streamed).strategy_facts["offload_states"]
    assert facts.get("vocab_rows_per_chunk") == (128 if model_type == "llama" else None)
