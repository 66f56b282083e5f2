"""tp (tensor parallelism) on gloo ranks, alone on 2 ranks and as a 2 x 2 mesh with fsdp on 4: each rank holds
exactly its shard of each projection, the loss is the single process's, one rank's estimate holds; and what cannot
be split is refused with the reason."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from memopt.analysis.estimate import estimate
from memopt.model.transformer import build_model
from memopt.spec import load_spec, spec_from_data

from .helpers import CONFIGS, invoke, run
from .test_fsdp import memopt_ranks

COLUMNWISE = ("attn.q", "attn.k", "attn.v", "ffn.w1", "ffn.w3", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("attn.o", "ffn.w2", "o_proj", "down_proj")


def tp_shard_bytes(model: Any, size: int, dp: int = 1, column: tuple[str, ...] = (), row: tuple[str, ...] = ()) -> int:
    """A rank's parameter bytes under Megatron's split: column-parallel weights and biases by output rows,
    row-parallel weights by input columns (their bias whole), everything else whole; with FSDP over ``dp`` ranks
    beside it, dim 0 of that local shard padded to a multiple of ``dp`` and split (float32)."""
    total = 0
    for name, p in model.named_parameters():
        module, shape = name.rsplit(".", 1)[0], list(p.shape)
        if module.endswith(COLUMNWISE + column):
            shape[0] //= size
        elif module.endswith(ROWWISE + row) and name.endswith("weight"):
            shape[1] //= size
        total += math.ceil(shape[0] / dp) * math.prod(shape[1:]) * 4
    return total


def decoder(strategies: list[str], world: int | None = None) -> Any:
    overrides: dict[str, Any] = {"steps": 1}
    if world:
        overrides["world_size"] = world
    return load_spec(str(CONFIGS / "tiny-decoder.yaml"), overrides, strategies)


def llama(tmp_path, strategies: list[str], world: int | None = None) -> Any:
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 500, "max_position_embeddings": 64}))
    overrides: dict[str, Any] = {"steps": 1}
    if world:
        overrides["world_size"] = world
    return spec_from_data({"model": {"hf": str(tmp_path)}, "train": {"batch_size": 4, "seq_len": 16, "steps": 1},
                           "run": {"device": "cpu"}}, overrides=overrides, strategies=strategies)


def estimate_holds(spec: Any, measured: Any) -> None:
    """One rank traced on a fake process group against the measured ranks: the states to the byte, the peak within
    2% (gloo lets go of a collective's buffers at a moment that depends on the load: measured again up to twice,
    as tests/test_fsdp.py does, and never off by more than 15%)."""
    traced = estimate(spec)
    assert traced.memory is not None
    offs = []
    for attempt in range(3):
        real = measured if attempt == 0 else run(spec)
        assert real.memory is not None
        assert traced.memory.state_bytes == (real.ranks or [])[0]["state_bytes"]
        offs.append(abs(traced.memory.peak_bytes - real.memory.peak_bytes) / real.memory.peak_bytes)
        if offs[-1] <= 0.02:
            break
    assert offs[-1] <= 0.02 and max(offs) <= 0.15, offs


def test_tp_splits_memopts_decoder_over_two_ranks():
    single, split = run(decoder([])), run(decoder(["tp:size=2"]))
    model = build_model(decoder([]).model)
    assert split.world_size == 2 and split.ranks is not None
    for rank in split.ranks:
        assert rank["state_bytes"]["params"] == tp_shard_bytes(model, 2)
        assert rank["category_peak_bytes"]["grads"] == tp_shard_bytes(model, 2)
    assert split.loss == pytest.approx(single.loss, rel=1e-5)
    assert split.strategy_facts["tp"]["mesh"] == {"dp": 1, "tp": 2}
    estimate_holds(decoder(["tp:size=2"]), split)
    assert memopt_ranks() == []


def test_tp_and_fsdp_on_a_two_by_two_mesh():
    single, mesh = run(decoder([])), run(decoder(["tp:size=2", "fsdp"], world=4))
    model = build_model(decoder([]).model)
    assert mesh.world_size == 4 and mesh.strategy_facts["tp"]["mesh"] == {"dp": 2, "tp": 2}
    assert mesh.to_json()["mesh"] == {"dp": 2, "tp": 2}
    for rank in mesh.ranks or []:  # FSDP splits each rank's tensor-parallel shard again (dim 0, padded)
        assert rank["state_bytes"]["params"] == tp_shard_bytes(model, 2, dp=2)
    assert mesh.loss == pytest.approx(single.loss, rel=1e-5)
    estimate_holds(decoder(["tp:size=2", "fsdp"], world=4), mesh)
    shown = invoke(["profile", CONFIGS / "tiny-decoder.yaml", "-s", "tp:size=2+fsdp", "--world-size", "4"])
    assert shown.exit_code == 0 and "(1, 1)" in shown.stdout  # rank 3's mesh coordinates
    assert memopt_ranks() == []


def test_tp_on_a_hugging_face_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    single, split = run(llama(tmp_path, [])), run(llama(tmp_path, ["tp:size=2"]))  # llama() writes config.json
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(str(tmp_path)))
    for rank in split.ranks or []:
        assert rank["state_bytes"]["params"] == tp_shard_bytes(model, 2)
    assert split.loss == pytest.approx(single.loss, rel=1e-5)
    estimate_holds(llama(tmp_path, ["tp:size=2"]), split)
    mesh = run(llama(tmp_path, ["tp:size=2", "fsdp"], world=4))
    for rank in mesh.ranks or []:
        assert rank["state_bytes"]["params"] == tp_shard_bytes(model, 2, dp=2)
    assert mesh.loss == pytest.approx(single.loss, rel=1e-5)
    estimate_holds(llama(tmp_path, ["tp:size=2", "fsdp"], world=4), mesh)
    assert memopt_ranks() == []


def test_tp_splits_the_encoders_attention_once_it_is_split_into_linears():
    """The encoder's nn.MultiheadAttention becomes q/k/v/o Linears when the adapter is asked for them; tp splits
    those and linear1/linear2 (its feed-forward)."""
    from memopt.engine.step import prepare

    spec = load_spec(str(CONFIGS / "tiny.yaml"), {"steps": 1})
    session = prepare(spec)
    session.adapter.attention_projections()  # as tp does: the attention split into Linears
    expected = tp_shard_bytes(session.model, 2, column=("linear1",), row=("linear2",))
    single, split = run(spec), run(load_spec(str(CONFIGS / "tiny.yaml"), {"steps": 1}, ["tp:size=2"]))
    assert [r["state_bytes"]["params"] for r in split.ranks or []] == [expected, expected]
    assert split.loss == pytest.approx(single.loss, rel=1e-5)
    estimate_holds(load_spec(str(CONFIGS / "tiny.yaml"), {"steps": 1}, ["tp:size=2"]), split)
    assert memopt_ranks() == []


@pytest.mark.parametrize("args, message", [
    (["-s", "tp:size=2", "--world-size", "4"], "need a data-parallel dimension: add fsdp"),
    (["-s", "tp:size=3", "--batch-size", "3"], "8 attention heads do not split over 3 ranks"),
    (["-s", "tp:size=2,world_size=3"], "not a whole number of tensor-parallel groups"),
    (["-s", "tp+ddp"], "tp+ddp: refused"),
    (["-s", "tp:size=2", "--mode", "generate", "--prompt-len", "8", "--new-tokens", "2"], "tp: applies to --mode"),
])
def test_what_cannot_be_split_is_refused_with_the_reason(args, message):
    result = invoke(["profile", CONFIGS / "tiny-decoder.yaml", *args])
    assert result.exit_code == 1 and message in " ".join(result.output.split()), result.output
    assert memopt_ranks() == []
