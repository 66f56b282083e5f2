"""A spec from YAML text, a file, a preset name or plain data, with command-line overrides: every problem collected
and reported together, each with its path (``model.n_heads: 7 does not divide d_model 512``); unknown keys get a
did-you-mean. Loaded with yaml.safe_load only.

This is where a spec's model is checked against the world: a Hugging Face config is read (memopt.spec.hf_config)
and a Python factory's entry points are imported (which runs that module's code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from memopt.core.entry_points import find_entry_point_module, load_entry_point
from memopt.core.errors import MemoptError, SpecError
from memopt.core.files import read_input
from memopt.core.wording import describe, describe_value_error, suggest
from memopt.spec.hf_config import is_bare_name, is_model_type, load_config
from memopt.spec.schema import (
    DTYPE_ALIASES,
    PRECISIONS,
    AnyModelSpec,
    HfModelSpec,
    KerasModelSpec,
    ModelSpec,
    PythonModelSpec,
    Spec,
)
from memopt.spec.strategy_args import parse_strategy
from memopt.spec.strategy_spec import StrategySpec, catalog, strategy_spec

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(arch="encoder", d_model=768, n_heads=12, n_layers=12, vocab_size=50257, ffn_dim=3072,
                 max_seq_len=1024, tie_embeddings=True, norm_first=True, activation="gelu",
                 final_norm=True, head_bias=False),
    "tinyllama-1.1b": dict(arch="decoder", d_model=2048, n_heads=32, n_kv_heads=4, n_layers=22,
                           vocab_size=32000, ffn_dim=5632, max_seq_len=2048),
    "llama-7b": dict(arch="decoder", d_model=4096, n_heads=32, n_layers=32, vocab_size=32000,
                     ffn_dim=11008, max_seq_len=4096),
    "llama-13b": dict(arch="decoder", d_model=5120, n_heads=40, n_layers=40, vocab_size=32000,
                      ffn_dim=13824, max_seq_len=4096),
    "llama-70b": dict(arch="decoder", d_model=8192, n_heads=64, n_kv_heads=8, n_layers=80,
                      vocab_size=32000, ffn_dim=28672, max_seq_len=4096),
}

TEXT_FILES = ("data", "held_out")  # train's fields that name a text file
MODEL_OVERRIDES = {"hf": "--hf", "python": "--model", "keras": "--keras"}  # override key -> option: the model
BACKEND_ALIASES = {"tf": "tensorflow", "pytorch": "torch"}  # how users spell a Keras backend -> Keras's name
OVERRIDE_PATHS = {"batch_size": ("train", "batch_size"), "seq_len": ("train", "seq_len"),
                  "steps": ("train", "steps"), "device": ("run", "device"), "dtype": ("run", "dtype"),
                  "optimizer": ("train", "optimizer"), "data": ("train", "data"), "held_out": ("train", "held_out"),
                  "mode": ("run", "mode"),
                  "prompt_len": ("generate", "prompt_len"), "new_tokens": ("generate", "new_tokens"),
                  "cache": ("generate", "cache"), "precision": ("run", "precision"), "backend": ("model", "backend")}
# how users spell a precision (Lightning's old names among them) -> memopt's
PRECISION_ALIASES = {"32": "fp32", "32-true": "fp32", "fp32-true": "fp32", "float32": "fp32", "bf16": "bf16-mixed",
                     "16": "fp16-mixed", "16-mixed": "fp16-mixed", "16-true": "fp16-true", "fp16": "fp16-mixed",
                     "bfloat16-mixed": "bf16-mixed", "float16-mixed": "fp16-mixed", "bfloat16-true": "bf16-true",
                     "float16-true": "fp16-true"}


SPEC_LIMIT_BYTES = 2**20     # a spec is a few hundred bytes; anything near this is not one
ALIAS_LIMIT_NODES = 100_000  # nodes that aliases may add when expanded (a "billion laughs" adds ~10**9)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses duplicate keys instead of silently keeping the last, and alias bombs."""

    def construct_mapping(self, node, deep=False):  # yaml's signature, untyped
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # ``<<: *base``: merged by SafeConstructor; the keys written here override it
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "unhashable key", key_node.start_mark) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def get_single_data(self) -> Any:
        """Compose the node graph (aliases are shared nodes there), bound its expansion, then construct."""
        node = self.get_single_node()
        if node is None:
            return None
        added = _expanded_size(node) - _distinct_nodes(node)
        if added > ALIAS_LIMIT_NODES:
            raise _AliasBomb(f"too many aliases (they expand the document by {added:,} nodes, "
                             f"more than {ALIAS_LIMIT_NODES:,})")
        return self.construct_document(node)


