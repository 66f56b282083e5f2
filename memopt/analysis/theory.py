"""What each strategy should save, by formula: the benchmark's "saving vs theory" column and the
strategy tests hold the tracker's measurements to these.

Checkpointing formulas split the baseline's peak activations into L equal layers and the rest
(embedding, final norm, loss head): one layer = (baseline - the 1-layer model) / (L - 1).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from memopt.core._torch_private import saved_tensors_by_node, storage_key
from memopt.engine.step import make_batch, prepare
from memopt.spec import DTYPE_BYTES, HfModelSpec, ModelSpec, Spec, spec_from_data
from memopt.spec.strategy_args import one_set
from memopt.spec.strategy_spec import strategy_spec
from memopt.strategies import registry
from memopt.strategies.accum import Accum
from memopt.strategies.amp import Amp
from memopt.strategies.chunked_ce import ChunkedCe
from memopt.strategies.ckpt import Ckpt
from memopt.strategies.offload import Offload
from memopt.strategies.optim_in_bwd import OptimInBwd
from memopt.strategies.sdpa import Sdpa

# Autograd nodes of the ops autocast runs in 16 bits on CPU and CUDA (matmuls, convolutions, attention).
SIXTEEN_BIT_NODES = re.compile(r"(Mm|Addmm|Bmm|Baddbmm|Addbmm|Convolution|ScaledDotProduct\w*)Backward\d+")


def builtin_model(spec: Spec) -> ModelSpec:
    """The spec's model, which these formulas need to be memopt's own (their shapes are its shapes)."""
    assert isinstance(spec.model, ModelSpec), "the formulas describe memopt's own models"
    return spec.model


def one_layer_spec(spec: Spec) -> Spec:
    """The same spec with one layer: its activations are one layer's plus the embedding's and the head's."""
    data = spec.to_dict()
    return spec_from_data({**data, "model": {**data["model"], "n_layers": 1}})


def layer_input_bytes(spec: Spec) -> int:
    m, t = builtin_model(spec), spec.train
    return t.batch_size * t.seq_len * m.d_model * 4


def matmul_output_bytes(spec: Spec) -> int:
    """Bytes of one layer's matmul and attention outputs, which selective checkpointing keeps."""
    m, t = builtin_model(spec), spec.train
    tokens = t.batch_size * t.seq_len
    assert m.ffn_dim is not None  # the spec fills in its default
    kv = 2 * (m.n_kv_heads or m.n_heads) * m.head_dim
    ffn = m.ffn_dim * (2 if m.arch == "decoder" else 1)  # SwiGLU: gate and up
    scores = t.batch_size * m.n_heads * t.seq_len ** 2 if m.attention == "eager" else 0
    return 4 * (tokens * (m.d_model + kv + m.d_model + m.d_model + ffn + m.d_model) + scores)


def checkpointing_saving(spec: Spec, acts: int, one_layer_acts: int, checkpointed: Callable[[int], bool],
                         kept_per_layer: int) -> int:
    """Activations removed when the ``checkpointed`` layers keep only ``kept_per_layer`` bytes.

    What stays is the larger of: at the end of forward, the head's activations plus every layer's
    (all of them, or what a checkpointed layer keeps); in backward, the layers below a checkpointed
    one plus that one recomputed whole (the head's are freed by then).
    """
    n = builtin_model(spec).n_layers
    layer = (acts - one_layer_acts) // max(n - 1, 1)
    head = one_layer_acts - layer
    cost = [kept_per_layer if checkpointed(i) else layer for i in range(n)]
    end_of_forward = head + sum(cost)
    in_backward = max((sum(cost[:i]) + layer for i in range(n) if checkpointed(i)), default=0)
    return acts - max(end_of_forward, in_backward)


