"""Hugging Face causal LMs, offline: a local config.json, a checkpoint folder, or a model_type's default config.

transformers is an optional extra (``pip install 'memopt[hf]'``); nothing here imports it before a spec names
an ``hf`` model. Models are built with ``AutoModelForCausalLM.from_config`` (random weights, seeded by the
run) or, for a folder holding ``*.safetensors``, with ``from_pretrained`` (its real weights). Under
FakeTensorMode (``memopt estimate``) nothing is allocated: a 70B config estimates on a laptop.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memopt.core._torch_private import in_fake_mode, is_fake
from memopt.core.errors import MemoptError
from memopt.core.files import ensure_regular
from memopt.model.transformer import default_dtype
from memopt.spec import HfModelSpec
from memopt.spec.hf_config import checkpoint_folder, load_config, transformers_module

SAFETENSORS_HEADER_LIMIT = 100 * 2**20  # the format's own limit on a header


def build_hf(spec: HfModelSpec, dtype: torch.dtype, device: str) -> nn.Module:
    """The causal LM of ``spec`` on ``device`` in ``dtype``: the checkpoint's weights when the folder has them (and
    tensors are real), random ones otherwise. A checkpoint whose shapes disagree with the config is refused, also
    under fake tensors (from its safetensors headers), so that estimate and profile answer alike."""
    transformers = transformers_module()
    config = load_config(spec.hf, spec.config)
    folder = None if spec.random_weights else checkpoint_folder(spec.hf)
    if folder is not None:
        checked_folder(folder)
    if folder is not None and not in_fake_mode():
        try:
            with _quiet(transformers):  # its progress bar and load report (our message says what is wrong)
                model, info = transformers.AutoModelForCausalLM.from_pretrained(
                    folder, config=config, dtype=dtype, attn_implementation=spec.attention,
                    ignore_mismatched_sizes=True, output_loading_info=True)
        except Exception as exc:
            raise MemoptError(f"hf: {folder}: cannot load the checkpoint: {_first_sentence(exc, spec)}") from None
        _refuse_mismatch(folder, [(name, tuple(saved), tuple(built)) for name, saved, built in info["mismatched_keys"]])
        missing = sorted(info["missing_keys"])
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise MemoptError(f"hf: {folder}: the checkpoint has no weights for {missing[0]}{more} (they would be "
                              "random, set random_weights: true to use random weights throughout)")
        return model.to(device)
    try:
        with torch.device(device), default_dtype(dtype):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                                  attn_implementation=spec.attention)
    except Exception as exc:  # e.g. an architecture without sdpa attention (Gemma2)
        raise MemoptError(f"hf: {spec.hf}: transformers cannot build it: {_first_sentence(exc, spec)}") from None
    if folder is not None:  # fake tensors: the weights are not read, their shapes are
        saved = checkpoint_shapes(folder)
        _refuse_mismatch(folder, [(name, saved[name], tuple(t.shape)) for name, t in model.state_dict().items()
                                  if name in saved and saved[name] != tuple(t.shape)])
    return model


def _first_sentence(exc: Exception, spec: HfModelSpec) -> str:
    """transformers' error on one line, up to its first full stop, with a hint when what it lacks is sdpa."""
    text = " ".join(str(exc).split())
    first = text.split(". ")[0].rstrip(".") if text else type(exc).__name__
    if spec.attention == "sdpa" and "scaled_dot_product_attention" in text:
        first += " (set model.attention: eager)"
    return first


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """transformers' logging at errors only and its progress bars off, restored after."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


CHECKPOINT_FILES = ("*.safetensors", "*.json", "*.model", "*.txt", "*.bin", "*.tiktoken")


def checked_folder(folder: Path) -> None:
    """Every file memopt or transformers may open in a checkpoint folder (weights, index, tokenizer) is a regular
    file: a FIFO named model.safetensors would hang the read, as it would a spec's."""
    for pattern in CHECKPOINT_FILES:
        for file in sorted(folder.glob(pattern)):
            try:
                ensure_regular(file, "checkpoint")
            except MemoptError as exc:
                raise MemoptError(f"hf: {exc}") from None


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the JSON headers of the folder's ``*.safetensors`` files (no weights read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with file.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 0 < size <= SAFETENSORS_HEADER_LIMIT:
                    raise ValueError(f"a header of {size} bytes")
                header = json.loads(f.read(size))
            shapes.update({name: tuple(int(n) for n in entry["shape"]) for name, entry in header.items()
                           if name != "__metadata__"})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MemoptError(f"hf: {file}: not a safetensors file ({exc})") from None
    return shapes


def _refuse_mismatch(folder: Path, wrong: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> None:
    """MemoptError naming the folder and the first tensor whose saved shape is not the config's."""
    if not wrong:
        return
    name, saved, built = sorted(wrong)[0]
    more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
    raise MemoptError(f"hf: {folder}: the checkpoint's shapes disagree with its config: {name} is {list(saved)} in "
                      f"the checkpoint, {list(built)} by the config{more}")


def tokenizer_for(source: str) -> Any | None:
    """The checkpoint folder's tokenizer, or None when it has none."""
    path = Path(source)
    folder = path if path.is_dir() else path.parent
    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    checked_folder(folder)
    transformers = transformers_module()
    try:
        return transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise MemoptError(f"hf: {folder}: cannot load its tokenizer: {exc}") from None


@contextlib.contextmanager
def unpacked_positions() -> Iterator[None]:
    """Tell transformers that memopt's batches are not packed sequences, also under fake tensors.

    transformers looks for packed sequences in the position ids and, when it cannot read their values (fake
    tensors look like tracing to it), assumes packing and materialises a (b, 1, s, s) mask instead of SDPA's
    is_causal: an estimate would then trace another attention than the run. memopt's positions are always
    0..s-1 (no packing, no cache), which is what this says.
    """
    import transformers.masking_utils as masks

    original = masks.find_packed_sequence_indices

    def find(position_ids: torch.Tensor) -> torch.Tensor | None:
        return None if is_fake(position_ids) else original(position_ids)

    masks.find_packed_sequence_indices = find
    try:
        yield
    finally:
        masks.find_packed_sequence_indices = original
