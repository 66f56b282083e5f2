"""Train a llama-shaped reference model on text every machine has offline, and save it as a Hugging Face checkpoint.

Lossy strategies (quant, prune, optim8bit, kv_quant, ...) are judged on trained weights: on random weights every
logit is noise, so a logits error says nothing about what a user would lose. This script gives memopt's accuracy
column weights that learned something, from the Python standard library's own sources (byte-level tokens, ids
0-255), with a held-out text the model never trains on:

- the corpus: the standard library's ``*.py`` files (no ``site-packages``, no test suites), sorted by path; every
  ``HELD_OUT_EVERY``-th file is held out. Both texts are written beside the checkpoint (``train.txt``,
  ``held_out.txt``) with their SHA-256 in ``reference.json``: another Python version has other sources;
- the model: ``--size small`` (d128, ffn 344, 2 layers, 4 heads, 2 kv heads, vocab 256: a minute on 2 cores) or
  ``--size seed`` (the seed's size: d512, ffn 1376, 6 layers, 8 heads, vocab 32000, of which the bytes use the
  first 256, so that its memory is that of the benchmark's model);
- training: AdamW, linear warm-up then cosine decay, batches of random windows drawn from the training text by a
  generator seeded with ``--seed``; deterministic given the seed on one machine (same Python, same torch).

    python scripts/train_reference.py --out /tmp/ref-small                      # about 1 minute
    python scripts/train_reference.py --size seed --out /tmp/ref-seed           # about 12 minutes on 2 cores
    memopt profile --hf /tmp/ref-small --data /tmp/ref-small/train.txt --held-out /tmp/ref-small/held_out.txt \\
        --strategy quant:bits=4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

SIZES: dict[str, dict[str, Any]] = {
    "small": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 256, "steps": 300, "batch": 16, "seq": 256, "lr": 3e-3},
    "seed": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6, "num_attention_heads": 8,
             "num_key_value_heads": 8, "vocab_size": 32000, "steps": 160, "batch": 8, "seq": 256, "lr": 1e-3},
    "test": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 1, "vocab_size": 256, "steps": 4, "batch": 2, "seq": 32, "lr": 3e-3},
}
HELD_OUT_EVERY = 10
CORPUS_LIMIT = 8 * 2**20  # bytes of training text (the first files, in path order); the held-out text: an eighth


def corpus(limit: int = CORPUS_LIMIT) -> tuple[bytes, bytes]:
    """The standard library's sources: (training text, held-out text), as UTF-8 bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    train: list[bytes] = []
    held: list[bytes] = []
    sizes = [0, 0]
    for i, path in enumerate(files):
        held_out = i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
        if sizes[held_out] >= (limit // 8 if held_out else limit):
            continue
        text = path.read_bytes()
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            continue
        (held if held_out else train).append(text)
        sizes[held_out] += len(text)
    return b"\n".join(train), b"\n".join(held)


def lr_at(step: int, steps: int, peak: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def held_out_loss(model: Any, ids: Any, seq: int, windows: int = 32) -> float:
    """Mean next-token loss over the first ``windows`` windows of the held-out text."""
    import torch
    import torch.nn.functional as F

    losses = []
    with torch.no_grad():
        for w in range(min(windows, (len(ids) - 1) // seq)):
            row = ids[w * seq:w * seq + seq + 1].unsqueeze(0)
            logits = model(input_ids=row[:, :-1]).logits
            losses.append(F.cross_entropy(logits.flatten(0, 1).float(), row[:, 1:].flatten()).item())
    return sum(losses) / len(losses)


def train(size: str, out: Path, seed: int, steps: int | None = None, say: Any = print) -> dict[str, Any]:
    import torch
    import transformers

    shape = dict(SIZES[size])
    steps = steps or shape.pop("steps")
    shape.pop("steps", None)
    batch, seq, peak_lr = shape.pop("batch"), shape.pop("seq"), shape.pop("lr")
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    config = transformers.LlamaConfig(**shape, max_position_embeddings=1024, tie_word_embeddings=False,
                                      rms_norm_eps=1e-5)
    model = transformers.LlamaForCausalLM(config).float()
    train_text, held_text = corpus()
    ids = torch.frombuffer(bytearray(train_text), dtype=torch.uint8).long()
    held_ids = torch.frombuffer(bytearray(held_text), dtype=torch.uint8).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    before = held_out_loss(model, held_ids, seq, 8)
    started, losses = time.perf_counter(), []
    model.train()
    for step in range(steps):
        starts = torch.randint(len(ids) - seq - 1, (batch,), generator=gen)
        rows = torch.stack([ids[s:s + seq + 1] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr)
        logits = model(input_ids=rows[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            say(f"step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)")
    model.eval()
    after = held_out_loss(model, held_ids, seq)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    (out / "train.txt").write_bytes(train_text)
    (out / "held_out.txt").write_bytes(held_text)
    facts = {"size": size, "seed": seed, "steps": steps, "batch": batch, "seq_len": seq, "lr": peak_lr,
             "python": sys.version.split()[0], "torch": torch.__version__,
             "train_sha256": hashlib.sha256(train_text).hexdigest(),
             "held_out_sha256": hashlib.sha256(held_text).hexdigest(),
             "train_bytes": len(train_text), "held_out_bytes": len(held_text),
             "held_out_loss_before": before, "held_out_loss": after, "held_out_perplexity": math.exp(after),
             "last_train_loss": losses[-1], "train_seconds": time.perf_counter() - started}
    (out / "reference.json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint folder (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the size's)")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"--out: {args.out} exists and is not empty")
    facts = train(args.size, args.out, args.seed, args.steps, say=lambda m: print(m, file=sys.stderr))
    print(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
