"""What each lossy strategy costs in accuracy, on trained weights: a Markdown table for the README.

The model is the reference checkpoint of scripts/train_reference.py (trained on the standard library's sources,
byte-level); every row is ``memopt profile --hf CKPT --held-out held_out.txt -s STRATEGY --json`` in a process of
its own, and reads memopt's drift against the unchanged model:

- held-out loss: the mean next-token loss on the first windows of text the model never trained on (the change
  is the accuracy a user gives up), and its perplexity;
- logits error: the logits' relative error against the unchanged model on a training batch;
- tokens differ (generation rows): the share of greedy tokens that differ after held-out prompts; the
  held-out loss there is that of the prompts' true continuation, fed through the KV cache.

LoRA and optim8bit change training, not the weights: they are compared after 3 identical training steps with the
full fine-tune (LoRA trains other parameters: its "drift" is a different training, not an accuracy loss).

    python scripts/train_reference.py --size seed --out /tmp/ref-seed     # once, about 15 minutes
    python scripts/bench_accuracy.py --checkpoint /tmp/ref-seed           # about 10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ROWS = [
    ("quant:bits=8", "memopt int8 (group 64)"),
    ("quant:bits=4", "memopt int4 (group 64)"),
    ("quant:bits=4,format=nf4", "memopt nf4 (group 64)"),
    ("quant:bits=8,backend=bitsandbytes", "bitsandbytes int8 (LLM.int8)"),
    ("quant:bits=4,format=nf4,backend=bitsandbytes", "bitsandbytes nf4"),
    ("quant:bits=4,backend=bitsandbytes", "bitsandbytes fp4"),
    ("prune:ffn=0.25", "prune 25% of FFN channels"),
    ("prune:ffn=0.5", "prune 50% of FFN channels"),
    ("prune:heads=0.25", "prune 25% of heads"),
    ("amp", "amp bf16 autocast"),
    ("optim8bit", "memopt 8-bit AdamW (after 3 steps)"),
    ("lora:rank=4", "LoRA r4 (after 3 steps; trains other parameters)"),
    ("lora:rank=16", "LoRA r16 (after 3 steps; trains other parameters)"),
]
GENERATE_ROWS = [
    ("quant:bits=8", "memopt int8, generation"),
    ("quant:bits=4", "memopt int4, generation"),
    ("quant:bits=4,format=nf4", "memopt nf4, generation"),
    ("kv_quant:bits=8", "KV cache int8"),
    ("kv_quant:bits=4", "KV cache int4"),
]


def profile(ckpt: Path, strategy: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        spec = Path(folder) / "spec.yaml"  # the training rows fine-tune at a fine-tuning learning rate
        spec.write_text(f"model: {{hf: {json.dumps(str(ckpt))}}}\ntrain: {{lr: {args.lr}}}\n")
        cmd = [sys.executable, "-m", "memopt", "profile", str(spec), "--data", str(ckpt / "train.txt"),
               "--held-out", str(ckpt / "held_out.txt"), "-s", strategy, "--steps", "1", "--json"]
        if mode == "generate":
            cmd += ["--mode", "generate", "--batch-size", str(args.prompts), "--prompt-len", str(args.prompt_len),
                    "--new-tokens", str(args.new_tokens)]
        else:
            cmd += ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
        began = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    run = json.loads(proc.stdout)["runs"][0]
    return {"drift": run["drift"], "peak": run["peak_bytes"], "seconds": time.perf_counter() - began}


def row(label: str, strategy: str, done: dict[str, Any]) -> str:
    if "error" in done:
        return f"| {label} | `{strategy}` | {done['error']} | | | | | |"
    d = done["drift"]
    tokens = f"{100 * d['tokens_differ']:.1f}%" if "tokens_differ" in d else "-"
    return (f"| {label} | `{strategy}` | {d['held_out_loss_ref']:.4f} | {d['held_out_loss']:.4f} | "
            f"{100 * d['held_out_loss_increase']:+.2f}% | "
            f"{d['held_out_perplexity']:.2f} | {100 * d['logits_rel_error']:.2f}% | {tokens} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a folder written by train_reference.py")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4, help="the training rows' AdamW learning rate")
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts in the generation rows")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--only", default=None, help="strategy labels separated by semicolons")
    args = parser.parse_args()
    facts = json.loads((args.checkpoint / "reference.json").read_text())
    wanted = set(args.only.split(";")) if args.only else None
    lines = [f"Reference checkpoint: `{facts['size']}` llama, trained {facts['steps']} steps (seed {facts['seed']}) on "
             f"{facts['train_bytes'] / 2**20:.1f} MiB of the standard library's sources (Python {facts['python']}); "
             f"held-out loss {facts['held_out_loss']:.3f} (perplexity {facts['held_out_perplexity']:.2f}; "
             f"{facts['held_out_loss_before']:.2f} before training). Training rows: batch {args.batch_size} x "
             f"{args.seq_len}, AdamW lr {args.lr:g}; generation rows: {args.prompts} held-out prompts of "
             f"{args.prompt_len} tokens, "
             f"{args.new_tokens} new tokens.", "",
             "| strategy | setting | held-out loss, unchanged | with it | change | perplexity | logits error | "
             "tokens differ |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for mode, rows in (("train", TRAIN_ROWS), ("generate", GENERATE_ROWS)):
        for strategy, label in rows:
            if wanted and strategy not in wanted:
                continue
            print(f"{mode}: {strategy}", file=sys.stderr, flush=True)
            done = profile(args.checkpoint, strategy, mode, args)
            lines.append(row(label, strategy, done))
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
