"""Backends: the lora strategy (memopt's LoRA layer or peft's), quant and optim8bit on bitsandbytes.

Exact bytes against what each backend allocates, computed here from its storage format; estimate == profile
where the backend traces on fake tensors, a clear refusal where it cannot; a clear error without the library.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from memopt.analysis.drift import strategy_drift
from memopt.analysis.estimate import estimate
from memopt.core.errors import StrategyError
from memopt.core.results import RunResult
from memopt.engine.run import run as engine_run
from memopt.engine.step import make_batch, prepare, train_step
from memopt.spec import Spec, load_spec, spec_from_data
from memopt.strategies import build_strategies

from .helpers import CONFIGS

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
pytest.importorskip("transformers")

# a shrunk Llama: hidden 64, 4 heads of 16, 2 KV heads (k/v: 64 -> 32), SwiGLU 176, 2 layers, vocab 500, untied head
LLAMA = {"hf": "llama", "config": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 176,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 500}}
LLAMA_LINEARS = 2 * [(64, 64), (32, 64), (32, 64), (64, 64), (176, 64), (176, 64), (64, 176)]  # (out, in)
LLAMA_FLOATS = 2 * 500 * 64 + 2 * 2 * 64 + 64  # embedding, head, two RMSNorms per layer and the final one
# tiny-decoder: d 64, 8 heads of 8, 2 KV heads (k/v: 64 -> 16), SwiGLU 176, 2 layers
TINY_DECODER_LINEARS = 2 * [(64, 64), (16, 64), (16, 64), (64, 64), (176, 64), (176, 64), (64, 176)]
ADAMW_STEP_BYTES = 4  # AdamW's per-parameter `step`: a float32 scalar tensor on the CPU (as in test_track)
RANK = 8


def llama(*strategies: str | dict) -> Spec:
    return spec_from_data({"model": LLAMA, "train": {"batch_size": 2, "seq_len": 32, "steps": 1},
                           "run": {"device": "cpu"}}, strategies=list(strategies))


def tiny_decoder(*strategies: str) -> Spec:
    return load_spec(CONFIGS / "tiny-decoder.yaml", {"steps": 1}, strategies=list(strategies))


_PROFILES: dict[str, RunResult] = {}


def profile(spec: Spec) -> RunResult:
    """The engine's run, without the accuracy-drift measurement that memopt.app.profile adds (its own models and
    training steps: these tests are about bytes; test_lora_drift_is_taken_after_identical_training_steps covers
    drift), each spec profiled once for the whole module."""
    key = json.dumps(spec.to_dict(), sort_keys=True)
    if key not in _PROFILES:
        _PROFILES[key] = engine_run(spec)
    return _PROFILES[key]


def param_bytes(spec: Spec) -> int:
    return sum(p.untyped_storage().nbytes() for p in prepare(spec).model.parameters())


def lora_params(linears: list[tuple[int, int]], rank: int = RANK) -> int:
    return sum(rank * (out_f + in_f) for out_f, in_f in linears)


# ---- lora ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("make", "linears"), [(tiny_decoder, TINY_DECODER_LINEARS), (llama, LLAMA_LINEARS)],
                         ids=["tiny-decoder", "hf-llama"])
def test_lora_trains_exactly_the_adapters(make, linears):
    spec = make("lora")
    result = profile(spec)
    trainable = lora_params(linears)
    assert result.params_trainable == trainable
    mem = result.memory
    assert mem.state_bytes["grads"] == trainable * 4
    assert mem.state_bytes["optimizer"] == 2 * trainable * 4 + 2 * len(linears) * ADAMW_STEP_BYTES
    assert mem.state_bytes["params"] == param_bytes(make()) + trainable * 4
    traced = estimate(spec).memory  # estimate == profile
    assert traced.peak_bytes == pytest.approx(mem.peak_bytes, rel=0.01)
    assert traced.state_bytes == mem.state_bytes


@pytest.mark.parametrize("make", [tiny_decoder, llama], ids=["tiny-decoder", "hf-llama"])
@pytest.mark.parametrize("backend", ["memopt", "peft"])
def test_lora_loss_at_init_is_the_unchanged_models(make, backend):
    """B starts at zero: the adapted model computes the unchanged model's logits and loss (its weights are built
    first, from the same seed; y + 0 is y, so they are equal to the bit, not only to float rounding)."""
    adapted, unchanged = prepare(make(f"lora:backend={backend}")), prepare(make())
    batch = make_batch(adapted.spec, "cpu")
    with torch.no_grad():
        assert torch.equal(adapted.adapter.logits(batch), unchanged.adapter.logits(batch))
        assert adapted.adapter.loss(batch).item() == pytest.approx(unchanged.adapter.loss(batch).item(), rel=1e-6)


def test_lora_peft_backend_matches_memopts_bytes():
    """peft's A/B have the same shapes as memopt's (on the shrunk llama: both peaks 1,860,552 bytes)."""
    ours, peft = profile(llama("lora")), profile(llama("lora:backend=peft"))
    assert peft.params_trainable == ours.params_trainable == lora_params(LLAMA_LINEARS)
    assert peft.memory.state_bytes == ours.memory.state_bytes
    assert peft.memory.peak_bytes == pytest.approx(ours.memory.peak_bytes, rel=0.01)


def test_lora_targets_select_linears_by_name():
    result = profile(llama({"lora": {"rank": 4, "targets": ["*.self_attn.q_proj", "*.self_attn.v_proj"]}}))
    assert result.params_trainable == 2 * (4 * (64 + 64) + 4 * (32 + 64))
    with pytest.raises(StrategyError, match=r"lora.targets: \['\*.nothing'\] match no Linear"):
        prepare(llama({"lora": {"targets": ["*.nothing"]}}))


@pytest.mark.parametrize("spec", [tiny_decoder("lora:backend=peft"), llama("lora:backend=peft"),
                                  llama("quant:bits=4,format=nf4", "lora"),
                                  load_spec(CONFIGS / "tiny.yaml", strategies=["lora:rank=4"])],
                         ids=["tiny-decoder-peft", "hf-llama-peft", "quant-then-lora", "encoder"])
def test_lora_estimate_equals_profile(spec):
    """(memopt's backend on tiny-decoder and the llama: in test_lora_trains_exactly_the_adapters)"""
    real, traced = profile(spec).memory, estimate(spec).memory
    assert traced.peak_bytes == pytest.approx(real.peak_bytes, rel=0.01)
    assert traced.state_bytes == real.state_bytes


def test_lora_peft_estimate_in_bfloat16_gives_the_adapters_the_models_dtype():
    """On fake tensors peft's move of each adapter to its base layer's dtype is done by memopt instead."""
    spec = spec_from_data({"model": LLAMA, "train": {"batch_size": 2, "seq_len": 32, "steps": 1},
                           "run": {"device": "cpu", "dtype": "bfloat16"}}, strategies=["lora:backend=peft"])
    traced = estimate(spec)
    assert traced.memory.state_bytes["grads"] == lora_params(LLAMA_LINEARS) * 2


def test_quant_then_lora_is_quants_own_lora():
    """quant + the lora strategy (adapters added by QuantLinear.add_lora) == quant's lora option, byte for byte."""
    composed, own = profile(llama("quant:bits=4,format=nf4", "lora")), profile(llama("quant:bits=4,format=nf4,lora=8"))
    assert composed.params_trainable == own.params_trainable == lora_params(LLAMA_LINEARS)
    assert composed.memory.state_bytes == own.memory.state_bytes
    assert composed.memory.peak_bytes == own.memory.peak_bytes


@pytest.mark.parametrize(("strategies", "why"), [
    (["quant:bits=4,lora=8", "lora"], "lora\\+quant: refused: quant's own lora option already adds adapters"),
    (["quant:bits=4", "lora:backend=peft"], "peft cannot wrap memopt's quantized layers"),
])
def test_lora_refusals_name_the_reason(strategies, why):
    with pytest.raises(StrategyError, match=why):
        build_strategies(llama(*strategies), "cpu")


def test_lora_drift_is_taken_after_identical_training_steps():
    """LoRA changes what trains, not the forward at init: its drift is measured after 3 identical steps
    against the fully trained model (as optim8bit's), so it is lossy and reports a non-zero drift."""
    drift = strategy_drift(llama("lora"))  # what run() reports as result.drift
    assert drift is not None and drift["after_steps"] == 3 and drift["logits_rel_error"] > 0


# ---- quant on bitsandbytes -----------------------------------------------------------------------------------------

def bnb_bytes(out_f: int, in_f: int, bits: int, blocksize: int = 64) -> int:
    """What bitsandbytes stores for one (out, in) weight. 4 bits (Linear4bit, double-quantized statistics): two
    codes per byte, one uint8 absmax per block, its 16-entry float32 code, a float32 offset, and the nested
    quantization of the absmax (float32 absmax per 256 blocks, a 256-entry float32 code). 8 bits
    (Linear8bitLt): int8 weights and one float32 scale per output row."""
    n = out_f * in_f
    if bits == 8:
        return n + out_f * 4
    blocks = math.ceil(n / blocksize)
    return math.ceil(n / 2) + blocks + 16 * 4 + 4 + math.ceil(blocks / 256) * 4 + 256 * 4


@pytest.mark.parametrize(("strategy", "bits"), [("quant:bits=4,format=nf4,backend=bitsandbytes", 4),
                                                ("quant:bits=4,backend=bitsandbytes,group_size=128", 4),
                                                ("quant:bits=8,backend=bitsandbytes", 8)])
def test_bitsandbytes_weights_take_exactly_their_storage(strategy, bits):
    blocksize = 128 if "group_size=128" in strategy else 64
    result = profile(llama(strategy))
    expected = sum(bnb_bytes(o, i, bits, blocksize) for o, i in LLAMA_LINEARS) + LLAMA_FLOATS * 4
    assert result.memory.peak_breakdown["params"] == result.memory.state_bytes["params"] == expected
    assert result.params_trainable == LLAMA_FLOATS  # the quantized weights are frozen, the rest trains
    assert result.params_total == LLAMA_FLOATS + sum(o * i for o, i in LLAMA_LINEARS)  # codes count what they stand for
    assert math.isfinite(result.loss)


def test_memopt_and_bitsandbytes_nf4_side_by_side():
    """On the shrunk llama (float32 weights of the quantized Linears: 368,640 bytes): memopt's nf4 stores 52,992
    bytes (peak 1,765,748), bitsandbytes' 62,864 (peak 1,775,620): its fixed ~1 KiB of codes per layer outweighs
    the double-quantized absmax at this size."""
    floats = LLAMA_FLOATS * 4
    quantized_float = sum(o * i for o, i in LLAMA_LINEARS) * 4
    ours = profile(llama("quant:bits=4,format=nf4"))
    theirs = profile(llama("quant:bits=4,format=nf4,backend=bitsandbytes"))
    for result in (ours, theirs):
        assert result.memory.state_bytes["params"] - floats < 0.4 * quantized_float
    assert ours.memory.state_bytes["grads"] == theirs.memory.state_bytes["grads"] == floats
    assert ours.memory.state_bytes["params"] - floats == 52_992
    assert theirs.memory.state_bytes["params"] - floats == 62_864
    assert theirs.memory.peak_bytes - ours.memory.peak_bytes == 62_864 - 52_992


@pytest.mark.parametrize("lora", ["quant:bits=4,format=nf4,backend=bitsandbytes,lora=8",
                                  "quant:bits=4,format=nf4,backend=bitsandbytes+lora",
                                  "quant:bits=4,format=nf4,backend=bitsandbytes+lora:backend=peft"],
                         ids=["quant-lora-option", "lora-memopt", "lora-peft"])
def test_qlora_on_bitsandbytes_trains_the_adapters_only(lora):
    result = profile(llama(*lora.split("+")))
    trainable = lora_params(LLAMA_LINEARS)
    assert result.params_trainable == trainable
    assert result.memory.state_bytes["grads"] == trainable * 4
    assert result.memory.state_bytes["params"] == (sum(bnb_bytes(o, i, 4) for o, i in LLAMA_LINEARS)
                                                   + (LLAMA_FLOATS + trainable) * 4)


def test_bitsandbytes_quant_cannot_be_estimated_and_says_so():
    with pytest.raises(StrategyError, match="quant.backend bitsandbytes cannot be estimated on fake tensors"):
        estimate(llama("quant:bits=4,format=nf4,backend=bitsandbytes"))


@pytest.mark.parametrize(("strategy", "why"), [
    ("quant:bits=4,backend=bitsandbytes,embedding=true", "quant.embedding: the bitsandbytes backend"),
    ("quant:bits=4,backend=bitsandbytes,head=true", "quant.head: the bitsandbytes backend"),
    ("quant:bits=4,backend=bitsandbytes,group_size=100", "blocksize must be one of 32, 64"),
    ("quant:bits=8,backend=bitsandbytes,group_size=128", "one scale per output row"),
])
def test_bitsandbytes_quant_refusals_name_the_option(strategy, why):
    with pytest.raises(StrategyError, match=why):
        build_strategies(llama(strategy), "cpu")


# ---- optim8bit on bitsandbytes -------------------------------------------------------------------------------------

def test_bitsandbytes_adamw8bit_state_is_what_it_allocates():
    """bnb.optim.AdamW8bit: uint8 moments and a float32 absmax per 256-block for tensors of 4096 elements or more,
    float32 moments for smaller ones, and its two 256-entry float32 maps (shared by every parameter)."""
    spec = load_spec(CONFIGS / "tiny.yaml", {"steps": 1}, strategies=["optim8bit:backend=bitsandbytes"])
    numels = [p.numel() for p in prepare(spec).model.parameters() if p.requires_grad]
    expected = sum(8 * n if n < 4096 else 2 * n + 2 * 4 * math.ceil(n / 256) for n in numels) + 2 * 256 * 4
    result = profile(spec)
    assert result.memory.state_bytes["optimizer"] == expected
    assert estimate(spec).memory.state_bytes == result.memory.state_bytes


def test_bitsandbytes_adamw8bit_trains_as_adamw():
    sessions = [prepare(load_spec(CONFIGS / "tiny.yaml", {"batch_size": 2, "seq_len": 32}, strategies=strategies))
                for strategies in ([], ["optim8bit:backend=bitsandbytes"])]
    losses = [[train_step(session, step=i) for i in range(4)] for session in sessions]
    assert losses[0][0] == losses[1][0]  # the same model and batch before any step
    assert losses[1][3] == pytest.approx(losses[0][3], abs=1e-3)  # after 3 steps


# ---- without the libraries -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("strategy", "library"), [("quant:bits=4,backend=bitsandbytes", "bitsandbytes"),
                                                   ("optim8bit:backend=bitsandbytes", "bitsandbytes"),
                                                   ("lora:backend=peft", "peft")])
def test_a_backend_without_its_library_is_a_clear_error(monkeypatch, strategy, library):
    monkeypatch.setitem(sys.modules, library, None)  # `import library` now raises ImportError
    with pytest.raises(StrategyError, match=f"needs {library}, which is not installed here") as err:
        build_strategies(llama(strategy), "cpu")
    assert str(err.value).endswith("pip install 'memopt[hf]'")