class _AliasBomb(Exception):
    """The composed document would expand past ALIAS_LIMIT_NODES."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _expanded_size(root: yaml.Node) -> int:
    """Nodes the document has once every alias is copied out: one pass over the shared graph, memoised
    (a node inside itself, ``&a [*a]``, counts once)."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key not in sizes:
            sizes[key] = 1  # while being counted: a recursive reference adds one
            sizes[key] = 1 + sum(size(child) for child in _children(node))
        return sizes[key]

    return size(root)


def _distinct_nodes(root: yaml.Node) -> int:
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            stack.extend(_children(node))
    return len(seen)


def read_yaml(text: str, source: str = "spec") -> Any:
    """Parse YAML text safely; any syntax problem (or nesting too deep, or an alias bomb) becomes a
    SpecError naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # safe: a SafeLoader subclass
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        if mark is not None:
            where = f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError([f"{source}: invalid YAML{where}: {problem}"]) from None
    except _AliasBomb as exc:
        raise SpecError([f"{source}: invalid YAML: {exc}"]) from None
    except RecursionError:
        raise SpecError([f"{source}: invalid YAML: nested too deeply"]) from None


def load_spec(config: str | Path | None = None, overrides: dict[str, Any] | None = None,
              strategies: list[Any] | None = None) -> Spec:
    """CONFIG (a file path, a preset name, or None for the embedded default) -> a validated Spec.

    ``overrides`` maps short names (``batch_size``, ``device``, ...) to values from the command line;
    ``strategies``, when given, replaces the spec's own list. The file is read with memopt.core.files.read_input:
    a regular file of at most SPEC_LIMIT_BYTES (a FIFO or /dev/zero is refused before it is opened).
    """
    data: Any = {}
    source = "spec"
    if config is not None:
        path = Path(config)
        if str(config) in PRESETS:  # a preset name always means the preset; ./NAME is the file
            data = {"model": str(config)}
        else:
            source = str(path)
            if not path.exists():
                hint = ("; --json takes no value: write JSON to a file with --json-out FILE"
                        if str(config).endswith(".json") else "")
                raise SpecError([f"{path}: no such file (nor a preset: {', '.join(PRESETS)}){hint}"])
            if path.is_dir():
                raise SpecError([f"{path}: is a directory, expected a YAML file"])
            try:
                text = read_input(path, "spec", SPEC_LIMIT_BYTES)
            except MemoptError as exc:
                raise SpecError([str(exc)]) from None
            data = read_yaml(text, source)
            if data is None:
                raise SpecError([f"{path}: the file is empty; expected a mapping with model/train/run"])
            data = _paths_from(data, path.parent)
    spec = spec_from_data(data, overrides, strategies, source,
                          strategies_option="--strategies" if strategies is not None else None)
    if config is not None and strategies is None and str(config) not in PRESETS:
        spec = spec.with_strategies([_folder_from(s, Path(config).parent) for s in spec.strategies])
    return spec


def _relative_to(value: Any, folder: Path) -> Any:
    """A relative path written in a spec file, made relative to the spec's folder (unchanged otherwise)."""
    if not isinstance(value, str) or not value or Path(value).is_absolute() or folder == Path("."):
        return value
    return str(folder / value)


