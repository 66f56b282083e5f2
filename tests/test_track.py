"""memopt.track(model, optimizer): the profile's numbers, to the byte, from the user's own loop."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import memopt
from memopt.analysis.check import load_baseline
from memopt.app.track import Tracking
from memopt.core.errors import MemoptError
from memopt.core.results import RunResult
from memopt.engine.step import make_batch, prepare, train_step
from memopt.measure.tracker import CATEGORIES, CUDA_BLOCK, PHASES
from memopt.render.outputs import json_text
from memopt.spec import load_spec

from .helpers import CONFIGS, run

B, D = 8, 32
ADAMW_STEP_BYTES = 4  # AdamW's per-parameter `step`: a float32 scalar tensor on the CPU (not capturable/fused)


def _one_step(session, optimizer, delete_loss: bool) -> RunResult:
    """One step of a plain training loop on the runner's session, inside memopt.app.track."""
    with memopt.track(session.model, optimizer) as t:
        tokens, targets = make_batch(session.spec, session.device, 0)  # the runner makes the batch in the step
        loss = session.adapter.loss((tokens, targets))
        loss.backward()
        if delete_loss:
            del loss  # as the runner does before the optimizer step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return t.result


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])])
@pytest.mark.parametrize("config", ["tiny.yaml", "tiny-decoder.yaml"])
def test_a_plain_loop_measures_what_memopt_profile_does_to_the_byte(config, device):
    spec = load_spec(CONFIGS / config, {"steps": 1, "device": device})  # a warm-up step, then one measured one
    reference = run(spec)
    session = prepare(spec)  # the model, built as the runner builds it
    train_step(session, step=0)  # the profile's warm-up step, outside the block: optimizer state exists
    result = _one_step(session, session.optimizer, delete_loss=False)

    ref, mem = reference.memory, result.memory
    assert mem.peak_bytes == ref.peak_bytes
    assert mem.peak_breakdown == ref.peak_breakdown
    assert mem.category_peak_bytes == ref.category_peak_bytes
    assert mem.state_bytes == ref.state_bytes
    assert (mem.peak_phase, mem.peak_module) == (ref.peak_phase, ref.peak_module)
    assert mem.phase_peak_bytes["forward"] == ref.phase_peak_bytes["forward"]
    assert mem.phase_peak_bytes["backward"] == ref.phase_peak_bytes["backward"]
    # the one difference: the loop still holds `loss` (a float32 scalar: 4 bytes, a 512-byte block on CUDA)
    # during optimizer.step(), which the runner has deleted by then (forward_backward ends with `del loss`)
    scalar = CUDA_BLOCK if device == "cuda" else 4
    assert mem.phase_peak_bytes["optimizer"] == ref.phase_peak_bytes["optimizer"] + scalar
    assert (result.name, result.device, result.params_total, result.params_trainable) == \
        ("track", device, reference.params_total, reference.params_trainable)
    assert (result.host.cuda is not None) == (device == "cuda")
    assert result.loss == pytest.approx(reference.loss, abs=1e-5)  # same weights after the same warm-up, same batch
    assert len(result.step_times_s) == 1 and result.step_time_s > 0
    assert result.warnings == []

    # the next step (the same steady state) with the loss deleted before optimizer.step(): every phase matches
    again = _one_step(session, session.optimizer, delete_loss=True)
    assert again.memory.phase_peak_bytes == ref.phase_peak_bytes
    assert again.memory.peak_bytes == ref.peak_bytes
    assert not math.isnan(again.loss)  # read when backward started, while the loss still existed


