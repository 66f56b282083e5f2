"""Batches from a text file (``train.data``): its tokens in windows of seq_len + 1, cycled; and the windows of the
held-out text (``train.held_out``) that lossy strategies are judged on.

Tokenized with a Hugging Face checkpoint folder's tokenizer when the model has one, else as UTF-8 bytes (ids
0-255, which needs a vocabulary of at least 256). Without ``train.data`` batches are seeded random token ids.
"""

from __future__ import annotations

import functools

import torch

from memopt.adapters.build import vocab_size
from memopt.core.errors import MemoptError
from memopt.core.files import read_input
from memopt.model.hf import tokenizer_for
from memopt.spec import HfModelSpec, Spec

DATA_LIMIT_BYTES = 256 * 2**20


def text_batch(spec: Spec, device: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``step * batch .. (step + 1) * batch`` of the file's windows (wrapping around): inputs and next-token
    targets, (batch, seq) each."""
    assert spec.train.data is not None
    ids = _tokens(spec.train.data, spec.model.hf if isinstance(spec.model, HfModelSpec) else None)
    b, s = spec.train.batch_size, spec.train.seq_len
    if len(ids) < s + 1:
        raise MemoptError(f"train.data: {spec.train.data} has {len(ids)} tokens, fewer than seq_len + 1 = {s + 1}")
    vocab = vocab_size(spec.model)
    if max(ids) >= vocab:
        raise MemoptError(f"train.data: token id {max(ids)} is outside the model's vocabulary of {vocab}"
                          + ("" if isinstance(spec.model, HfModelSpec) else " (bytes need vocab_size >= 256)"))
    windows = (len(ids) - 1) // s
    starts = [((step * b + row) % windows) * s for row in range(b)]
    # the corpus stays Python data: a view of a corpus tensor would make the tracker count the whole corpus
    rows = torch.tensor([ids[start:start + s + 1] for start in starts], dtype=torch.long).to(device)
    return rows[:, :-1], rows[:, 1:]


def held_out_rows(spec: Spec, device: str, rows: int, length: int) -> torch.Tensor:
    """The first ``rows`` windows of ``length`` tokens of ``train.held_out`` (rows, length), tokenized as train.data;
    fewer rows when the text is shorter, an error when it has not one window."""
    assert spec.train.held_out is not None
    hf_source = spec.model.hf if isinstance(spec.model, HfModelSpec) else None
    ids = _tokens(spec.train.held_out, hf_source, "train.held_out")
    if len(ids) < length:
        raise MemoptError(f"train.held_out: {spec.train.held_out} has {len(ids)} tokens, fewer than the {length} one "
                          "window needs")
    vocab = vocab_size(spec.model)
    if max(ids) >= vocab:
        raise MemoptError(f"train.held_out: token id {max(ids)} is outside the model's vocabulary of {vocab}")
    count = min(rows, len(ids) // length)
    return torch.tensor([ids[i * length:(i + 1) * length] for i in range(count)], dtype=torch.long).to(device)


@functools.lru_cache(maxsize=4)
def _tokens(path: str, hf_source: str | None, field: str = "train.data") -> tuple[int, ...]:
    text = read_input(path, field, DATA_LIMIT_BYTES)
    tokenizer = None
    if hf_source is not None:
        tokenizer = tokenizer_for(hf_source)
    if tokenizer is not None:
        return tuple(tokenizer(text)["input_ids"])
    return tuple(text.encode("utf-8"))
