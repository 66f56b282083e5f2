"""--mode infer / generate: KV cache bytes, greedy tokens with and without a cache, the kv strategies,
estimate == profile, what fits, and bad input."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from memopt.analysis.capacity import capacity, largest_fitting
from memopt.analysis.estimate import estimate
from memopt.core.errors import MemoptError, StrategyError
from memopt.core.results import RunResult
from memopt.engine.inference import generate, greedy_without_cache, prompt_batch
from memopt.engine.step import prepare
from memopt.spec import Spec, load_spec, spec_from_data

from .helpers import CONFIGS, invoke, run

# odd on purpose: 3 sequences of 37 + 9 tokens, grouped-query attention (4 query heads over 2 KV heads of 32)
LAYERS, KV_HEADS, HEAD_DIM, BATCH, PROMPT, NEW = 2, 2, 32, 3, 37, 9
MODEL = dict(arch="decoder", d_model=128, n_heads=4, n_kv_heads=KV_HEADS, n_layers=LAYERS, vocab_size=301,
             ffn_dim=200, max_seq_len=128)


def gen_spec(strategies: list[str] | tuple[str, ...] = (), *, cache: str = "static", dtype: str = "float32",
             mode: str = "generate", **model: Any) -> Spec:
    return spec_from_data({"model": {**MODEL, **model}, "train": {"batch_size": BATCH, "seq_len": 40, "steps": 1},
                           "run": {"device": "cpu", "dtype": dtype, "mode": mode},
                           "generate": {"prompt_len": PROMPT, "new_tokens": NEW, "cache": cache}},
                          strategies=list(strategies))


def kv_formula(positions: int, dtype_bytes: int, batch: int = BATCH) -> int:
    return 2 * LAYERS * KV_HEADS * HEAD_DIM * positions * batch * dtype_bytes


def tokens(spec: Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """(greedy tokens with the spec's cache and strategies, the same model's tokens recomputed without a cache)."""
    with torch.inference_mode():
        session = prepare(spec)
        prompt = prompt_batch(spec, "cpu")
        return generate(session, prompt).tokens, greedy_without_cache(session, prompt, spec.generate.new_tokens)


# ---- the KV cache's bytes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,size", [("float32", 4), ("bfloat16", 2)])
def test_static_cache_bytes_are_the_formula_exactly_with_gqa(dtype, size):
    result = run(gen_spec(dtype=dtype))
    mem, facts = result.memory, result.inference
    assert mem is not None and facts is not None
    expected = kv_formula(PROMPT + NEW, size)
    assert mem.state_bytes["kv_cache"] == facts["kv_cache_bytes"] == mem.category_peak_bytes["kv_cache"] == expected
    assert facts["growth_bytes"] == 0
    assert set(mem.peak_breakdown) == {"params", "buffers", "kv_cache", "temporaries"}
    assert set(mem.phase_peak_bytes) == {"prefill", "decode"}
    assert facts["time_to_first_token_s"] > 0 and facts["decode_tokens_per_s"] > 0


def test_growing_cache_holds_what_was_seen_and_costs_one_layer_copy_at_its_peak():
    """Concatenation keeps a layer's old keys while the grown ones are written: at the last step that is one
    layer's keys of every position but the last, on top of the whole cache."""
    result = run(gen_spec(cache="dynamic"))
    facts = result.inference
    assert facts is not None
    seen = PROMPT + NEW - 1  # the last token is generated, never fed back
    assert facts["kv_cache_bytes"] == kv_formula(seen, 4)
    assert facts["growth_bytes"] == BATCH * KV_HEADS * (seen - 1) * HEAD_DIM * 4
    assert facts["kv_cache_peak_bytes"] == facts["kv_cache_bytes"] + facts["growth_bytes"]


def test_window_cache_holds_the_window_only():
    result = run(gen_spec(["kv_window:window=16"]))
    assert result.inference is not None and result.inference["kv_cache_bytes"] == kv_formula(16, 4)


