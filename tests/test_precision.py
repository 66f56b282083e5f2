"""run.precision / --precision as Lightning names it: *-mixed is fp32 states with autocast compute (the amp
strategy), *-true is run.dtype; every spelling a user might type, and the clashes refused."""

from __future__ import annotations

import pytest

from memopt.core.errors import SpecError
from memopt.model.transformer import count_parameters
from memopt.spec import load_spec

from .helpers import CONFIGS, run

TINY = CONFIGS / "tiny-decoder.yaml"


@pytest.mark.parametrize("given,precision,dtype,amp", [
    ("bf16-mixed", "bf16-mixed", "float32", "bf16"), ("BF16-Mixed", "bf16-mixed", "float32", "bf16"),
    ("16-mixed", "fp16-mixed", "float32", "fp16"), ("bf16", "bf16-mixed", "float32", "bf16"),
    ("bf16-true", "bf16-true", "bfloat16", None), ("16-true", "fp16-true", "float16", None),
    ("32", "fp32", "float32", None), ("fp32", "fp32", "float32", None),
])
def test_every_spelling(given, precision, dtype, amp):
    spec = load_spec(TINY, {"precision": given})
    assert (spec.run.precision, spec.run.dtype) == (precision, dtype)
    amps = [s.options.dtype for s in spec.strategies if s.name == "amp"]
    assert amps == ([amp] if amp else [])


@pytest.mark.parametrize("overrides,strategies,says", [
    ({"precision": "bf16-mixed", "dtype": "bf16"}, None, "keeps parameters, gradients and optimizer state in float32"),
    ({"precision": "bf16-mixed", "mode": "infer"}, None, "for --mode infer use bf16-true"),
    ({"precision": "fp16-mixed"}, ["amp:dtype=bf16"], "computes in fp16, but the amp strategy says bf16"),
    ({"precision": "bf17"}, None, "input should be 'fp32', 'bf16-mixed'"),
])
def test_clashes_are_one_clear_message(overrides, strategies, says):
    with pytest.raises(SpecError, match=says):
        load_spec(TINY, overrides, strategies)


def test_mixed_is_amp_and_true_is_the_dtype_to_the_byte():
    mixed = run(load_spec(TINY, {"precision": "bf16-mixed", "steps": 1}), fake=True).memory
    amp = run(load_spec(TINY, {"steps": 1}, ["amp:dtype=bfloat16"]), fake=True).memory
    assert mixed is not None and amp is not None and mixed.peak_bytes == amp.peak_bytes
    true = run(load_spec(TINY, {"precision": "bf16-true", "steps": 1}), fake=True).memory
    dtype = run(load_spec(TINY, {"dtype": "bf16", "steps": 1}), fake=True).memory
    assert true is not None and dtype is not None and true.peak_bytes == dtype.peak_bytes


def test_mixed_precision_states_are_16_bytes_a_parameter_as_deepspeed_counts():
    """fp32 parameters (4), gradients (4) and AdamW's two moments (8): 16 bytes a parameter, plus AdamW's 4-byte step
    per parameter tensor; what DeepSpeed's and accelerate's estimators say for mixed precision with Adam."""
    from memopt.engine.step import prepare

    spec = load_spec(TINY, {"precision": "bf16-mixed", "steps": 1})
    memory = run(spec, fake=True).memory
    assert memory is not None
    model = prepare(spec).model
    n, _ = count_parameters(model)
    tensors = sum(1 for _ in model.parameters())
    state = memory.state_bytes
    assert (state["params"], state["grads"], state["optimizer"]) == (4 * n, 4 * n, 8 * n + 4 * tensors)
