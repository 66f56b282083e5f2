"""memopt against the stack users run instead, on one Hugging Face model: a Markdown table for the README.

The model: a llama-shaped HF model of the seed's size (d512, ffn 1376, 6 layers, 8 heads, vocab 32000), random
weights, batch 8 x seq 512, float32, AdamW. Every variant runs in its own process, one after another:

- the peers, as their users write them: a plain transformers loop (``model(input_ids, labels=...)``, backward,
  optimizer step), with ``gradient_checkpointing_enable``, peft's ``get_peft_model`` (LoRA r8 on every
  projection), bitsandbytes ``Linear4bit`` nf4 under peft's LoRA (QLoRA) and bitsandbytes ``AdamW8bit``;
  measured with ``memopt.track()`` around their own loop (one warm-up step outside, two steps inside);
- memopt's mixes applied to the same HF model by ``memopt profile --hf`` (one warm-up step, two measured).

Both are the same tensor-level tracker, so the peaks compare like for like. Drift: the logits' relative error
against the unchanged model on the same batch (memopt's own drift for its mixes; for the peers, measured here
before training where the weights change: QLoRA; LoRA starts equal, B = 0).

    python scripts/bench_peers.py                 # about 10 minutes on 2 CPU cores
    python scripts/bench_peers.py --only full,qlora --batch-size 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6,
          "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 512,
          "tie_word_embeddings": False}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEERS = {
    "full": "transformers full fine-tune",
    "ckpt": "transformers + gradient checkpointing",
    "lora": "peft LoRA r8 + gradient checkpointing",
    "qlora": "bitsandbytes nf4 + peft LoRA r8 + ckpt (QLoRA)",
    "adam8bit": "bitsandbytes AdamW8bit",
}
MIXES = {
    "memopt-lossless": ("memopt best lossless", "ckpt+chunked_ce+optim_in_bwd+offload"),
    "memopt-lossy": ("memopt best lossy", "quant:bits=8,lora=8,embedding=true+ckpt+chunked_ce+offload"),
}
MEASURED_STEPS = 2


def _batches(batch: int, seq: int, steps: int) -> list[Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    return [torch.randint(CONFIG["vocab_size"], (batch, seq), generator=gen) for _ in range(steps)]


@__import__("torch").no_grad()
def _logits_rel_error(model: Any, reference: Any, ids: Any) -> float:
    num = den = 0.0
    for row in ids.split(1):
        ref = reference(input_ids=row).logits.float()
        new = model(input_ids=row).logits.float()
        num += (new - ref).pow(2).sum().item()
        den += ref.pow(2).sum().item()
    return (num / den) ** 0.5


def _quantize_nf4(model: Any) -> None:
    """Every projection inside the decoder layers -> bitsandbytes Linear4bit nf4 (what load_in_4bit does)."""
    import bitsandbytes as bnb
    import torch

    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4")
            # bnb repacks for its bf16 CPU kernel on the first eval-mode call without gradients (the drift
            # measurement here), which fails on widths its blocksize does not divide (1376): training never goes there
            q.support_avx512bf16_for_cpu = False
            model.set_submodule(name, q.to("cpu"))


def run_peer(variant: str, batch: int, seq: int) -> dict[str, Any]:
    """Build the model as the peer's users do, step it with a plain loop inside memopt.track()."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import memopt

    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in CONFIG.items() if k != "model_type"})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.train()
    drift = None
    if variant in ("ckpt", "lora", "qlora"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if variant == "qlora":
        reference = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        reference.load_state_dict(model.state_dict())
        _quantize_nf4(model)
        drift = _logits_rel_error(model.eval(), reference.eval(), _batches(batch, seq, 1)[0])
        model.train()
        del reference
    if variant in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS))
    params = [p for p in model.parameters() if p.requires_grad]
    if variant == "adam8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-3)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-3)

    def step(ids: Any) -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warm, *measured = _batches(batch, seq, 1 + MEASURED_STEPS)
    step(warm)
    with memopt.track(model, optimizer) as tracked:
        for ids in measured:
            step(ids)
    result = tracked.result
    assert result.memory is not None
    return {"peak_bytes": result.memory.peak_bytes, "step_time_s": sorted(result.step_times_s)[len(measured) // 2],
            "drift": drift, "trainable": sum(p.numel() for p in params)}


def run_mix(strategies: str, config_path: Path, batch: int, seq: int) -> dict[str, Any]:
    """memopt profile --hf CONFIG -s MIX, in its own process."""
    out = subprocess.run([sys.executable, "-m", "memopt.cli", "profile", "--hf", str(config_path), "-s", strategies,
                          "--batch-size", str(batch), "--seq-len", str(seq), "--steps", str(MEASURED_STEPS),
                          "--json"], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"memopt profile -s {strategies} failed: {out.stderr.strip()}")
    run = json.loads(out.stdout)["runs"][0]
    drift = run.get("drift") or {}
    return {"peak_bytes": run["peak_bytes"], "step_time_s": run["step_time_s"],
            "drift": drift.get("logits_rel_error"), "trainable": run["params"]["trainable"]}


def _child(variant: str, batch: int, seq: int) -> dict[str, Any]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--batch-size", str(batch),
                          "--seq-len", str(seq)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{variant} failed: {out.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {variant}: {result['peak_bytes'] / 2**20:,.2f} MiB in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--only", help="comma-separated variants: " + ", ".join([*PEERS, *MIXES]))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_peer(args.child, args.batch_size, args.seq_len)))
        return
    chosen = args.only.split(",") if args.only else [*PEERS, *MIXES]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as folder:
        config_path = Path(folder) / "config.json"
        config_path.write_text(json.dumps(CONFIG))
        for variant in chosen:
            if variant in PEERS:
                results[variant] = _child(variant, args.batch_size, args.seq_len)
            else:
                print(f"  {variant}: memopt profile -s {MIXES[variant][1]}", file=sys.stderr)
                results[variant] = run_mix(MIXES[variant][1], config_path, args.batch_size, args.seq_len)
    base = results.get("full")
    print(f"HF llama d512 ffn1376 L6 h8 V32000, batch {args.batch_size} x seq {args.seq_len}, float32, AdamW, CPU "
          f"(torch {__import__('torch').__version__}, {os.cpu_count()} cores); peaks from memopt's tensor tracker\n")
    print("| variant | strategies | peak | of full FT | step time | x full FT | trainable | drift (logits) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for variant, r in results.items():
        label, mix = (PEERS[variant], "-") if variant in PEERS else (MIXES[variant][0], f"`{MIXES[variant][1]}`")
        share = f"{100 * r['peak_bytes'] / base['peak_bytes']:.1f}%" if base else "-"
        slower = f"{r['step_time_s'] / base['step_time_s']:.2f}x" if base else "-"
        drift = f"{100 * r['drift']:.2f}%" if r["drift"] is not None else "-"
        print(f"| {label} | {mix} | {r['peak_bytes'] / 2**20:,.2f} MiB | {share} | {r['step_time_s']:.2f} s | "
              f"{slower} | {r['trainable']:,} | {drift} |")


if __name__ == "__main__":
    main()