@pytest.mark.parametrize("bits,limit", [(8, 0.55), (4, 0.30)])
def test_quantized_cache_is_a_fraction_of_the_fp16_cache_scales_included(bits, limit):
    fp16 = run(gen_spec(dtype="bfloat16"))
    quant = run(gen_spec([f"kv_quant:bits={bits}"], dtype="bfloat16"))
    assert fp16.inference is not None and quant.inference is not None
    codes = kv_formula(PROMPT + NEW, 1) * bits // 8
    scales = 2 * LAYERS * KV_HEADS * (PROMPT + NEW) * BATCH * 2  # one float16 per token, head, k/v
    assert quant.inference["kv_cache_bytes"] == codes + scales
    ratio = quant.inference["kv_cache_bytes"] / fp16.inference["kv_cache_bytes"]
    assert ratio <= limit, ratio
    drift = quant.drift
    assert drift is not None and 0 < drift["logits_rel_error"] < (0.01 if bits == 8 else 0.1)
    assert 0 <= drift["tokens_differ"] <= 1


# ---- greedy tokens: the cache changes nothing -------------------------------------------------------------------

@pytest.mark.parametrize("strategies,cache,attention", [
    ((), "static", "sdpa"), ((), "dynamic", "sdpa"), ((), "static", "eager"), ((), "dynamic", "eager"),
    (("chunked_prefill:chunk=8",), "static", "sdpa"), (("chunked_prefill:chunk=5",), "dynamic", "eager"),
    (("offload",), "static", "sdpa"),
])
def test_greedy_tokens_with_a_cache_equal_tokens_recomputed_without(strategies, cache, attention):
    with_cache, without = tokens(gen_spec(strategies, cache=cache, attention=attention))
    assert with_cache.shape == (BATCH, NEW)
    assert torch.equal(with_cache, without)


def test_lossy_kv_strategies_report_token_drift():
    result = run(gen_spec(["kv_window:window=8"]))
    assert result.drift is not None and result.drift["tokens_differ"] > 0  # 8 of 46 positions: it shows


# ---- estimate == profile ----------------------------------------------------------------------------------------

GENERATE_SETS = [(), ("kv_quant:bits=8",), ("kv_quant:bits=4",), ("kv_window:window=16",), ("chunked_prefill:chunk=8",),
                 ("quant:bits=4",), ("sdpa",), ("offload",), ("prune:ffn=0.5",),
                 ("kv_quant:bits=4", "chunked_prefill:chunk=8", "quant:bits=4")]


@pytest.mark.parametrize("strategies", GENERATE_SETS, ids=lambda s: "+".join(s) or "baseline")
def test_generate_estimate_equals_profile(strategies):
    spec = gen_spec(strategies, attention="eager" if "sdpa" in strategies else "sdpa")
    real, traced = run(spec), estimate(spec)
    assert real.memory is not None and traced.memory is not None
    assert traced.memory.peak_bytes == pytest.approx(real.memory.peak_bytes, rel=0.01)
    assert traced.memory.state_bytes["kv_cache"] == real.memory.state_bytes["kv_cache"]


def test_dynamic_cache_estimate_equals_profile():
    spec = gen_spec(cache="dynamic")
    real, traced = run(spec), estimate(spec)
    assert real.memory is not None and traced.memory is not None
    assert traced.memory.peak_bytes == pytest.approx(real.memory.peak_bytes, rel=0.01)
    assert traced.inference is not None and real.inference is not None
    assert traced.inference["growth_bytes"] == real.inference["growth_bytes"]


@pytest.mark.parametrize("strategies", [(), ("quant:bits=8",), ("sdpa",), ("prune:ffn=0.5",), ("offload",)],
                         ids=lambda s: "+".join(s) or "baseline")
@pytest.mark.parametrize("config", ["tiny.yaml", "tiny-decoder.yaml"])
def test_infer_estimate_equals_profile_and_nothing_trains(config, strategies):
    spec = load_spec(CONFIGS / config, {"mode": "infer"}, list(strategies))
    real, traced = run(spec), estimate(spec)
    assert real.memory is not None and traced.memory is not None
    assert set(real.memory.peak_breakdown) == {"params", "buffers", "kv_cache", "temporaries"}
    assert real.memory.peak_breakdown["kv_cache"] == 0
    assert set(real.memory.phase_peak_bytes) == {"forward"}
    assert traced.memory.peak_bytes == pytest.approx(real.memory.peak_bytes, rel=0.01)
    assert real.inference is not None and real.inference["tokens_per_s"] > 0


