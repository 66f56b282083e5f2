"""The spec's types: frozen pydantic models whose validators check values and shapes only (no file is read and
no code imported here: memopt.spec.load does that, and collects every problem with its path)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from memopt.spec.hf_config import config_facts
from memopt.spec.strategy_spec import StrategySpec

Arch = Literal["encoder", "decoder"]
DType = Literal["float32", "bfloat16", "float16"]
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelSpec(_Frozen):
    """Shape of the Transformer. Defaults are the design document's encoder."""

    arch: Arch = "encoder"
    d_model: int = Field(512, gt=0, le=2**17)
    n_heads: int = Field(8, gt=0, le=2**12)
    n_kv_heads: int | None = Field(None, gt=0, le=2**12, description="decoder only: grouped-query KV heads")
    n_layers: int = Field(6, gt=0, le=1024)
    vocab_size: int = Field(32000, gt=0, le=2**24)
    ffn_dim: int | None = Field(None, gt=0, le=2**20, description="default 4*d_model")
    max_seq_len: int = Field(512, gt=0, le=2**20)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    attention: Literal["eager", "sdpa"] | None = Field(
        None, description="eager materialises the s*s scores; default eager (encoder), sdpa (decoder)")
    tie_embeddings: bool = False
    norm_first: bool = Field(False, description="encoder only: pre-norm layers")
    activation: Literal["relu", "gelu"] = Field("relu", description="encoder only")
    final_norm: bool | None = Field(None, description="default false (encoder), true (decoder)")
    head_bias: bool | None = Field(None, description="default true (encoder), false (decoder)")
    norm_eps: float = Field(1e-5, gt=0.0, lt=1.0)

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        """Defaults that depend on other fields (ffn 4*d_model, per-arch attention, norm, head bias)."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        decoder = out.get("arch") == "decoder"
        d, heads = out.get("d_model", 512), out.get("n_heads", 8)
        if out.get("ffn_dim") is None and type(d) is int:
            out["ffn_dim"] = 4 * d
        if out.get("n_kv_heads") is None and type(heads) is int:
            out["n_kv_heads"] = heads
        for key, default in (("attention", "sdpa" if decoder else "eager"), ("final_norm", decoder),
                             ("head_bias", not decoder)):
            if out.get(key) is None:
                out[key] = default
        return out

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelSpec:
        problems = []
        if self.d_model % self.n_heads:
            problems.append(f"n_heads: {self.n_heads} does not divide d_model {self.d_model}")
        kv = self.n_kv_heads or self.n_heads
        if self.arch == "encoder" and kv != self.n_heads:
            problems.append("n_kv_heads: grouped-query attention needs arch: decoder")
        elif self.n_heads % kv:
            problems.append(f"n_kv_heads: {kv} does not divide n_heads {self.n_heads}")
        if self.arch == "decoder" and not self.d_model % self.n_heads and self.head_dim % 2:
            problems.append(f"n_heads: head dim {self.head_dim} must be even for RoPE")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kind(self) -> str:
        return "builtin"

    def title(self) -> str:
        return f"{self.arch} d{self.d_model} h{self.n_heads} L{self.n_layers} V{self.vocab_size}"


ENTRY_POINT = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"


class HfModelSpec(_Frozen):
    """A Hugging Face causal LM: a local config.json, a checkpoint folder, or a known architecture's default
    config (``llama``, ``gpt2``, ...). Shape facts (d_model, vocab_size, ...) come from its config."""

    hf: str = Field(description="config.json, a checkpoint folder, or a model_type (llama, gpt2, mistral, ...)")
    config: dict[str, Any] = Field(default_factory=dict, description="config fields to override, e.g. "
                                   "{num_hidden_layers: 2}")
    attention: Literal["eager", "sdpa"] = Field("sdpa", description="the attention implementation transformers uses")
    random_weights: bool = Field(False, description="ignore a checkpoint folder's weights (random init instead)")

    @property
    def kind(self) -> str:
        return "hf"

    @property
    def facts(self) -> dict[str, Any]:
        """d_model, n_heads, n_kv_heads, n_layers, vocab_size, ffn_dim, max_seq_len, tie_embeddings, model_type
        from the Hugging Face config."""
        return config_facts(self.hf, self.config)

    @property
    def arch(self) -> str:
        return "decoder"

    @property
    def vocab_size(self) -> int:
        return int(self.facts["vocab_size"])

    @property
    def max_seq_len(self) -> int:
        return int(self.facts["max_seq_len"])

    @property
    def dropout(self) -> float:
        return float(self.facts["dropout"])

    def title(self) -> str:
        f = self.facts
        return f"hf {f['model_type']} d{f['d_model']} h{f['n_heads']} L{f['n_layers']} V{f['vocab_size']}"


class _FactoryModel(_Frozen):
    """What a model from a user's factory answers where memopt's own has shape facts: nothing it can know."""

    @property
    def arch(self) -> str:
        return "custom"

    @property
    def attention(self) -> str:
        return "custom"

    @property
    def dropout(self) -> float:
        return 0.0


class PythonModelSpec(_FactoryModel):
    """Your own nn.Module from a factory ``pkg.module:function`` (imported, so it runs that code)."""

    python: str = Field(pattern=ENTRY_POINT, description="pkg.module:factory returning an nn.Module")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")
    batch: str | None = Field(None, pattern=ENTRY_POINT, description=(
        "pkg.module:make_batch(batch_size, seq_len, device) -> what the model takes; default random token ids"))
    loss: str | None = Field(None, pattern=ENTRY_POINT, description=(
        "pkg.module:loss_fn(output, batch) -> scalar; default: the output if scalar, its .loss, or cross-entropy "
        "of its logits against the next tokens"))
    vocab_size: int | None = Field(None, gt=0, le=2**24, description="for random token ids; default: the "
                                   "model's input embedding size")
    max_seq_len: int = Field(2**20, gt=0, le=2**20)

    @property
    def kind(self) -> str:
        return "python"

    def title(self) -> str:
        return f"python {self.python}"


class KerasModelSpec(_FactoryModel):
    """A Keras 3 model from a factory ``pkg.module:function`` (compiled or not), trained on Keras's PyTorch backend
    (memopt's tracker) or on TensorFlow (its allocator's events, in a process of its own)."""

    keras: str = Field(pattern=ENTRY_POINT, description="pkg.module:factory returning a keras.Model")
    backend: Literal["torch", "tensorflow"] = Field("torch", description="the Keras backend it trains on")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")
    batch: str | None = Field(None, pattern=ENTRY_POINT, description=(
        "pkg.module:make_batch(batch_size, seq_len) -> (x, y) the model's fit takes; default random token ids and "
        "their next tokens"))
    vocab_size: int | None = Field(None, gt=0, le=2**24, description="for random token ids; default: the input "
                                   "size of the model's first Embedding layer")
    max_seq_len: int = Field(2**20, gt=0, le=2**20)

    @property
    def kind(self) -> str:
        return "keras"

    def title(self) -> str:
        return f"keras {self.keras} ({self.backend})"


AnyModelSpec = ModelSpec | HfModelSpec | PythonModelSpec | KerasModelSpec


class TrainSpec(_Frozen):
    batch_size: int = Field(8, gt=0, le=2**20)
    seq_len: int = Field(512, gt=0, le=2**20)
    optimizer: Literal["none", "sgd", "adamw", "adafactor"] = "adamw"
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    steps: int = Field(3, gt=0, le=10_000, description="measured steps after one warm-up step")
    data: str | None = Field(None, description="a text file: batches are its tokens (a Hugging Face checkpoint's "
                             "tokenizer when it has one, else UTF-8 bytes); default seeded random token ids")
    held_out: str | None = Field(None, description="a text file the model did not train on: lossy strategies report "
                                 "the change of the loss on it (tokenized as train.data)")


Mode = Literal["train", "infer", "generate"]


PRECISIONS = {"fp32": "float32", "bf16-mixed": "float32", "fp16-mixed": "float32", "bf16-true": "bfloat16",
              "fp16-true": "float16"}  # precision -> the dtype of parameters, gradients and optimizer state
Precision = Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16-true", "fp16-true"]


class RunSpec(_Frozen):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: DType = "float32"
    precision: Precision | None = Field(None, description="as Lightning names it: *-mixed = fp32 states with "
                                        "autocast compute (the amp strategy), *-true = run.dtype")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    mode: Mode = Field("train", description="train: a training step; infer: one forward under inference_mode "
                       "(train.batch_size x train.seq_len); generate: prefill + greedy decode with a KV cache")


class GenerateSpec(_Frozen):
    """``run.mode: generate``: train.batch_size sequences of ``prompt_len`` prompt tokens, then ``new_tokens``
    greedy tokens (the first from the prefill, the rest one decode step each)."""

    prompt_len: int = Field(96, gt=0, le=2**20)
    new_tokens: int = Field(32, gt=0, le=2**20)
    cache: Literal["static", "dynamic"] = Field(
        "static", description="static: preallocated for prompt_len + new_tokens positions; dynamic: grows by "
        "concatenation each step (Hugging Face's DynamicCache)")

    @property
    def positions(self) -> int:
        """What a static cache holds: every position of the longest sequence."""
        return self.prompt_len + self.new_tokens


class Spec(_Frozen):
    model: AnyModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()
    run: RunSpec = RunSpec()
    generate: GenerateSpec = GenerateSpec()
    strategies: tuple[StrategySpec, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec, as YAML/JSON-ready plain data (a training spec without run.mode and generate,
        as before generation existed, so that older baselines stay comparable)."""
        data = self.model_dump(exclude={"strategies"})
        if self.run.mode == "train":
            del data["run"]["mode"]
        if self.run.precision is None:  # as before precision existed: run.dtype says it
            del data["run"]["precision"]
        if self.run.mode != "generate":
            del data["generate"]
        data["strategies"] = [s.to_dict() for s in self.strategies]
        return data

    @property
    def world_size(self) -> int:
        """Ranks the run takes: the world_size of the strategy that runs it on ranks, else 1."""
        return max((s.world_size for s in self.strategies), default=1)

    @property
    def batch_shards(self) -> int:
        """How many ways the global batch is split: the ranks over those that share rows (tensor parallelism)."""
        return self.world_size // max((s.ranks_per_batch for s in self.strategies), default=1)

    def with_strategies(self, strategies: Iterable[StrategySpec]) -> Spec:
        """The spec with these strategies (already validated StrategySpecs) instead of its own."""
        return self.model_copy(update={"strategies": tuple(strategies)})
