"""Property: on any valid model shape, every registered strategy either is refused up front (with its
reason, before anything is built) or runs, and its estimate equals its profile. Never a crash mid-run."""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memopt.analysis.estimate import estimate
from memopt.core.errors import MemoptError, StrategyError
from memopt.spec import Spec, spec_from_data
from memopt.strategies import build_strategies, candidate_specs, registry

from .helpers import run

# fsdp/ddp start processes: tests/test_fsdp.py holds them to the same bar on their own shapes
SETTINGS = sorted({setting for name in registry() if not any(s.on_ranks for s in candidate_specs(name))
                   for setting in (name, *(s.label for s in candidate_specs(name)))})


@st.composite
def shapes(draw: st.DrawFn) -> dict:
    arch = draw(st.sampled_from(["encoder", "decoder"]))
    head_dim = draw(st.sampled_from([2, 4, 6, 8]) if arch == "decoder" else st.integers(1, 9))
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.integers(1, 3)) if arch == "decoder" else draw(st.integers(1, 4))
    seq = draw(st.integers(1, 24))
    model = {"arch": arch, "d_model": heads * head_dim, "n_heads": heads, "n_layers": draw(st.integers(1, 3)),
             "vocab_size": draw(st.sampled_from([2, 7, 50, 333, 1000])), "ffn_dim": draw(st.integers(1, 70)),
             "max_seq_len": seq + draw(st.integers(0, 8)),
             "attention": draw(st.sampled_from(["eager", "sdpa"]))}
    if arch == "decoder":
        model["n_kv_heads"] = kv_heads
    return {"model": model,
            "train": {"batch_size": draw(st.integers(1, 5)), "seq_len": seq, "steps": 1,
                      "optimizer": draw(st.sampled_from(["adamw", "sgd", "none"]))},
            "run": {"device": "cpu", "dtype": draw(st.sampled_from(["float32", "bfloat16", "float16"])), "seed": 0}}


def refused_up_front(spec: Spec) -> str | None:
    """What ``compare`` checks before any run starts: the strategies' own checks and refused pairs."""
    try:
        build_strategies(spec, "cpu")
    except StrategyError as exc:
        return str(exc)
    return None


@settings(max_examples=int(os.environ.get("MEMOPT_SHAPE_EXAMPLES", "40")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=shapes(), setting=st.sampled_from(SETTINGS))
def test_every_strategy_runs_or_is_refused_up_front_on_any_shape(data, setting):
    try:
        spec = spec_from_data(data, strategies=[setting])
    except MemoptError as exc:  # an option the shape makes invalid is a spec error, reported before a build
        assert str(exc)
        return
    if refused_up_front(spec) is not None:
        return
    real = run(spec)
    traced = estimate(spec)
    assert real.memory is not None and traced.memory is not None
    assert traced.memory.peak_bytes == pytest.approx(real.memory.peak_bytes, rel=0.01)
    for key, value in real.memory.state_bytes.items():
        assert traced.memory.state_bytes[key] == pytest.approx(value, rel=0.01, abs=64)
    if spec.run.dtype != "float16":
        assert math.isfinite(real.loss)
    else:
        assert math.isfinite(real.loss) or real.warnings