# ---- what fits -------------------------------------------------------------------------------------------------

def test_largest_fitting_finds_the_last_size_under_the_budget():
    calls: list[int] = []

    def peak(n: int) -> int:
        calls.append(n)
        return 1000 + 37 * n + n * n // 50

    for budget in (1000, 1037, 5000, 40_000, 10**9):
        found = largest_fitting(peak, 1, 10_000, budget)
        best = max((n for n in range(1, 10_001) if peak(n) <= budget), default=None)
        assert (found[0] if found else None) == best
    assert largest_fitting(peak, 1, 100, 999) is None


def test_capacity_answers_are_the_largest_that_fit_by_estimate():
    spec = gen_spec()
    one = estimate(spec)
    assert one.memory is not None
    budget = int(one.memory.peak_bytes * 1.7)
    cap = capacity(spec, budget)
    assert cap.batch is not None and cap.context is not None
    batch, peak = cap.batch
    assert peak <= budget
    above = estimate(spec.model_copy(update={"train": spec.train.model_copy(update={"batch_size": batch + 1})}))
    assert above.memory is not None and above.memory.peak_bytes > budget
    context, peak = cap.context
    assert peak <= budget and PROMPT + NEW < context <= MODEL["max_seq_len"]
    assert cap.formula["max_batch"] >= 1 and cap.estimates <= 20