class TwiceBlock(nn.Module):
    """One Linear applied twice per forward (a shared block), then a head; returns the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(D, D)
        self.head = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.block(torch.relu(self.block(x))))).pow(2).mean()


def test_a_module_called_twice_in_one_step():
    torch.manual_seed(0)
    model = TwiceBlock()
    optimizer = torch.optim.AdamW(model.parameters())
    n = D * D + D + D + 1
    with memopt.track(model, optimizer) as t:
        for _ in range(2):
            loss = model(torch.randn(B, D))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    mem = t.result.memory
    assert mem.state_bytes["params"] == n * 4
    assert mem.state_bytes["grads"] == n * 4  # one gradient per parameter, the two uses summed into it
    assert mem.state_bytes["optimizer"] == 2 * n * 4 + 4 * ADAMW_STEP_BYTES
    assert mem.peak_bytes >= mem.state_bytes["params"] + mem.state_bytes["grads"] + mem.state_bytes["optimizer"]
    assert all(mem.phase_peak_bytes[p] > 0 for p in PHASES)
    # saved for backward: x, both ReLU outputs (each also the next Linear's input) and the head's (B, 1) output
    assert mem.category_peak_bytes["activations"] == (3 * B * D + B) * 4
    assert t.steps == 2 and len(t.result.step_times_s) == 2


def test_a_shared_block_agrees_with_pytorchs_memtracker_on_one_step():
    """Within one step a shared child module is fine for MemTracker too: an independent check of the peak."""
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    torch.manual_seed(0)
    model = TwiceBlock()
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(B, D)

    def step() -> None:
        model(x.clone()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with memopt.track(model, optimizer) as t:
        step()
    reference = mem_tracker.MemTracker()
    reference.track_external(model, optimizer)
    with reference:
        step()
    assert t.result.memory.peak_bytes == reference.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def test_the_model_called_twice_in_one_step_where_memtracker_raises():
    """Two micro-batches per optimizer step (gradient accumulation): PyTorch's MemTracker refuses the second
    call of the model ("multiple iterative calls"); memopt.app.track measures it, phase by phase."""
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    torch.manual_seed(0)
    model = TwiceBlock()
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(B, D)

    def accumulating_step() -> None:
        for half in x.chunk(2):
            (model(half) / 2).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reference = mem_tracker.MemTracker()
    reference.track_external(model, optimizer)
    with pytest.raises(NotImplementedError, match="multiple iterative calls"), reference:
        accumulating_step()
    optimizer.zero_grad(set_to_none=True)

    with memopt.track(model, optimizer) as t:
        accumulating_step()
    mem = t.result.memory
    n = D * D + D + D + 1
    assert mem.state_bytes["grads"] == n * 4
    assert all(mem.phase_peak_bytes[p] > 0 for p in PHASES)
    # one micro-batch's at a time: its two ReLU outputs and the head's, and x whole (a chunk is a view of x's
    # storage, counted once the block made the view, like any storage the block touches)
    assert mem.category_peak_bytes["activations"] == (B * D + 2 * (B // 2) * D + B // 2) * 4
    assert t.steps == 1


class HalfFrozen(nn.Module):
    """Four equal Linears; the first two frozen (half the parameters). Returns the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(D, D), nn.ReLU())])
        for layer in list(self.layers)[:4]:
            layer.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).pow(2).mean()


def test_frozen_parameters_have_no_gradients_and_no_optimizer_state():
    torch.manual_seed(0)
    model = HalfFrozen()
    optimizer = torch.optim.AdamW(model.parameters())  # frozen ones included: they never get a gradient
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    assert n_trainable * 2 == sum(p.numel() for p in model.parameters())
    with memopt.track(model, optimizer) as t:  # no warm-up: the optimizer state is created inside the block
        loss = model(torch.randn(B, D))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    result = t.result
    mem = result.memory
    assert mem.state_bytes["params"] == 2 * n_trainable * 4
    assert mem.state_bytes["grads"] == n_trainable * 4
    assert mem.category_peak_bytes["grads"] == n_trainable * 4
    assert mem.state_bytes["optimizer"] == 2 * n_trainable * 4 + len(trainable) * ADAMW_STEP_BYTES
    assert len(optimizer.state) == len(trainable)
    assert (result.params_total, result.params_trainable) == (2 * n_trainable, n_trainable)
    assert any("no optimizer state before the block" in note for note in result.notes)


@pytest.mark.filterwarnings("ignore:global module forward hook:UserWarning")
def test_frozen_parameters_where_memtracker_raises():
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    model = HalfFrozen()
    optimizer = torch.optim.AdamW(model.parameters())
    reference = mem_tracker.MemTracker()
    reference.track_external(model, optimizer)
    # the frozen first layer's output needs no grad, and MemTracker hooks every module's output
    with pytest.raises(RuntimeError, match="doesn't require gradient"), reference:
        model(torch.randn(B, D)).backward()