def _paths_from(data: Any, folder: Path) -> Any:
    """The spec file's paths (model.hf, train.data) resolved against its folder, not the working directory; a bare
    name in model.hf stays a model_type when transformers knows one by that name."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    model, train = data.get("model"), data.get("train")
    if isinstance(model, dict) and isinstance(model.get("hf"), str):
        hf = model["hf"]
        if not is_bare_name(hf) or ((folder / hf).exists() and not is_model_type(hf)):
            data["model"] = {**model, "hf": _relative_to(hf, folder)}
    if isinstance(train, dict):
        data["train"] = {**train, **{key: _relative_to(train[key], folder) for key in TEXT_FILES if key in train}}
    return data


PATH_OPTIONS = ("folder", "peft_config")  # strategy options that name a file or folder


def absolute_paths(data: dict[str, Any]) -> dict[str, Any]:
    """A spec's data (``Spec.to_dict()``) with its paths absolute, for a spec file written elsewhere (``optimize
    -o``): read back, it names the same files from any folder."""
    data = dict(data)
    model, train = data.get("model"), data.get("train")
    if isinstance(model, dict) and isinstance(model.get("hf"), str) and not (
            is_bare_name(model["hf"]) and is_model_type(model["hf"])):
        data["model"] = {**model, "hf": str(Path(model["hf"]).resolve())}
    if isinstance(train, dict):
        data["train"] = {**train, **{key: str(Path(train[key]).resolve()) for key in TEXT_FILES
                                     if isinstance(train.get(key), str)}}
    entries = []
    for entry in data.get("strategies") or []:
        if isinstance(entry, dict) and len(entry) == 1:
            (name, options), = entry.items()
            if isinstance(options, dict):
                entry = {name: {**options, **{key: str(Path(options[key]).resolve()) for key in PATH_OPTIONS
                                              if isinstance(options.get(key), str)}}}
        entries.append(entry)
    if "strategies" in data:
        data["strategies"] = entries
    return data


def _folder_from(setting: StrategySpec, folder: Path) -> StrategySpec:
    """A strategy's path options written in a spec file, resolved against the spec's folder."""
    update = {name: _relative_to(getattr(setting.options, name), folder) for name in PATH_OPTIONS
              if isinstance(getattr(setting.options, name, None), str)}
    if not update:
        return setting
    return setting.model_copy(update={"options": setting.options.model_copy(update=update)})


def config_note(config: str | Path | None) -> str | None:
    """What to tell the user when CONFIG names a preset and a file of that name exists here too."""
    if config is not None and str(config) in PRESETS and Path(config).exists():
        return f"{config} is the preset; for the file of that name write ./{config}"
    return None


def spec_from_data(data: Any, overrides: dict[str, Any] | None = None, strategies: list[Any] | None = None,
                   source: str = "spec", strategies_option: str | None = None) -> Spec:
    """Validate already-parsed data (a dict) into a Spec, collecting every problem.

    Problems with an override name its command-line option (``--batch-size (train.batch_size): ...``), and
    with ``strategies_option`` those of the given strategies name that option.
    """
    try:
        return _spec_from_data(data, overrides, strategies, source)
    except SpecError as exc:
        named = [_name_option(problem, overrides or {}, strategies_option) for problem in exc.problems]
        raise SpecError(named) from None


def _name_option(problem: str, overrides: dict[str, Any], strategies_option: str | None) -> str:
    for key, (section, field) in OVERRIDE_PATHS.items():
        if overrides.get(key) is not None and problem.startswith(f"{section}.{field}:"):
            return f"--{key.replace('_', '-')} ({section}.{field}){problem[len(section) + len(field) + 1:]}"
    if strategies_option and problem.startswith("strategies"):
        return f"{strategies_option}: {problem}"
    return problem


def _spec_from_data(data: Any, overrides: dict[str, Any] | None, strategies: list[Any] | None,
                    source: str) -> Spec:
    if not isinstance(data, dict):
        raise SpecError([f"{source}: expected a mapping with model/train/run at the top, "
                         f"got {type(data).__name__}"])
    overrides = overrides or {}
    problems: list[str] = []
    data = _with_overrides(dict(data), overrides, problems)
    raw_strategies = data.pop("strategies", None) if strategies is None else strategies
    data.pop("strategies", None)
    parsed = _parse_strategies(raw_strategies, problems)
    if overrides.get("world_size") is not None:
        parsed = _with_world_size(parsed, overrides["world_size"], problems)
    data["model"] = _model_section(data["model"], problems, overrides)
    if data["model"] is None:
        del data["model"]  # its problems are listed already
    spec = None
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        problems.extend(describe(err, Spec) for err in exc.errors())
    if spec is not None:
        problems += _cross_problems(spec) if "model" in data else []
        problems += _unused_options(spec, overrides)
        parsed = _with_mixed_precision(spec, parsed, problems)
    if problems:
        raise SpecError(problems)
    assert spec is not None
    return spec.with_strategies(tuple(parsed))


def _with_overrides(data: dict[str, Any], overrides: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """The spec's data with its preset expanded, the command line's overrides set and dtype aliases resolved."""
    data["model"] = _with_model_overrides(_expand_preset(data.get("model", {}), problems), overrides, problems)
    for key, value in overrides.items():
        if value is None or key in ("world_size", "backend") or key in MODEL_OVERRIDES:  # set apart
            continue
        section, field = OVERRIDE_PATHS[key]
        if isinstance(data.get(section, {}), dict):  # not a mapping: reported by validation
            data[section] = {**data.get(section, {}), field: value}
    run = data.get("run")
    if isinstance(run, dict) and overrides.get("precision") is not None and overrides.get("dtype") is None:
        data["run"] = run = {k: v for k, v in run.items() if k != "dtype"}  # --precision over the file's dtype
    if isinstance(run, dict) and overrides.get("dtype") is not None and overrides.get("precision") is None:
        data["run"] = run = {k: v for k, v in run.items() if k != "precision"}  # and --dtype over its precision
    if isinstance(run, dict) and isinstance(run.get("dtype"), str):
        data["run"] = run = {**run, "dtype": DTYPE_ALIASES.get(run["dtype"], run["dtype"])}
    if isinstance(run, dict) and isinstance(run.get("precision"), str):
        data["run"] = _with_precision(run, problems)
    return data


def _with_model_overrides(model: Any, overrides: dict[str, Any], problems: list[str]) -> Any:
    """--hf PATH / --model / --keras pkg.mod:factory replace the spec's model; then --backend sets its backend."""
    given = [key for key in MODEL_OVERRIDES if overrides.get(key) is not None]
    if len(given) > 1:
        problems.append(f"{' and '.join(MODEL_OVERRIDES[k] for k in given)} each name a model: give one of them")
        return {}  # none of them is imported or read
    if given:
        model = {given[0]: overrides[given[0]], **_kept_backend(model, given[0])}
    if overrides.get("backend") is not None:
        model = _with_backend(model, overrides, problems)
    return model


