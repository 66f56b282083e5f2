"""A run larger than the machine (or than --device-memory) is refused before anything is allocated."""

from __future__ import annotations

import re
import time

import pytest

from memopt.core.errors import OutOfMemory
from memopt.spec import load_spec

from .helpers import CONFIGS, invoke, run

# ~8.4e9 parameters (134 GB with AdamW): far over this machine, and quick to trace with two layers
# (scripts/probe_inputs.py runs the 48-layer spec, ~3 TiB, through the same paths)
HUGE = "model: {arch: decoder, d_model: 16384, n_heads: 128, n_layers: 2, vocab_size: 256000, max_seq_len: 512}\n" \
       "train: {batch_size: 1, seq_len: 512}\nrun: {device: cpu}\n"


def test_a_spec_far_larger_than_the_machine_is_refused_with_its_estimate(tmp_path):
    spec = tmp_path / "huge.yaml"
    spec.write_text(HUGE)
    started = time.perf_counter()
    result = invoke(["profile", spec])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert re.search(r"estimated peak is [\d.]+ (GiB|TiB)", result.output) and "nothing was run" in result.output
    assert "memopt optimize" in result.output or "would fit" in result.output
    assert time.perf_counter() - started < 120


def test_device_memory_refuses_an_estimate_over_it_naming_the_phase():
    with pytest.raises(OutOfMemory, match=r"estimated peak .* \(during (forward|backward|optimizer).*--device-memory"):
        run(load_spec(CONFIGS / "tiny.yaml"), device_memory=3 * 2**20)


def test_device_memory_holds_from_the_build_on(monkeypatch):
    """Even when the estimate is skipped, the build and the warm-up step are watched, not only measured steps."""
    import memopt.app.profile

    monkeypatch.setattr(memopt.app.profile, "ensure_fits_here", lambda *a, **k: None)
    with pytest.raises(OutOfMemory, match="in the model build"):
        run(load_spec(CONFIGS / "tiny.yaml"), device_memory=2**19)  # the parameters alone are 0.89 MiB
    with pytest.raises(OutOfMemory, match="in the warm-up step"):
        run(load_spec(CONFIGS / "tiny.yaml"), device_memory=4 * 2**20)


def test_estimate_fits_is_bounded_in_time(tmp_path):
    from memopt.analysis.estimate import fits

    spec = load_spec(CONFIGS / "tiny.yaml")
    started = time.perf_counter()
    found = fits(spec, 10**12, 2**20, deadline_s=0.5)
    assert time.perf_counter() - started < 0.5 + 5  # the deadline, then at most the estimate under way
    assert found.not_tried and found.tried + len(found.not_tried) >= 10


def test_profile_device_memory_is_a_clear_error():
    result = invoke(["profile", CONFIGS / "tiny.yaml", "--device-memory", "3MiB"])
    assert result.exit_code == 1 and "out of memory" in result.output and "Traceback" not in result.output
