"""memopt against the stack users run instead, on one trained Hugging Face model: a Markdown table for the README.

The model: the seed-sized llama that ``scripts/train_reference.py --size seed`` trains on the standard library's
sources (d512, ffn 1376, 6 layers, 8 heads, vocab 32000, byte-level), batch 8 x seq 512 of its training text,
float32, AdamW (lr 1e-4). Every run is a process of its own:

- the peers, as their users write them: a plain transformers loop (``model(input_ids, labels=...)``, backward,
  optimizer step), with ``gradient_checkpointing_enable``, peft's ``get_peft_model`` (LoRA r8 on every
  projection), bitsandbytes ``Linear4bit`` nf4 under peft's LoRA (QLoRA) and bitsandbytes ``AdamW8bit``;
  measured with ``memopt.track()`` around their own loop (one warm-up step outside, two steps inside). Their
  held-out loss is that of the model as they run it (QLoRA's nf4 weights), before training, on the same
  held-out windows memopt uses;
- ``memopt optimize`` at 5% of the full fine-tune's peak without lossy strategies, and at 3% with
  ``--allow-lossy --max-loss-increase 1%``: the search estimates every set, measures the contenders side by side
  with the baseline, and picks the fastest that fits (its measured ratio and spread are in the table);
- after the search, each winner is run again (``memopt profile``), alternated with the transformers full
  fine-tune for ``--rounds`` rounds: "x full FT" is the mean of the rounds' ratios, ± half their range.

All peaks are memopt's tensor tracker (checked against the CPU allocator: tests/test_allocator.py), so they compare
like for like.

    python scripts/train_reference.py --size seed --out /tmp/ref-seed     # once, about 15 minutes
    python scripts/bench_peers.py --checkpoint /tmp/ref-seed              # about 45 minutes on 2 CPU cores
    python scripts/bench_peers.py --checkpoint /tmp/ref-seed --only full,qlora
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # memopt.core.timing for the ratios, also when memopt is not installed

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEERS = {
    "full": "transformers full fine-tune",
    "ckpt": "transformers + gradient checkpointing",
    "lora": "peft LoRA r8 + gradient checkpointing",
    "qlora": "bitsandbytes nf4 + peft LoRA r8 + ckpt (QLoRA)",
    "adam8bit": "bitsandbytes AdamW8bit",
}
SEARCHES = {  # variant -> (label, share of the full fine-tune's peak, optimize's extra options)
    "lossless": ("memopt optimize, lossless", 0.05, []),
    "lossy": ("memopt optimize --allow-lossy --max-loss-increase 1%", 0.03,
              ["--allow-lossy", "--max-loss-increase", "1%"]),
}
LR = 1e-4
MEASURED_STEPS = 2


def _spec(ckpt: Path, batch: int, seq: int) -> Any:
    from memopt.spec import spec_from_data

    return spec_from_data({"model": {"hf": str(ckpt)}, "train": {
        "batch_size": batch, "seq_len": seq, "lr": LR, "data": str(ckpt / "train.txt"),
        "held_out": str(ckpt / "held_out.txt")}, "run": {"device": "cpu"}})


@__import__("torch").no_grad()
def _held_out_loss(model: Any, spec: Any) -> float:
    """The mean next-token loss on memopt's held-out windows (analysis.drift's rows), one window at a time."""
    import torch.nn.functional as F

    from memopt.analysis.drift import HELD_OUT_ROWS
    from memopt.engine.data import held_out_rows

    rows = held_out_rows(spec, "cpu", HELD_OUT_ROWS, spec.train.seq_len + 1)
    total = 0.0
    for row in rows.split(1):
        logits = model(input_ids=row[:, :-1]).logits.float()
        total += F.cross_entropy(logits.flatten(0, -2), row[:, 1:].flatten()).item()
    return total / len(rows)


def _quantize_nf4(model: Any) -> None:
    """Every projection inside the decoder layers -> bitsandbytes Linear4bit nf4 (what load_in_4bit does)."""
    import bitsandbytes as bnb
    import torch

    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4")
            # bnb repacks for its bf16 CPU kernel on the first eval-mode call without gradients (the held-out
            # loss here), which fails on widths its blocksize does not divide (1376): training never goes there
            q.support_avx512bf16_for_cpu = False
            model.set_submodule(name, q.to("cpu"))


def run_peer(variant: str, ckpt: Path, batch: int, seq: int) -> dict[str, Any]:
    """Load the checkpoint as the peer's users do, step it with a plain loop inside memopt.track()."""
    import torch
    from transformers import AutoModelForCausalLM

    import memopt
    from memopt.engine.data import text_batch

    torch.manual_seed(0)
    spec = _spec(ckpt, batch, seq)
    model: Any = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa", dtype=torch.float32)
    if variant in ("ckpt", "lora", "qlora"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if variant == "qlora":
        _quantize_nf4(model)
    held_out = _held_out_loss(model.eval(), spec)
    model.train()
    if variant in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: Any
    if variant == "adam8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=LR)
    else:
        optimizer = torch.optim.AdamW(params, lr=LR)

    def step(ids: Any) -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warm, *measured = [text_batch(spec, "cpu", i)[0] for i in range(1 + MEASURED_STEPS)]
    step(warm)
    with memopt.track(model, optimizer) as tracked:
        for ids in measured:
            step(ids)
    result = tracked.result
    assert result.memory is not None
    return {"peak_bytes": result.memory.peak_bytes, "step_times_s": result.step_times_s,
            "held_out_loss": held_out, "trainable": sum(p.numel() for p in params)}


def _memopt(args: list[str]) -> dict[str, Any]:
    """A memopt command with --json in its own process; its progress goes to this script's stderr."""
    out = subprocess.run([sys.executable, "-m", "memopt", *args, "--json"], stdout=subprocess.PIPE, text=True,
                         cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"memopt {' '.join(args[:1])} failed (exit {out.returncode})")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _data_options(ckpt: Path, batch: int, seq: int) -> list[str]:
    return ["--hf", str(ckpt), "--data", str(ckpt / "train.txt"), "--held-out", str(ckpt / "held_out.txt"),
            "--batch-size", str(batch), "--seq-len", str(seq)]


def search(variant: str, ckpt: Path, batch: int, seq: int, full_peak: int, share: float) -> dict[str, Any]:
    """memopt optimize at ``share`` of the full fine-tune's peak; the winner and what it measured."""
    extra = SEARCHES[variant][2]
    budget = int(full_peak * share)
    began = time.perf_counter()
    doc = _memopt(["optimize", *_data_options(ckpt, batch, seq), "--budget", str(budget), *extra])
    winner = doc["candidates"][0]  # ranked: the winner first
    return {"budget": budget, "strategies": "+".join(winner["strategies"]), "search_ratio": winner.get("ratio"),
            "search_s": time.perf_counter() - began, "estimated": len(doc["candidates"])}


def profile_set(strategies: str, ckpt: Path, batch: int, seq: int) -> dict[str, Any]:
    run = _memopt(["profile", *_data_options(ckpt, batch, seq), "-s", strategies, "--steps", str(MEASURED_STEPS)])
    r = run["runs"][0]
    drift = r.get("drift") or {}
    return {"peak_bytes": r["peak_bytes"], "step_times_s": r["step_times_s"], "trainable": r["params"]["trainable"],
            "held_out_loss": drift.get("held_out_loss"), "drift": drift.get("logits_rel_error")}


def _child(variant: str, ckpt: Path, batch: int, seq: int) -> dict[str, Any]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--checkpoint", str(ckpt), "--batch-size",
                          str(batch), "--seq-len", str(seq)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{variant} failed: {out.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {variant}: {result['peak_bytes'] / 2**20:,.2f} MiB in {time.perf_counter() - started:.0f} s",
          file=sys.stderr, flush=True)
    return result


def _save(path: Path | None, key: str, value: Any) -> None:
    if path is not None:
        saved = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**saved, key: value}, indent=1))


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def main() -> None:
    from memopt.core.timing import ratio_of

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a folder written by train_reference.py")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2, help="winner/full fine-tune rounds after each search")
    parser.add_argument("--shares", help="the searches' budgets as shares of the full fine-tune's peak "
                        "(lossless,lossy; default 0.05,0.03)")
    parser.add_argument("--winners", help="skip the searches: the sets an earlier search found, as "
                        "LOSSLESS;LOSSY (each +-joined)")
    parser.add_argument("--save", type=Path, help="write every result to this JSON file as it comes")
    parser.add_argument("--only", help="comma-separated variants: " + ", ".join([*PEERS, *SEARCHES]))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    ckpt, b, s = args.checkpoint.resolve(), args.batch_size, args.seq_len
    if args.child:
        print(json.dumps(run_peer(args.child, ckpt, b, s)))
        return
    chosen = args.only.split(",") if args.only else [*PEERS, *SEARCHES]
    shares = dict(zip(SEARCHES, map(float, args.shares.split(",")))) if args.shares else \
        {v: share for v, (_, share, _) in SEARCHES.items()}
    peers = {v: _child(v, ckpt, b, s) for v in PEERS if v in chosen or (v == "full" and set(chosen) & set(SEARCHES))}
    _save(args.save, "peers", peers)
    full = peers["full"]
    reference = full["held_out_loss"]
    rows: list[tuple[str, str, dict[str, Any], Any, dict[str, Any] | None]] = []
    for variant, r in peers.items():
        if variant in chosen:
            ratio = ratio_of([(r["step_times_s"], full["step_times_s"])]) if variant != "full" else None
            rows.append((PEERS[variant], "-", r, ratio, None))
    for variant in [v for v in SEARCHES if v in chosen]:
        if args.winners:
            found = {"budget": int(full["peak_bytes"] * shares[variant]), "search_ratio": None,
                     "strategies": dict(zip(SEARCHES, args.winners.split(";")))[variant]}
        else:
            print(f"  memopt optimize ({variant}) ...", file=sys.stderr, flush=True)
            found = search(variant, ckpt, b, s, full["peak_bytes"], shares[variant])
        _save(args.save, variant, found)
        print(f"  {variant}: {found['strategies']} in {found.get('search_s', 0):.0f} s", file=sys.stderr, flush=True)
        rounds: list[Any] = []
        mine: dict[str, Any] | None = None
        for _ in range(args.rounds):  # the winner beside the transformers loop, alternated
            mine = profile_set(found["strategies"], ckpt, b, s)
            theirs = _child("full", ckpt, b, s)
            rounds.append((mine["step_times_s"], theirs["step_times_s"]))
        assert mine is not None
        _save(args.save, f"{variant} rounds", rounds)
        label = f"{SEARCHES[variant][0]}, budget {_mib(found['budget'])}"
        rows.append((label, f"`{found['strategies']}`", mine, ratio_of(rounds), found))
    torch_version = __import__("torch").__version__
    facts = json.loads((ckpt / "reference.json").read_text())
    c = json.loads((ckpt / "config.json").read_text())
    print(f"HF llama d{c['hidden_size']} ffn{c['intermediate_size']} L{c['num_hidden_layers']} "
          f"h{c['num_attention_heads']} V{c['vocab_size']} trained by `train_reference.py --size {facts['size']}` "
          f"(held-out loss {reference:.4f} on memopt's 16 held-out windows), batch {b} x seq {s} of its training text, "
          f"float32, AdamW lr {LR:g}, CPU (torch {torch_version}, {os.cpu_count()} cores); peaks from memopt's "
          "tensor tracker; x full FT: step-time ratio to the transformers full fine-tune run alternately with it\n")
    print("| variant | strategies | peak | of full FT | step time | x full FT | in the search | trainable | "
          "held-out loss | drift (logits) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, mix, r, ratio, settled in rows:
        step = sorted(r["step_times_s"])[len(r["step_times_s"]) // 2]
        loss = r["held_out_loss"] if r["held_out_loss"] is not None else reference
        change = f"{loss:.4f} ({100 * (loss / reference - 1):+.2f}%)"
        in_search = "-"
        if settled and settled["search_ratio"]:
            sr = settled["search_ratio"]
            in_search = f"{sr['ratio']:.2f}x ±{sr['spread']:.2f}" if sr["spread"] is not None else "±?"
        drift = f"{100 * r['drift']:.2f}%" if r.get("drift") is not None else "-"
        print(f"| {label} | {mix} | {_mib(r['peak_bytes'])} | {100 * r['peak_bytes'] / full['peak_bytes']:.1f}% | "
              f"{step:.2f} s | {ratio.text() if ratio else '1.00x'} | {in_search} | {r['trainable']:,} | {change} | "
              f"{drift} |")


if __name__ == "__main__":
    main()