def test_fits_in_generate_mode_prints_both_answers_and_the_formula():
    result = invoke(["estimate", CONFIGS / "tiny-decoder.yaml", "--mode", "generate", "--prompt-len", "24",
                     "--new-tokens", "8", "--fits", "4MiB", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    cap = doc["capacity"]
    assert cap["max_batch"] > 4 and cap["max_batch_peak_bytes"] <= 4 * 2**20
    assert cap["max_context"] == 64  # the model's max_seq_len: batch 4 fits all of it
    assert cap["formula"]["max_batch"] >= cap["max_batch"]  # the formula leaves out the prefill's working set
    run_doc = doc["runs"][0]
    assert run_doc["inference"]["kv_cache_bytes"] == 2 * 2 * 2 * 8 * 32 * 4 * 4  # layers, kv heads, head dim, fp32


def test_fits_that_nothing_satisfies_exits_1_naming_the_option():
    result = invoke(["estimate", CONFIGS / "tiny-decoder.yaml", "--mode", "generate", "--prompt-len", "24",
                     "--new-tokens", "8", "--fits", "64KiB"])
    assert result.exit_code == 1
    assert "--fits 64KiB: nothing fits" in result.output and "Traceback" not in result.output


# ---- the CLI and bad input --------------------------------------------------------------------------------------

def test_profile_generate_json_and_tables(tmp_path):
    out = tmp_path / "gen.json"
    result = invoke(["profile", CONFIGS / "tiny-decoder.yaml", "--mode", "generate", "--prompt-len", "24",
                     "--new-tokens", "6", "--cache", "dynamic", "--json-out", out, "-s", "kv_window:window=12"])
    assert result.exit_code == 1  # kv_window needs a static cache
    assert "kv_window: the window is a preallocated ring" in result.output
    result = invoke(["profile", CONFIGS / "tiny-decoder.yaml", "--mode", "generate", "--prompt-len", "24",
                     "--new-tokens", "6", "--json-out", out, "-s", "kv_quant:bits=4"])
    assert result.exit_code == 0, result.output
    for text in ("KV cache", "Time to first token", "Decode throughput", "kv_cache", "prefill", "decode",
                 "tokens,"):
        assert text in result.stdout
    doc = json.loads(out.read_text())
    run_doc = doc["runs"][0]
    assert doc["spec"]["run"]["mode"] == "generate" and doc["spec"]["generate"]["prompt_len"] == 24
    assert run_doc["inference"]["mode"] == "generate" and "tokens_differ" in run_doc["drift"]
    back = RunResult.from_json(run_doc)
    assert back.inference == run_doc["inference"]


def test_compare_and_check_in_generate_mode(tmp_path):
    args = [CONFIGS / "tiny-decoder.yaml", "--mode", "generate", "--prompt-len", "24", "--new-tokens", "6"]
    result = invoke(["compare", *args, "-s", "kv_quant,chunked_prefill:chunk=8", "--json"])
    assert result.exit_code == 0, result.output
    runs = json.loads(result.stdout)["runs"]
    assert [r["name"] for r in runs] == ["baseline", "kv_quant", "chunked_prefill:chunk=8"]
    assert runs[1]["inference"]["kv_cache_bytes"] < runs[0]["inference"]["kv_cache_bytes"]
    baseline = tmp_path / "base.json"
    assert invoke(["check", *args, "--baseline", baseline, "--update"]).exit_code == 0
    assert invoke(["check", *args, "--baseline", baseline]).exit_code == 0
    mismatched = invoke(["check", CONFIGS / "tiny-decoder.yaml", "--baseline", baseline])
    assert mismatched.exit_code == 1 and "run.mode" in mismatched.output


@pytest.mark.parametrize("args,expected", [
    (["--mode", "generate", "--prompt-len", "60", "--new-tokens", "8"],
     "--new-tokens (generate.new_tokens): prompt_len 60 + new_tokens 8 = 68 exceeds model.max_seq_len 64"),
    (["--prompt-len", "8"], "--prompt-len: applies to --mode generate (run.mode is train)"),
    (["--mode", "infer", "--cache", "dynamic"], "--cache: applies to --mode generate (run.mode is infer)"),
    (["--mode", "generate", "--prompt-len", "24", "--new-tokens", "4", "--seq-len", "8"],
     "--seq-len: --mode generate takes its lengths from --prompt-len"),
    (["--mode", "gen"], "--mode (run.mode): input should be 'train', 'infer' or 'generate'"),
    (["--mode", "generate", "--prompt-len", "0"], "--prompt-len (generate.prompt_len): input should be greater than 0"),
    (["--mode", "generate", "--cache", "paged"], "--cache (generate.cache): input should be 'static' or 'dynamic'"),
    (["-s", "kv_quant"], "kv_quant: applies to --mode generate, not to run.mode train"),
    (["--mode", "infer", "-s", "kv_window"], "kv_window: applies to --mode generate, not to run.mode infer"),
    (["--mode", "generate", "--prompt-len", "24", "--new-tokens", "4", "-s", "ckpt"],
     "ckpt: applies to --mode train, not to run.mode generate"),
    (["--mode", "generate", "--prompt-len", "24", "--new-tokens", "4", "-s", "quant:lora=8"],
     "quant.lora: adapters are for training"),
    (["--mode", "generate", "--prompt-len", "24", "--new-tokens", "4", "-s", "chunked_prefill:chunk=24"],
     "chunked_prefill.chunk: 24 covers the whole prompt"),
    (["--mode", "generate", "--prompt-len", "24", "--new-tokens", "4", "-s", "kv_window:window=28"],
     "kv_window.window: 28 keeps every one of the 28 positions"),
    (["--mode", "generate", "--prompt-len", "24", "--new-tokens", "4", "-s", "kv_quant:bits=2"],
     "kv_quant.bits: input should be 8 or 4"),
    (["--mode", "generate", "--prompt-len", "24", "--new-tokens", "4", "-s", "kv_quant+kv_window:window=8"],
     "kv_quant+kv_window: refused"),
])
def test_bad_inference_input_exits_1_naming_the_field(args, expected):
    result = invoke(["profile", CONFIGS / "tiny-decoder.yaml", *args])
    assert result.exit_code == 1, result.output
    assert expected in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def test_generate_on_an_encoder_exits_1_naming_the_mode():
    result = invoke(["profile", CONFIGS / "tiny.yaml", "--mode", "generate", "--prompt-len", "8", "--new-tokens",
                     "4"])
    assert result.exit_code == 1
    assert "--mode (run.mode): generate needs a causal decoder" in " ".join(result.output.split())


def test_a_kv_strategy_in_a_training_spec_is_refused_before_anything_runs():
    spec = spec_from_data({"model": MODEL, "train": {"batch_size": 2, "seq_len": 16}, "run": {"device": "cpu"}},
                          strategies=["kv_quant"])
    with pytest.raises(StrategyError, match="kv_quant: applies to --mode generate"):
        prepare(spec)
    with pytest.raises(MemoptError):
        estimate(spec)


def test_timeline_and_optimize_in_generate_mode(tmp_path):
    args = [CONFIGS / "tiny-decoder.yaml", "--mode", "generate", "--prompt-len", "24", "--new-tokens", "6"]
    page = tmp_path / "t.html"
    assert invoke(["profile", *args, "--timeline", page]).exit_code == 0
    run = json.loads(page.read_text().split('id="memopt-timeline">')[1].split("</script>")[0])["runs"][0]
    assert run["categories"] == ["params", "buffers", "kv_cache", "temporaries"]
    assert {"prefill", "decode"} <= {run["names"][i] for i in run["samples"]["phase"]}
    base = json.loads(invoke(["estimate", *args, "--json"]).stdout)["runs"][0]["peak_bytes"]
    out = tmp_path / "best.yaml"
    result = invoke(["optimize", *args, "--budget", f"{int(base * 0.9)}B", "--allow-lossy", "--top", "1", "-o", out])
    assert result.exit_code == 0, result.output
    assert "mode: generate" in out.read_text()


# ---- on a GPU (skipped without one) ---------------------------------------------------------------------------

def cuda_spec(strategies: tuple[str, ...] = (), cache: str = "static") -> Spec:
    data = gen_spec(strategies, cache=cache).to_dict()
    data["run"]["device"] = "cuda"
    return spec_from_data(data)


@pytest.mark.parametrize("strategies,cache", [((), "static"), ((), "dynamic"), (("kv_quant:bits=4",), "static"),
                                              (("chunked_prefill:chunk=8",), "static"), (("offload",), "static")])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generate_tokens_bytes_and_estimate(strategies, cache):
    spec = cuda_spec(strategies, cache)
    if not strategies or strategies[0].startswith(("chunked", "offload")):
        with_cache, without = tokens(spec)
        assert torch.equal(with_cache, without)
    real, traced = run(spec), estimate(spec)
    assert real.memory is not None and traced.memory is not None and real.inference is not None
    if not strategies and cache == "static":
        assert real.inference["kv_cache_bytes"] == kv_formula(PROMPT + NEW, 4)  # whole 512-byte blocks here
    assert traced.memory.peak_bytes == pytest.approx(real.memory.peak_bytes, rel=0.01)
    assert real.host.cuda is not None and real.host.cuda["max_allocated_bytes"] >= real.memory.peak_bytes * 0.9


def test_chunked_prefill_and_weight_offload_save_what_they_say():
    """chunked_prefill bounds the prefill's working set (its phase peak falls, the decode's does not move);
    offload in inference keeps at most 1 + prefetch units of weights on the device."""
    base = run(gen_spec())
    chunked = run(gen_spec(["chunked_prefill:chunk=8"]))
    offloaded = run(gen_spec(["offload"]))
    assert base.memory is not None and chunked.memory is not None and offloaded.memory is not None
    assert chunked.memory.phase_peak_bytes["prefill"] < base.memory.phase_peak_bytes["prefill"]
    assert chunked.memory.phase_peak_bytes["decode"] == base.memory.phase_peak_bytes["decode"]
    assert chunked.memory.state_bytes["kv_cache"] == base.memory.state_bytes["kv_cache"]
    # units: embedding, 2 blocks, norm, head; two consecutive ones resident at most: here the two blocks
    d, f, kv = MODEL["d_model"], MODEL["ffn_dim"], KV_HEADS * HEAD_DIM
    block = (2 * d * d + 2 * kv * d + 3 * f * d + 2 * d) * 4  # q, o, k, v, SwiGLU, two RMSNorms
    assert offloaded.memory.category_peak_bytes["params"] == 2 * block
    assert offloaded.strategy_facts["offload"]["moved_to_device_bytes"] > base.memory.state_bytes["params"]
