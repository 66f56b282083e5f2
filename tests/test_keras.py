"""Keras models (issue 27): ``model: {keras: pkg.module:factory, backend: torch | tensorflow}``.

On the PyTorch backend memopt's tracker measures the step (the Keras optimizer's variables as optimizer state); on
TensorFlow a process of its own replays the allocator's profiler events, and an estimate reads XLA's buffer
assignment. The model is tests/keras_lm.py's: 2 blocks, d128, V1000; batch 4 x seq 64, AdamW."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from memopt.core.errors import MemoptError, StrategyError
from memopt.spec import spec_from_data
from memopt.strategies import build_strategies

from .helpers import invoke, run
from .keras_lm import parameters

FACTORY = "tests.keras_lm:make_lm"
VOCAB, D, BATCH, SEQ = 1000, 128, 4, 64


def keras_spec(backend: str = "torch", strategies: list[str] | None = None, **kwargs: Any):
    return spec_from_data({"model": {"keras": FACTORY, "backend": backend, "kwargs": kwargs},
                           "train": {"batch_size": BATCH, "seq_len": SEQ, "steps": 1}, "run": {"device": "cpu"}},
                          strategies=strategies or [])


def needs(*modules: str) -> None:
    """Skip unless the modules are installed; found, not imported: Keras would pick its backend on import."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install 'memopt[tf]')")


def adamw_bytes(weights: int, backend: str) -> int:
    """Keras AdamW's variables: two moments per weight, its learning rate (float32) and iteration count (int32 on
    the PyTorch backend, int64 on TensorFlow)."""
    return 2 * weights + 4 + (4 if backend == "torch" else 8)


# --- the spec and the command line (no Keras imported) ---

def test_the_spec_names_keras_and_its_backend_with_the_spellings_users_type():
    spec = spec_from_data({"model": {"keras": FACTORY}}, overrides={"backend": "TF"})
    assert spec.model.kind == "keras" and spec.model.backend == "tensorflow"
    assert spec_from_data({}, overrides={"keras": FACTORY, "backend": "pytorch"}).model.backend == "torch"
    assert spec_from_data({"model": {"keras": FACTORY, "backend": "tensorflow"}},
                          overrides={"keras": FACTORY}).model.backend == "tensorflow"  # --keras keeps the spec's


@pytest.mark.parametrize(("args", "message"), [
    (["--backend", "torch"], "--backend: applies to a Keras model"),
    (["--keras", FACTORY, "--backend", "jax"], "--backend (model.backend)"),
    (["--keras", "memopt_test_nowhere:make"], "memopt_test_nowhere:make cannot be imported, no module named"),
    (["--keras", FACTORY, "--model", "tests.keras_lm:make_lm"], "--model and --keras each name a model"),
    (["--keras", "not an entry point"], "model.keras"),
])
def test_bad_keras_options_are_one_clear_error(args, message):
    result = invoke(["profile", *args])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert message in " ".join(result.output.split())


def test_strategies_that_rewrite_torch_modules_are_refused_for_a_keras_model():
    with pytest.raises(StrategyError, match="prune: not for a Keras model"):
        build_strategies(keras_spec(strategies=["prune"]), "cpu")
    with pytest.raises(StrategyError, match="quant.group_size: a Keras model is quantized Keras's own way"):
        build_strategies(keras_spec(strategies=["quant:group_size=32"]), "cpu")
    with pytest.raises(StrategyError, match="quant.format: .*leave format out"):
        build_strategies(keras_spec(strategies=["quant:bits=4,format=nf4"]), "cpu")
    with pytest.raises(StrategyError, match="amp: not for a Keras model.*mixed_bfloat16"):
        build_strategies(keras_spec(strategies=["amp"]), "cpu")
    with pytest.raises(StrategyError, match="accum: memopt applies strategies on Keras's PyTorch backend"):
        build_strategies(keras_spec("tensorflow", strategies=["accum:micro_batches=2"]), "cpu")
    assert [s.name for s in build_strategies(keras_spec(strategies=["accum:micro_batches=2"]), "cpu")] == ["accum"]
    assert [s.name for s in build_strategies(keras_spec(strategies=["ckpt", "offload"]), "cpu")] == ["ckpt", "offload"]


