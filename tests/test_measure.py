"""The tensor tracker: exact state bytes, exact activations, agreement with independent counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memopt.core._torch_private import saved_tensors_by_node
from memopt.engine.step import make_batch, prepare, train_step
from memopt.measure.tracker import ModelWatch, TensorTracker, host_peaks
from memopt.model.transformer import parameter_count
from memopt.spec import load_spec, spec_from_data

from .helpers import CONFIGS, ROOT, memtracker_peak, run


def _saved_storages(loss: torch.Tensor, exclude: set[int]) -> int:
    """Independent count: walk the autograd graph and sum the unique storages its nodes saved."""
    seen: dict[int, int] = {}
    for _, t in saved_tensors_by_node(loss):
        st = t.untyped_storage()
        if st._cdata not in exclude:
            seen[st._cdata] = st.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("config", ["tiny.yaml", "tiny-decoder.yaml"])
def test_state_bytes_are_exact(config):
    spec = load_spec(CONFIGS / config)
    mem = run(spec).memory
    n = parameter_count(spec.model)
    n_tensors = len([p for p in prepare(spec).model.parameters()])
    assert mem.state_bytes["params"] == n * 4
    assert mem.state_bytes["grads"] == n * 4
    assert mem.state_bytes["optimizer"] == 2 * n * 4 + n_tensors * 4  # exp_avg, exp_avg_sq, float32 step
    assert mem.state_bytes["buffers"] == (0 if spec.model.arch == "encoder" else 2 * 64 * 4 * 4)


def test_seed_state_bytes_are_exact():
    spec = load_spec(None, {"batch_size": 1, "seq_len": 16, "steps": 1, "device": "cpu"})
    result = run(spec)
    assert result.params_total == 51_976_448
    assert result.memory.state_bytes["params"] == 51_976_448 * 4
    assert result.memory.state_bytes["grads"] == 51_976_448 * 4


def test_activations_of_linear_relu_stack_are_exact_to_the_byte():
    b, d, layers = 32, 128, 5
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(d, d), nn.ReLU())])
    tracker = TensorTracker("cpu")
    with tracker:
        watch = ModelWatch(tracker, model, None)
        tracker.begin_step()
        with tracker.saved_tensors():
            x = torch.randn(b, d)
            loss = model(x).sum()
            at_end_of_forward = tracker.bytes["activations"]
            loss.backward()
        del x, loss
        watch.close()
    # each Linear saves its input; each ReLU its output (the next Linear's input): x plus 5 outputs
    expected = (layers + 1) * b * d * 4
    assert at_end_of_forward == expected
    assert tracker.result().category_peak_bytes["activations"] == expected
    assert tracker.bytes["activations"] == 0  # all released by backward


@pytest.mark.parametrize("config", ["tiny.yaml", "tiny-decoder.yaml"])
def test_activations_agree_with_graph_walk(config):
    spec = load_spec(CONFIGS / config)
    session = prepare(spec)
    train_step(session)
    params = {p.untyped_storage()._cdata for p in session.model.parameters()}
    params |= {b.untyped_storage()._cdata for b in session.model.buffers()}
    tracker = TensorTracker("cpu")
    with tracker:
        watch = ModelWatch(tracker, session.model, session.optimizer)
        tokens, targets = make_batch(spec, "cpu")
        with tracker.saved_tensors():
            loss = session.model(tokens, targets)
        tracked = tracker.bytes["activations"]
        watch.close()
    independent = _saved_storages(loss, params)
    assert independent > 0
    assert abs(tracked - independent) <= 0.02 * independent


def test_two_runs_give_the_same_peak_to_the_byte(tiny):
    assert run(tiny).memory.peak_bytes == run(tiny).memory.peak_bytes


def test_peak_breakdown_sums_to_peak_and_phases_bound_it(tiny_decoder):
    mem = run(tiny_decoder).memory
    assert sum(mem.peak_breakdown.values()) == mem.peak_bytes
    assert max(mem.phase_peak_bytes.values()) == mem.peak_bytes
    for c, v in mem.peak_breakdown.items():
        assert v <= mem.category_peak_bytes[c]


def test_total_peak_agrees_with_pytorch_memtracker(tiny):
    """Where MemTracker works (no frozen params, no module called twice) its peak is a reference."""
    assert run(tiny).memory.peak_bytes == memtracker_peak(tiny)


def test_tracemalloc_does_not_see_tensors_but_the_tracker_does():
    tracker = TensorTracker("cpu")
    with host_peaks("cpu") as host, tracker:
        big = torch.empty(16 * 2**20, dtype=torch.float32)  # 64 MiB
        del big
    assert tracker.result().peak_bytes == 64 * 2**20
    assert host.python_heap_peak_bytes < 2**20


def test_device_memory_limit_raises_naming_the_phase(tiny):
    from memopt.core.errors import OutOfMemory

    with pytest.raises(OutOfMemory, match="during (forward|backward|optimizer)"):
        run(tiny, device_memory=4 * 2**20)


def test_decoder_gqa_config_runs_and_counts():
    spec = spec_from_data({"model": {"arch": "decoder", "d_model": 96, "n_heads": 6, "n_kv_heads": 2, "n_layers": 2,
                                     "vocab_size": 300, "max_seq_len": 32}, "train": {"batch_size": 2, "seq_len": 32,
                                                                                     "steps": 1}})
    result = run(spec)
    assert result.params_total == parameter_count(spec.model)
    assert result.memory.state_bytes["params"] == parameter_count(spec.model) * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tracker_agrees_with_max_memory_allocated():
    spec = load_spec(None, {"batch_size": 4, "seq_len": 256, "steps": 2, "device": "cuda"})
    result = run(spec)
    allocated = result.host.cuda["max_allocated_bytes"]
    assert abs(result.memory.peak_bytes - allocated) <= 0.01 * allocated


def test_the_tiny_profile_is_pinned_to_the_byte():
    """Refactors must keep every number: tiny's peak, its split, each category's peak, the state and the phase
    peaks equal the repository baseline exactly (tests/baselines/tiny.json, written before the model seam)."""
    import json


    pinned = json.loads((ROOT / "tests" / "baselines" / "tiny.json").read_text())["runs"][0]
    memory = run(load_spec(CONFIGS / "tiny.yaml")).memory
    assert memory.peak_bytes == pinned["peak_bytes"]
    assert memory.peak_breakdown == pinned["peak_breakdown"]
    assert memory.category_peak_bytes == pinned["category_peak_bytes"]
    assert memory.state_bytes == pinned["state_bytes"]
    assert memory.phase_peak_bytes == pinned["phase_peak_bytes"]