def test_to_json_is_a_valid_strict_schema_1_document(tiny, tmp_path):
    session = prepare(tiny)
    with memopt.track(session.model, session.optimizer) as t:
        session.adapter.loss(make_batch(tiny, "cpu")).backward()
        session.optimizer.step()
    doc = t.to_json()
    json.dumps(doc, allow_nan=False)
    assert doc["schema"] == 1 and doc["device"] == "cpu" and len(doc["runs"]) == 1
    assert doc["spec"] == {"model": {"python": "memopt.model.transformer.LanguageModel"},
                           "train": {"optimizer": {"python": "torch.optim.adamw.AdamW"}, "steps": 1,
                                     "warmup_steps": 0, "step_peak_bytes": [t.result.memory.peak_bytes]},
                           "run": {"device": "cpu", "dtype": "float32"}, "strategies": []}
    path = tmp_path / "baseline.json"
    path.write_text(json_text(doc))
    baseline = load_baseline(path)  # memopt check's validation of a baseline
    back = RunResult.from_json(baseline["runs"][0], baseline["device"])
    assert back.name == "track" and back.memory.peak_bytes == t.result.memory.peak_bytes
    assert back.memory.phase_peak_bytes == t.result.memory.phase_peak_bytes
    assert back.loss == pytest.approx(t.result.loss)


def test_an_unknown_loss_is_null_in_json_and_not_a_warning():
    model = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 1))  # returns outputs, not a loss
    with memopt.track(model) as t:  # no optimizer: the block is the step
        model(torch.randn(B, D)).square().mean().backward()
    result = t.result
    assert math.isnan(result.loss) and result.warnings == []
    assert any("loss not seen" in note for note in result.notes)
    doc = t.to_json()
    assert doc["runs"][0]["loss"] is None and doc["spec"]["train"]["optimizer"] is None
    json.dumps(doc, allow_nan=False)
    mem = result.memory
    assert mem.state_bytes["grads"] == sum(p.numel() for p in model.parameters()) * 4
    assert mem.state_bytes["optimizer"] == 0
    # the loss is computed outside the model: backward is seen from its first saved tensor unpacked
    assert mem.phase_peak_bytes["backward"] > 0 and mem.phase_peak_bytes["optimizer"] == 0
    assert len(result.step_times_s) == 1 and t.steps == 0


def test_report_prints_the_profile_tables(capsys):
    from rich.console import Console

    model = TwiceBlock()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with memopt.track(model, optimizer) as t:
        model(torch.randn(B, D)).backward()
        optimizer.step()
    t.report(Console(width=200, force_terminal=False))
    out = capsys.readouterr().out
    assert "memopt track - TwiceBlock, SGD, float32, cpu, 1 optimizer step" in out
    assert "Where the bytes go" in out and "Peak by phase" in out
    assert "after a warm-up" not in out  # SGD without momentum keeps no state: nothing says a warm-up ran
    for c in CATEGORIES:
        assert c in out


def _no_hooks_left(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
    for p in model.parameters():
        assert not p._backward_hooks and not getattr(p, "_post_accumulate_grad_hooks", None)
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    assert torch._C._len_torch_dispatch_stack() == 0  # the tracker's dispatch mode is gone
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None  # and its saved-tensor hooks


def test_an_exception_propagates_and_leaves_nothing_behind():
    model = TwiceBlock()
    optimizer = torch.optim.AdamW(model.parameters())
    boom = ValueError("boom")
    with pytest.raises(ValueError) as raised, memopt.track(model, optimizer) as t:
        loss = model(torch.randn(B, D))
        raise boom
    assert raised.value is boom
    _no_hooks_left(model, optimizer)
    loss.backward()  # the graph made inside the block: no hook of ours fires any more
    with pytest.raises(MemoptError, match="raised"):
        t.report()
    with pytest.raises(MemoptError, match="raised"):
        t.to_json()


def test_hooks_are_removed_after_a_normal_block_too():
    model = TwiceBlock()
    optimizer = torch.optim.AdamW(model.parameters())
    with memopt.track(model, optimizer):
        model(torch.randn(B, D)).backward()
        optimizer.step()
    _no_hooks_left(model, optimizer)


def test_misuse_is_a_clear_error():
    model = TwiceBlock()
    t = memopt.track(model)
    with pytest.raises(MemoptError, match="nothing measured yet"):
        t.report()
    with t:
        with pytest.raises(MemoptError, match="still running"):
            t.report()
        with pytest.raises(MemoptError, match="still running"):
            _ = t.result
    with pytest.raises(MemoptError, match="used already"), t:
        pass
    with pytest.raises(MemoptError, match="nn.Module"):
        memopt.track(object())  # type: ignore[arg-type]


def test_memopt_track_stays_the_function_once_its_module_is_imported():
    import memopt.app.track as module

    assert isinstance(memopt.track(nn.Linear(2, 2)), Tracking)
    assert isinstance(module.track(nn.Linear(2, 2)), Tracking)


def test_import_memopt_does_not_import_torch():
    code = "import sys, memopt; assert callable(memopt.track); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