# --- the PyTorch backend, through the tracker ---

@pytest.fixture(scope="module")
def on_torch():
    needs("keras")
    return run(keras_spec())


def test_on_torch_the_states_are_the_variables_sizes_exactly(on_torch):
    weights = parameters(VOCAB, D, 2) * 4
    assert on_torch.params_total == on_torch.params_trainable == parameters(VOCAB, D, 2) == 653_800
    assert on_torch.memory.state_bytes["params"] == weights
    assert on_torch.memory.state_bytes["grads"] == weights
    assert on_torch.memory.state_bytes["optimizer"] == adamw_bytes(weights, "torch")


def test_on_torch_the_peak_equals_pytorchs_memtracker():
    """An independent count: PyTorch's MemTracker (a dispatch mode of its own) around the same steady-state step,
    told of the weights and the Keras optimizer's variables that exist before it. Both steps start from a collected
    heap with Python's collector held off: Keras's tree utilities leave tensors in reference cycles, and a
    collection inside one step but not the other would free them at different points."""
    import gc

    import torch

    from memopt.engine.step import prepare, train_step

    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    gc.collect()
    gc.disable()
    try:
        measured = run(keras_spec())
        session = prepare(keras_spec())
        train_step(session)
        gc.collect()
        reference = mem_tracker.MemTracker()
        reference.track_external(session.model, *[v.value for v in session.optimizer.optimizer.variables])
        with reference:
            train_step(session)
    finally:
        gc.enable()
    assert reference.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] == measured.memory.peak_bytes
    assert measured.memory.peak_phase == "optimizer" and measured.memory.phase_peak_bytes["backward"] > 0


def test_on_torch_accumulation_keeps_the_loss_and_lowers_the_activations(on_torch):
    accum = run(keras_spec(strategies=["accum:micro_batches=2"]))
    assert accum.loss == pytest.approx(on_torch.loss, rel=1e-5)
    assert accum.memory.state_bytes == on_torch.memory.state_bytes
    assert accum.memory.category_peak_bytes["activations"] < on_torch.memory.category_peak_bytes["activations"]


def gradients(spec: Any) -> tuple[float, list[Any]]:
    """One forward and backward of ``spec``'s Keras model on a fixed batch: the loss and every weight's gradient."""
    from memopt.engine.step import forward_backward, make_batch, prepare

    session = prepare(spec)
    loss = forward_backward(session, make_batch(spec, session.device, 0))
    return loss, [w.value.grad.clone() for w in session.model.trainable_variables]


