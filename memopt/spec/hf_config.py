"""Hugging Face configs, offline: a local config.json, a checkpoint folder, or a model_type's default config.

transformers is an optional extra (``pip install 'memopt[hf]'``), imported only when a spec names an ``hf`` model.
These functions read and check configs; memopt.model.hf builds the model from them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from memopt.core.errors import MemoptError
from memopt.core.files import read_input
from memopt.core.wording import suggest

INSTALL = "pip install 'memopt[hf]'"
CONFIG_LIMIT_BYTES = 16 * 2**20
DROPOUT_FIELDS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout")


def _did_you_mean(word: str, choices: Any) -> str:
    """' (did you mean X?)' or ''. Not suggest's '; did you mean X?': a spec problem's '; ' separates problems
    (memopt.core.wording.describe splits on it, which would make the suggestion a problem of its own)."""
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


def is_bare_name(source: str) -> bool:
    """A name with no path in it (``phi3``), which means a model_type when transformers knows one by that name."""
    return "/" not in source and not source.endswith(".json") and source not in ("", ".", "..")


def is_model_type(source: str) -> bool:
    """Whether transformers knows ``source`` as a model_type (False without transformers)."""
    try:
        from transformers import CONFIG_MAPPING
    except ImportError:
        return False
    return source in CONFIG_MAPPING


def shadow_note(source: str) -> str | None:
    """What to tell the user when ``source`` is a model_type and a file or folder of that name exists here too."""
    if is_bare_name(source) and Path(source).exists() and is_model_type(source):
        return f"model.hf: {source} is the model_type; for the folder of that name write ./{source}"
    return None


def config_file(source: str) -> Path | None:
    """The config.json that ``source`` names (a file or a folder holding one), or None for a model_type name. A
    model_type's name means the model_type even where a folder of that name exists (that folder is ./NAME)."""
    path = Path(source)
    if is_bare_name(source) and is_model_type(source):
        return None
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
    if path is None:
        if source not in mapping:
            raise MemoptError(f"hf: {source}: no such file, nor a model_type such as llama, mistral, gpt2, "
                              f"qwen2 or gemma{_did_you_mean(source, causal)}")
        data: dict[str, Any] = {}
        model_type = source
    else:
        data = _config_json(path)
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
    where = f"{path}" if path is not None else source
    try:
        config = cls.from_dict({**data, **overrides})
    except Exception as exc:  # transformers validates fields its own way
        text = " ".join(str(exc).split()).replace("; ", ", ")  # '; ' separates spec problems
        raise MemoptError(f"hf: {where}: {cls.__name__} refused it: {text}") from None
    problems = size_problems(_shape(config))
    if problems:
        raise MemoptError("; ".join(f"hf: {where}: {problem}" for problem in problems))
    return config


# the bounds memopt's own model spec has (memopt.spec.schema.ModelSpec): far above any published model
SIZE_LIMITS = {"hidden_size": 2**17, "num_attention_heads": 2**12, "num_key_value_heads": 2**12,
               "num_hidden_layers": 1024, "vocab_size": 2**24, "intermediate_size": 2**20, "head_dim": 2**16}


def size_problems(shape: dict[str, Any]) -> list[str]:
    """What is wrong with a config's sizes: each a whole number from 1 to its limit, heads dividing as attention
    needs (without this, a vocabulary of 10**12 reaches the run, and a zero or a negative, PyTorch)."""
    problems = []
    for field, limit in SIZE_LIMITS.items():
        value = shape.get(field)
        if value is None and field in ("intermediate_size", "head_dim", "num_key_value_heads"):
            continue  # optional: derived by the model
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            problems.append(f"{field}: expected a whole number from 1 to {limit:,}, got {value!r}")
    if problems:
        return problems
    heads, kv = shape["num_attention_heads"], shape.get("num_key_value_heads") or shape["num_attention_heads"]
    if shape.get("head_dim") is None and shape["hidden_size"] % heads:
        problems.append(f"num_attention_heads: {heads} does not divide hidden_size {shape['hidden_size']}")
    if heads % kv:
        problems.append(f"num_key_value_heads: {kv} does not divide num_attention_heads {heads}")
    return problems


def _shape(config: Any) -> dict[str, Any]:
    """A config's size fields under Llama's names (GPT-2's n_embd, n_head, n_layer, n_inner map to them)."""
    return {"hidden_size": config.hidden_size, "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": getattr(config, "num_key_value_heads", None),
            "num_hidden_layers": config.num_hidden_layers, "vocab_size": config.vocab_size,
            "intermediate_size": getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None),
            "head_dim": getattr(config, "head_dim", None)}


def _config_json(path: Path) -> dict[str, Any]:
    """A config.json's object; MemoptError naming ``hf`` when it is missing, not a regular file, or not an object."""
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
    return data


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