def amp_saving(spec: Spec) -> int:
    """Bytes of saved activations amp should save on ``spec`` (run without amp, in float32).

    From one forward's autograd graph: every non-parameter tensor a 16-bit op saves for backward is
    stored in half the bytes under autocast; every parameter such an op saves costs a cached 16-bit copy.
    Ops outside autocast's 16-bit list are counted as unchanged, so where their inputs are 16-bit
    matmul outputs (SwiGLU's SiLU, say) the real saving is larger: this is a lower bound there.
    The rule is CPU autocast's; on CUDA softmax runs in fp32, which it does not model.
    """
    session = prepare(spec)
    tokens, targets = make_batch(spec, session.device)
    loss = session.adapter.loss((tokens, targets))
    params = {storage_key(p) for p in session.model.parameters()}
    halved: dict[int, int] = {}
    copies: dict[int, int] = {}
    for node, tensor in saved_tensors_by_node(loss):
        if SIXTEEN_BIT_NODES.fullmatch(node) and tensor.dtype == torch.float32:
            storage = tensor.untyped_storage()
            key = storage_key(storage)
            (copies if key in params else halved)[key] = storage.nbytes() // 2
    return sum(halved.values()) - sum(copies.values())


def expected_saving(label: str, spec: Spec, base: dict[str, int],
                    one_layer_acts: int) -> tuple[str, int] | None:
    """(category, theoretical saving in bytes) of one strategy setting (``label``: as ``-s`` writes it) against the
    baseline's category peaks ``base``, or None when there is no formula for it. ``one_layer_acts``: activations of
    one_layer_spec."""
    (entry,) = one_set([label]) or [{}]
    (name, options), = entry.items()
    setting = strategy_spec(name, options)
    formula = FORMULAS.get(registry()[setting.name])
    return None if formula is None else formula(setting.options, Saving(spec, base, one_layer_acts))


@dataclass(frozen=True)
class Saving:
    """What a strategy's formula is computed from: the spec, the baseline's category peaks, one layer's activations."""

    spec: Spec
    base: dict[str, int]
    one_layer_acts: int


def _ckpt(options: Any, at: Saving) -> tuple[str, int]:
    spec, acts, inputs = at.spec, at.base["activations"], layer_input_bytes(at.spec)
    if options.policy == "every":
        k = options.every
        return "activations", checkpointing_saving(spec, acts, at.one_layer_acts, lambda i: i % k == 0, inputs)
    kept = inputs + matmul_output_bytes(spec) if options.policy == "selective" else inputs
    return "activations", checkpointing_saving(spec, acts, at.one_layer_acts, lambda i: True, kept)


def _by_default(formula: Callable[[Saving], tuple[str, int]]) -> Callable[[Any, Saving], tuple[str, int] | None]:
    """A formula for a strategy's default options only (another setting has none)."""
    return lambda options, at: formula(at) if options == type(options)() else None


def _sdpa(at: Saving) -> tuple[str, int]:
    m, t = builtin_model(at.spec), at.spec.train
    return "activations", m.n_layers * t.batch_size * m.n_heads * t.seq_len ** 2 * 4


def _chunked_ce(at: Saving) -> tuple[str, int]:
    m, t = builtin_model(at.spec), at.spec.train
    return "peak", 3 * t.batch_size * t.seq_len * m.vocab_size * 4


def _accum(options: Any, at: Saving) -> tuple[str, int]:
    k = options.micro_batches
    return "activations", at.base["activations"] * (k - 1) // k


def _optim_in_bwd(at: Saving) -> tuple[str, int]:
    m = builtin_model(at.spec)
    largest = max(m.vocab_size, m.max_seq_len, m.ffn_dim or 0) * m.d_model * 4
    return "grads", at.base["grads"] - largest


# formula per strategy class (a plain dict keyed by type, as torchao registers its handlers)
FORMULAS: dict[type[Any], Callable[[Any, Saving], tuple[str, int] | None]] = {
    Ckpt: lambda options, at: _ckpt(options, at) if options.policy != "full" or options == type(options)() else None,
    Sdpa: _by_default(_sdpa),
    ChunkedCe: _by_default(_chunked_ce),
    Accum: _accum,
    Offload: _by_default(lambda at: ("activations", at.base["activations"])),
    OptimInBwd: _by_default(_optim_in_bwd),
    Amp: _by_default(lambda at: ("activations", amp_saving(at.spec))),
}


def kv_bytes_per_position(spec: Spec) -> int:
    """One sequence's KV cache bytes per position: 2 x layers x kv_heads x head_dim x dtype bytes."""
    m = spec.model
    shape = m.facts if isinstance(m, HfModelSpec) else {**m.model_dump(), "head_dim": getattr(m, "head_dim", 0)}
    return 2 * shape["n_layers"] * shape["n_kv_heads"] * shape["head_dim"] * DTYPE_BYTES[spec.run.dtype]