@pytest.mark.parametrize("policy", ["full", "selective", "every"])
def test_on_torch_checkpointing_keras_blocks_keeps_loss_and_gradients_and_saves_less(on_torch, policy):
    """The blocks (the class of composite layer that repeats) run under torch.utils.checkpoint: the same loss and
    gradients, fewer bytes saved for backward; full keeps least, every k-th between full and selective."""
    import torch

    strategy = f"ckpt:policy={policy}"
    loss, grads = gradients(keras_spec(strategies=[strategy]))
    reference_loss, reference = gradients(keras_spec())
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    for got, want in zip(grads, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    result = run(keras_spec(strategies=[strategy]))
    activations = result.memory.category_peak_bytes["activations"]
    baseline = on_torch.memory.category_peak_bytes["activations"]
    block_input = BATCH * SEQ * D * 4
    assert activations <= baseline - {"full": 2, "every": 1, "selective": 1}[policy] * block_input
    assert result.memory.phase_peak_bytes["forward"] < on_torch.memory.phase_peak_bytes["forward"]
    assert result.memory.state_bytes == on_torch.memory.state_bytes


def test_on_torch_checkpointing_frees_what_it_recomputed_by_the_end_of_backward(on_torch):
    """A recomputation that stops early raises through Keras's traceback filters, whose frames would keep the
    recomputed tensors in reference cycles past backward: memopt runs it to the end, so the optimizer phase
    holds no more saved activations than without checkpointing."""
    result = run(keras_spec(strategies=["ckpt"]))
    assert result.memory.peak_phase == on_torch.memory.peak_phase == "optimizer"
    assert result.memory.peak_breakdown["activations"] <= on_torch.memory.peak_breakdown["activations"]
    assert result.memory.peak_bytes <= on_torch.memory.peak_bytes


def test_on_torch_offload_moves_what_backward_saves_off_the_device(on_torch):
    result = run(keras_spec(strategies=["offload"]))
    assert result.loss == pytest.approx(on_torch.loss, rel=1e-6)
    activations = on_torch.memory.category_peak_bytes["activations"]
    assert result.memory.category_peak_bytes["activations"] < activations / 100
    assert result.strategy_facts["offload"]["moved_off_device_bytes"] > activations


def keras_lora_parameters(rank: int, layers: str = "qkvo ud") -> int:
    """Keras's LoRA weights by hand: A has the kernel's shape with its last axis replaced by the rank, B is rank x
    that last axis. Per block: q, k, v (d -> heads x head_dim), o (heads x head_dim -> d), up (d -> 4d), down."""
    heads, head_dim = 4, D // 4
    sizes = {"q": D * heads * rank + rank * head_dim, "o": heads * head_dim * rank + rank * D,
             "u": D * rank + rank * 4 * D, "d": 4 * D * rank + rank * D}
    sizes["k"] = sizes["v"] = sizes["q"]
    return 2 * sum(sizes[layer] for layer in layers if layer != " ")


def test_on_torch_lora_is_keras_own_adapters_and_only_they_train(on_torch):
    """Keras's enable_lora on the Dense and EinsumDense layers of the blocks, every other variable frozen: params
    gain the adapters, gradients and AdamW state exist for them alone; B starts at zero (the same first loss)."""
    result = run(keras_spec(strategies=["lora:rank=8"]))
    adapters = keras_lora_parameters(8)
    assert adapters == 50_688 and result.params_trainable == adapters
    assert result.params_total == parameters(VOCAB, D, 2) + adapters
    states = result.memory.state_bytes
    assert states["params"] == on_torch.memory.state_bytes["params"] + 4 * adapters
    assert states["grads"] == 4 * adapters and states["optimizer"] == adamw_bytes(4 * adapters, "torch")
    assert result.drift is not None and result.drift["logits_rel_error"] > 0  # after 3 steps: another training
    loss, _ = gradients(keras_spec(strategies=["lora:rank=8"]))
    assert loss == pytest.approx(gradients(keras_spec())[0], rel=1e-6)


def test_on_torch_lora_targets_are_keras_layer_paths():
    needs("keras")
    result = run(keras_spec(strategies=['lora:rank=4,targets=["*/query", "*/attention_output"]']))
    assert result.params_trainable == keras_lora_parameters(4, "qo")
    with pytest.raises(StrategyError, match=r"lora.targets: \['\*/nowhere'\] match no Dense or EinsumDense layer "
                                            r"inside the blocks \(e.g. block"):
        run(keras_spec(strategies=['lora:targets=["*/nowhere"]']))
    with pytest.raises(StrategyError, match="Keras's own LoRA"):
        build_strategies(keras_spec(strategies=["lora:backend=peft"]), "cpu")  # refused before anything runs


def test_on_torch_quant_is_keras_own_int8_with_one_scale_per_output_unit(on_torch):
    """layer.quantize("int8") on the blocks' Dense and EinsumDense layers: each kernel one byte a weight and frozen,
    one float32 scale per output unit (q/k/v/o: d each, up: 4d, down: d)."""
    result = run(keras_spec(strategies=["quant"]))
    kernels = 2 * 12 * D * D  # per block: q, k, v, o (d x d each) and the feed-forward (2 x 4 d^2)
    scales = 2 * (4 * D + 4 * D + D)
    states = result.memory.state_bytes
    assert states["params"] == on_torch.memory.state_bytes["params"] - 3 * kernels + 4 * scales == 1_444_768
    assert states["grads"] == on_torch.memory.state_bytes["grads"] - 4 * kernels
    assert result.drift is not None and 0 < result.drift["logits_rel_error"] < 0.05
    four = run(keras_spec(strategies=["quant:bits=4"]))
    assert four.memory.state_bytes["params"] < states["params"] - kernels // 3


def test_on_torch_quant_with_lora_trains_keras_adapters_on_the_int8_kernels(on_torch):
    result = run(keras_spec(strategies=["quant:lora=8"]))
    assert result.params_trainable == keras_lora_parameters(8)
    assert result.memory.state_bytes["grads"] == 4 * keras_lora_parameters(8)
    assert result.memory.state_bytes["params"] == 1_444_768 + 4 * keras_lora_parameters(8)


def test_a_keras_block_that_draws_dropout_masks_is_not_checkpointed():
    """Keras's seed generators advance at every call: a recomputed block would draw another mask."""
    needs("keras")
    with pytest.raises(StrategyError, match=r"Keras block block(_\d+)? draws random numbers .*dropout.*rate to 0"):
        run(keras_spec(strategies=["ckpt"], dropout=0.1))


def test_a_keras_model_without_blocks_says_so():
    needs("keras")
    spec = spec_from_data({"model": {"keras": "tests.keras_lm:make_subclassed"},
                           "train": {"batch_size": 2, "seq_len": 8, "steps": 1}, "run": {"device": "cpu"}},
                          strategies=["ckpt"])
    with pytest.raises(StrategyError, match="no blocks"):
        run(spec)


# --- TensorFlow, in a process of its own ---

@pytest.fixture(scope="module")
def tensorflow_available():
    needs("tensorflow", "keras")


def test_on_tensorflow_weights_slots_and_gradients_are_the_variable_arithmetic(tensorflow_available):
    result = run(keras_spec("tensorflow"))
    weights = parameters(VOCAB, D, 2) * 4
    states = result.memory.state_bytes
    assert states["params"] == weights and states["optimizer"] == adamw_bytes(weights, "tensorflow")
    # the embedding's gradient is sparse (IndexedSlices): the looked-up rows and their int32 indices, not V x d
    assert states["grads"] == weights - VOCAB * D * 4 + BATCH * SEQ * (D * 4 + 4)
    assert result.memory.peak_bytes >= states["params"] + states["optimizer"]
    facts = result.tensorflow
    assert facts["jit_compile"] is False and len(set(facts["step_peaks_bytes"])) == 1  # one order in a process
    assert facts["allocator_peak_bytes"] >= result.memory.peak_bytes - states["optimizer"]  # chunks, not tensors
    assert sum(result.memory.peak_breakdown.values()) == result.memory.peak_bytes


def test_on_tensorflow_a_jit_step_is_the_same_to_the_byte_and_within_xlas_buffer_assignment(tensorflow_available):
    spec = keras_spec("tensorflow", jit=True)
    first, second = run(spec), run(spec)
    assert first.memory.peak_bytes == second.memory.peak_bytes
    assert first.tensorflow["step_peaks_bytes"] == second.tensorflow["step_peaks_bytes"]
    estimate = run(spec, fake=True)
    xla = estimate.tensorflow["xla_buffer_assignment"]
    assert estimate.estimated and estimate.memory.peak_bytes == xla["total_bytes"]
    assert xla["total_bytes"] == sum(xla[k] for k in ("parameter_bytes", "temp_bytes", "output_bytes",
                                                       "constant_bytes"))
    weights = parameters(VOCAB, D, 2) * 4
    batch = 2 * BATCH * SEQ * 4  # x and y, int32
    extra = xla["parameter_bytes"] - (weights + adamw_bytes(weights, "tensorflow") + batch)
    assert 0 <= extra <= 16  # Keras's own scalars
    # what the allocator hands out: weights and slots (there already), XLA's temp buffer and small outputs; XLA's
    # constants live in the program and the batch was converted before the step
    floor = xla["total_bytes"] - xla["constant_bytes"] - batch - xla["output_bytes"]
    assert floor <= first.memory.peak_bytes <= xla["total_bytes"]


def test_compare_runs_both_backends_side_by_side(tensorflow_available, tmp_path):
    out = tmp_path / "cmp.json"
    result = invoke(["compare", "--keras", FACTORY, "--backend", "torch,tensorflow", "--batch-size", BATCH,
                     "--seq-len", SEQ, "--steps", 1, "--json-out", out])
    assert result.exit_code == 0, result.output
    runs = json.loads(out.read_text())["runs"]
    assert [r["name"] for r in runs] == ["baseline (torch)", "baseline (tensorflow)"]
    assert runs[0]["state_bytes"]["params"] == runs[1]["state_bytes"]["params"] == parameters(VOCAB, D, 2) * 4
    assert runs[0]["pid"] != runs[1]["pid"] and "tensorflow" in runs[1]


def test_a_factory_that_returns_no_keras_model_is_named(tensorflow_available):
    spec = spec_from_data({"model": {"keras": "tests.keras_lm:parameters", "backend": "tensorflow"},
                           "train": {"batch_size": 2, "seq_len": 8, "steps": 1}, "run": {"device": "cpu"}})
    with pytest.raises(MemoptError, match="returned a value of type int, not a keras.Model"):
        run(spec)


@pytest.mark.parametrize(("args", "message"), [
    (["estimate", "--keras", FACTORY], "cannot be traced on fake tensors"),
    (["profile", "--keras", FACTORY, "--backend", "tensorflow", "--html", "x.html"],
     "a Keras model on TensorFlow is measured from its allocator"),
    (["profile", "--keras", FACTORY, "--backend", "tensorflow", "--mode", "infer"],
     "run.mode: infer: memopt measures a Keras model's training step on TensorFlow"),
])
def test_what_a_backend_cannot_do_is_refused_before_anything_runs(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written here
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    result = invoke(args)
    assert result.exit_code == 1 and message in " ".join(result.output.split())
    assert list(tmp_path.iterdir()) == []


def test_an_uncompiled_model_trains_with_the_specs_optimizer(tensorflow_available):
    spec = spec_from_data({"model": {"keras": FACTORY, "backend": "tensorflow", "kwargs": {"compiled": False}},
                           "train": {"batch_size": BATCH, "seq_len": SEQ, "steps": 1, "optimizer": "sgd"},
                           "run": {"device": "cpu"}})
    assert run(spec).memory.state_bytes["optimizer"] == 4 + 8  # plain SGD: its learning rate and iteration only
    none = spec_from_data({**spec.to_dict(), "train": {**spec.to_dict()["train"], "optimizer": "none"}})
    with pytest.raises(MemoptError, match="train.optimizer: none, but Keras's training step on TensorFlow"):
        run(none)


def test_a_subclassed_uncompiled_model_is_built_and_compiled_by_memopt():
    """Its weights exist after its first call: memopt calls it once on the first batch, then compiles it with the
    spec's optimizer (AdamW) and sparse cross-entropy."""
    needs("keras")
    spec = spec_from_data({"model": {"keras": "tests.keras_lm:make_subclassed"},
                           "train": {"batch_size": 3, "seq_len": 17, "steps": 1}, "run": {"device": "cpu"}})
    result = run(spec)
    count = 300 * 48 + (48 * 144 + 144) + (144 * 300 + 300)
    assert result.params_total == count and result.memory.state_bytes["params"] == 4 * count
    assert result.memory.state_bytes["optimizer"] == adamw_bytes(4 * count, "torch")
