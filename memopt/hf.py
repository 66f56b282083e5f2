"""Hugging Face causal LMs, offline: a local config.json, a checkpoint folder, or a model_type's default config.

transformers is an optional extra (``pip install 'memopt[hf]'``); nothing here imports it before a spec names
an ``hf`` model. Models are built with ``AutoModelForCausalLM.from_config`` (random weights, seeded by the
run) or, for a folder holding ``*.safetensors``, with ``from_pretrained`` (its real weights). Under
FakeTensorMode (``memopt estimate``) nothing is allocated: a 70B config estimates on a laptop.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from memopt.errors import MemoptError
from memopt.files import read_input
from memopt.wording import suggest

if TYPE_CHECKING:
    from memopt.spec import HfModelSpec

INSTALL = "pip install 'memopt[hf]'"
CONFIG_LIMIT_BYTES = 16 * 2**20
SAFETENSORS_HEADER_LIMIT = 100 * 2**20  # the format's own limit on a header
DROPOUT_FIELDS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout")


def _did_you_mean(word: str, choices: Any) -> str:
    """' (did you mean X?)' or ''. Not suggest's '; did you mean X?': a spec problem's '; ' separates problems
    (memopt.wording.describe splits on it, which would make the suggestion a problem of its own)."""
    hint = suggest(word, choices)
    return f" ({hint[2:]})" if hint else ""


def transformers_module() -> Any:
    """transformers, or a MemoptError naming the install command."""
    try:
        import transformers
    except ImportError:
        raise MemoptError(f"Hugging Face models need transformers: {INSTALL}") from None
    return transformers


def _causal_types() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def config_file(source: str) -> Path | None:
    """The config.json that ``source`` names (a file or a folder holding one), or None for a model_type name."""
    path = Path(source)
    if path.is_dir():
        return path / "config.json"
    if path.exists() or source.endswith(".json") or "/" in source:
        return path
    return None


def checkpoint_folder(source: str) -> Path | None:
    """The folder of ``source`` when it holds safetensors weights."""
    path = Path(source)
    folder = path if path.is_dir() else path.parent
    return folder if config_file(source) is not None and any(folder.glob("*.safetensors")) else None


def load_config(source: str, overrides: dict[str, Any]) -> Any:
    """The PretrainedConfig for ``source`` with ``overrides`` set; ValueError("hf: ..."/"config.KEY: ...")."""
    key = json.dumps(overrides, sort_keys=True, default=str)
    path = config_file(source)
    stamp = path.stat().st_mtime_ns if path is not None and path.is_file() else 0
    try:
        return _load_config(source, key, stamp)
    except MemoptError as exc:
        raise ValueError(str(exc)) from None


@functools.lru_cache(maxsize=32)
def _load_config(source: str, overrides_json: str, _stamp: int) -> Any:
    try:
        transformers = transformers_module()
    except MemoptError as exc:  # named as the spec's field: "model.hf: SOURCE: ... pip install ..."
        raise MemoptError(f"hf: {source}: {exc}") from None
    mapping = transformers.CONFIG_MAPPING
    causal = _causal_types()
    path = config_file(source)
    overrides = json.loads(overrides_json)
    data: dict[str, Any] = {}
    if path is None:
        if source not in mapping:
            raise MemoptError(f"hf: {source}: no such file, nor a model_type such as llama, mistral, gpt2, "
                              f"qwen2 or gemma{_did_you_mean(source, causal)}")
        model_type = source
    else:
        if not path.exists():
            where = f"{path.parent} has no config.json" if path.name == "config.json" else f"{path}: no such file"
            raise MemoptError(f"hf: {where}")
        try:
            data = json.loads(read_input(path, "config.json", CONFIG_LIMIT_BYTES))
        except MemoptError as exc:  # not a regular file, too large, not UTF-8: named after the field
            raise MemoptError(f"hf: {exc}") from None
        except json.JSONDecodeError as exc:
            raise MemoptError(f"hf: {path}: not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
        if not isinstance(data, dict):
            raise MemoptError(f"hf: {path}: expected a JSON object, got {type(data).__name__}")
        named = data.get("model_type")
        if not isinstance(named, str) or named not in mapping:
            raise MemoptError(f"hf: {path}: unknown model_type {named!r}{_did_you_mean(str(named), causal)}")
        model_type = named
    if model_type not in causal:
        raise MemoptError(f"hf: {source}: model_type {model_type} has no causal language model in transformers")
    cls = mapping[model_type]
    known = {*cls().to_dict(), *getattr(cls, "attribute_map", {})}
    for name in overrides:
        if name not in known:
            raise MemoptError(f"config.{name}: not a field of {cls.__name__}{_did_you_mean(name, known)}")
    try:
        return cls.from_dict({**data, **overrides})
    except Exception as exc:  # transformers validates fields its own way
        where = f"{path}" if path is not None else source
        text = " ".join(str(exc).split()).replace("; ", ", ")  # '; ' separates spec problems
        raise MemoptError(f"hf: {where}: {cls.__name__} refused it: {text}") from None


def config_facts(source: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The shape facts memopt reports (d_model, n_heads, ...) from a config."""
    config = load_config(source, overrides)
    heads = config.num_attention_heads
    d = config.hidden_size
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    dropout = max((float(getattr(config, name, 0.0) or 0.0) for name in DROPOUT_FIELDS), default=0.0)
    return {"model_type": config.model_type, "d_model": d, "n_heads": heads,
            "n_kv_heads": getattr(config, "num_key_value_heads", None) or heads, "n_layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size, "ffn_dim": ffn,
            "max_seq_len": getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2**20),
            "head_dim": getattr(config, "head_dim", None) or d // heads, "dropout": dropout,
            "tie_embeddings": bool(getattr(config, "tie_word_embeddings", False))}


def build_hf(spec: HfModelSpec, dtype: torch.dtype, device: str) -> nn.Module:
    """The causal LM of ``spec`` on ``device`` in ``dtype``: the checkpoint's weights when the folder has them (and
    tensors are real), random ones otherwise. A checkpoint whose shapes disagree with the config is refused, also
    under fake tensors (from its safetensors headers), so that estimate and profile answer alike."""
    transformers = transformers_module()
    config = load_config(spec.hf, spec.config)
    folder = None if spec.random_weights else checkpoint_folder(spec.hf)
    from memopt._torch_private import in_fake_mode

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
    from memopt.model import default_dtype

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

    from memopt._torch_private import is_fake

    original = masks.find_packed_sequence_indices

    def find(position_ids: torch.Tensor) -> torch.Tensor | None:
        return None if is_fake(position_ids) else original(position_ids)

    masks.find_packed_sequence_indices = find
    try:
        yield
    finally:
        masks.find_packed_sequence_indices = original