def _kept_backend(model: Any, key: str) -> dict[str, Any]:
    """--keras over a spec whose model is a Keras one: the spec's backend stays (--backend may still replace it)."""
    return {"backend": model["backend"]} if key == "keras" and isinstance(model, dict) and "backend" in model else {}


def _with_backend(model: Any, overrides: dict[str, Any], problems: list[str]) -> Any:
    """``--backend``: the Keras model's backend (``tf`` and ``pytorch`` read as Keras names them)."""
    keras = overrides.get("keras") is not None or (isinstance(model, dict) and "keras" in model)
    if not keras:
        problems.append("--backend: applies to a Keras model (--keras pkg.module:factory or model.keras)")
        return model
    value = overrides["backend"]
    if isinstance(value, str):
        value = BACKEND_ALIASES.get(value.strip().lower(), value.strip().lower())
    return {**model, "backend": value} if isinstance(model, dict) else model


def _with_precision(run: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """run.precision spelled as memopt names it, and the dtype it implies (a different run.dtype is a problem)."""
    given = run["precision"]
    precision = PRECISION_ALIASES.get(given.strip().lower(), given.strip().lower())
    implied = PRECISIONS.get(precision)
    if implied is None:
        return run  # validation names the choices
    if run.get("dtype", implied) != implied:
        problems.append(f"run.precision: {given} keeps parameters, gradients and optimizer state in {implied}, but "
                        f"run.dtype is {run['dtype']}: give one of them")
    return {**run, "precision": precision, "dtype": implied}


def _with_mixed_precision(spec: Spec, parsed: list[StrategySpec], problems: list[str]) -> list[StrategySpec]:
    """``*-mixed``: the amp strategy with that compute dtype (added unless the spec has it already); with fsdp,
    fsdp's mixed_precision instead (FSDP2's MixedPrecisionPolicy: bf16 compute, fp32 reduce and master state)."""
    precision = spec.run.precision
    if precision is None or not precision.endswith("-mixed"):
        return parsed
    compute = precision.removesuffix("-mixed")
    if spec.run.mode != "train":
        problems.append(f"run.precision: {precision} is a training precision (fp32 master weights, autocast); for "
                        f"--mode {spec.run.mode} use {compute}-true")
        return parsed
    fsdp = next((s for s in parsed if s.name == "fsdp"), None)
    if fsdp is not None:  # on ranks it is FSDP2's MixedPrecisionPolicy: FSDP casts the parameters it gathers
        said = getattr(fsdp.options, "mixed_precision", None)
        if said is not None and said != DTYPE_ALIASES.get(compute, compute):
            problems.append(f"run.precision: {precision} computes in {compute}, but fsdp.mixed_precision says {said}: "
                            "give one of them")
            return parsed
        options = {**fsdp.options.model_dump(exclude_defaults=True), "mixed_precision": compute}
        return [strategy_spec("fsdp", options) if s is fsdp else s for s in parsed]
    amp = [s for s in parsed if s.name == "amp"]
    if not amp:
        return [*parsed, strategy_spec("amp", {"dtype": compute})]
    said = getattr(amp[0].options, "dtype", compute)
    if said != compute:
        problems.append(f"run.precision: {precision} computes in {compute}, but the amp strategy says {said}: give "
                        "one of them")
    return parsed


GENERATE_ONLY = ("prompt_len", "new_tokens", "cache")


def _unused_options(spec: Spec, overrides: dict[str, Any]) -> list[str]:
    """Command-line options the run mode would ignore: an error rather than silently nothing."""
    given = [key for key, value in overrides.items() if value is not None]
    mode = spec.run.mode
    problems = [f"--{key.replace('_', '-')}: applies to --mode generate (run.mode is {mode})"
                for key in given if key in GENERATE_ONLY and mode != "generate"]
    if mode == "generate" and "seq_len" in given:
        problems.append("--seq-len: --mode generate takes its lengths from --prompt-len and --new-tokens")
    return problems


def _with_world_size(parsed: list[StrategySpec], world: Any, problems: list[str]) -> list[StrategySpec]:
    """``--world-size N``: the spec's fsdp/ddp strategy on N ranks, or fsdp added when it has neither."""
    if type(world) is not int or world < 1:
        problems.append(f"--world-size: expected a whole number of ranks >= 1, got {world!r}")
        return parsed
    on_ranks = [s for s in parsed if s.on_ranks]
    if not on_ranks:
        return parsed + [strategy_spec(catalog().on_ranks, {"world_size": world})] if world > 1 else parsed
    out = []
    for s in parsed:
        if s in on_ranks:
            try:
                s = strategy_spec(s.name, {**s.options.model_dump(exclude_defaults=True), "world_size": world})
            except SpecError as exc:
                problems.extend(f"--world-size: {p}" for p in exc.problems)
        out.append(s)
    return out


def _model_section(model: Any, problems: list[str], overrides: dict[str, Any]) -> Any:
    """The model section validated as the kind its keys name (``hf``, ``python``, else memopt's own), its problems
    named ``model.KEY`` (after the option that gave it, for --hf/--model)."""
    if not isinstance(model, dict):
        return model
    kind = next((k for k in MODEL_OVERRIDES if k in model), None)
    classes: dict[str | None, type[AnyModelSpec]] = {
        "hf": HfModelSpec, "python": PythonModelSpec, "keras": KerasModelSpec, None: ModelSpec}
    cls = classes[kind]
    option = f"{MODEL_OVERRIDES[kind]} " if kind is not None and overrides.get(kind) is not None else ""
    try:
        validated = cls.model_validate(model)
    except ValidationError as exc:
        for err in exc.errors():
            text = f"model.{describe(err, cls)}"
            if err["loc"][:1] == ("backend",) and overrides.get("backend") is not None:  # --backend gave it
                problems.append(f"--backend (model.backend){text[len('model.backend'):]}")
            else:
                problems.append(f"{option}{text}")
        return None
    try:
        _check_sources(validated)
    except ValueError as exc:
        problems.append(f"{option}model.{describe_value_error((), str(exc))}")
        return None
    return validated


def _check_sources(model: AnyModelSpec) -> None:
    """Read what the model section names: a Hugging Face config, a Python factory's entry points (importing them
    runs their module's code). ValueError naming the field (``hf: ...``, ``config.KEY: ...``, ``python: ...``)."""
    if isinstance(model, HfModelSpec):
        load_config(model.hf, model.config)
    elif isinstance(model, PythonModelSpec):
        for field in ("python", "batch", "loss"):
            text = getattr(model, field)
            if text is not None:
                load_entry_point(text, field)
    elif isinstance(model, KerasModelSpec):  # found, not imported: Keras picks its backend when first imported
        for field in ("keras", "batch"):
            text = getattr(model, field)
            if text is not None:
                find_entry_point_module(text, field)


def _cross_problems(spec: Spec) -> list[str]:
    """What no single section can check: lengths against the model's max_seq_len, generation's need of a decoder."""
    mode, gen, limit = spec.run.mode, spec.generate, spec.model.max_seq_len
    if mode != "generate" and spec.train.seq_len > limit:
        return [f"train.seq_len: {spec.train.seq_len} exceeds model.max_seq_len {limit}"]
    if mode == "generate":
        if spec.model.arch != "decoder":
            what = "a Python factory's model" if spec.model.kind == "python" else f"an {spec.model.arch}"
            return [f"run.mode: generate needs a causal decoder (memopt's decoder or a Hugging Face "
                    f"causal LM), not {what} (--mode infer runs a forward pass)"]
        if gen.positions > limit:
            return [f"generate.new_tokens: prompt_len {gen.prompt_len} + new_tokens {gen.new_tokens} = "
                    f"{gen.positions} exceeds model.max_seq_len {limit}"]
    return []


def _expand_preset(model: Any, problems: list[str]) -> Any:
    """``model: llama-7b`` or ``model: {preset: llama-7b, n_layers: 2}`` -> a full model mapping."""
    if isinstance(model, str):
        model = {"preset": model}
    if not isinstance(model, dict) or "preset" not in model:
        return model
    name = model["preset"]
    if not isinstance(name, str) or name not in PRESETS:
        problems.append(f"model.preset: unknown preset {name!r}{suggest(str(name), PRESETS)}; "
                        f"known: {', '.join(PRESETS)}")
        return {k: v for k, v in model.items() if k != "preset"}
    return {**PRESETS[name], **{k: v for k, v in model.items() if k != "preset"}}


def _parse_strategies(raw: Any, problems: list[str]) -> list[StrategySpec]:
    """Entries are names, ``name:key=value`` strings (the grammar of ``-s``), or ``{name: {options}}`` mappings."""
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        problems.append(f"strategies: expected a list of names or {{name: options}}, got {type(raw).__name__}")
        return []
    out = [s for i, entry in enumerate(raw) if (s := _parse_entry(entry, f"strategies[{i}]", problems)) is not None]
    names = [s.name for s in out]
    for name in {n for n in names if names.count(n) > 1}:
        problems.append(f"strategies: {name} is listed more than once")
    return out


def _parse_entry(entry: Any, where: str, problems: list[str]) -> StrategySpec | None:
    """One entry of ``strategies`` (its problems named ``where``), or None."""
    if isinstance(entry, str):
        name, options = next(iter(parse_strategy(entry, where, problems).items()))
    elif isinstance(entry, dict) and len(entry) == 1:
        name, options = next(iter(entry.items()))
        options = {} if options is None else options
    else:
        problems.append(f"{where}: expected a strategy name or a one-key mapping {{name: options}}")
        return None
    if not isinstance(name, str):
        problems.append(f"{where}: strategy name must be a string, got {name!r}")
        return None
    if not isinstance(options, dict):
        problems.append(f"{where}.{name}: options must be a mapping, got {type(options).__name__}")
        return None
    try:
        return strategy_spec(name, options)
    except SpecError as exc:
        problems.extend(f"{where}.{p}" if not p.startswith(where) else p for p in exc.problems)
        return None
