"""train.data / --data: batches from a text file (UTF-8 bytes for memopt's models)."""

from __future__ import annotations

import pytest

from memopt.analysis.estimate import estimate
from memopt.core.errors import MemoptError
from memopt.engine.step import make_batch
from memopt.spec import load_spec

from .helpers import CONFIGS, invoke, run


def test_batches_are_the_files_bytes_in_windows(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    spec = load_spec(CONFIGS / "tiny-decoder.yaml", {"data": str(path), "batch_size": 2, "seq_len": 8})
    tokens, targets = make_batch(spec, "cpu", step=1)
    raw = list(text.encode())
    assert tokens.tolist() == [raw[16:24], raw[24:32]]  # step 1, rows 2 and 3 of the 8-token windows
    assert targets.tolist() == [raw[17:25], raw[25:33]]
    assert run(spec).memory.peak_bytes == estimate(spec).memory.peak_bytes  # same shapes as random ids


def test_a_file_too_short_or_outside_the_vocabulary_is_one_error(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abc")
    with pytest.raises(MemoptError, match="train.data: .* has 3 tokens, fewer than seq_len"):
        make_batch(load_spec(CONFIGS / "tiny-decoder.yaml", {"data": str(short)}), "cpu")
    wide = tmp_path / "wide.txt"
    wide.write_text("é" * 200)
    spec = load_spec(CONFIGS / "tiny-decoder.yaml", {"data": str(wide), "seq_len": 8})
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"vocab_size": 100})})
    with pytest.raises(MemoptError, match="outside the model's vocabulary of 100"):
        make_batch(spec, "cpu")


def test_the_cli_names_the_option(tmp_path):
    result = invoke(["profile", CONFIGS / "tiny.yaml", "--data", tmp_path / "missing.txt"])
    assert result.exit_code == 1 and "missing.txt" in result.output and "Traceback" not in result.output
