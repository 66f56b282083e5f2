"""Deployment memory: generation with a KV cache, its strategies, and what fits in a GPU.

1. A small llama-shaped decoder (d512, 8 heads over 2 KV heads, 6 layers, vocab 32000), bfloat16 on this CPU,
   8 sequences of 448 prompt + 64 new tokens: measured (each variant in its own process) and estimated.
2. llama-7b, float16 on CUDA, 8 sequences of 3968 + 128 tokens: estimated (fake tensors).
   Variants: 16-bit, int4 weights, int4 weights + int8 KV cache, + chunked prefill (chunk 512).
3. What fits: llama-7b and llama-70b (float16, CUDA) at 4k and 32k context (prompt = context - 128, 128 new
   tokens) in 24, 80 and 141 GiB: the largest batch at that context, and the longest context for one sequence
   (max_seq_len raised to 131072 so that the search is not capped), by estimates, beside the formula
   (params x 2 bytes + 2 x layers x kv_heads x head_dim x positions x batch x 2 bytes) and how far apart.

    python scripts/bench_inference.py              # about 10 minutes on 2 CPU cores
    python scripts/bench_inference.py --no-fits    # parts 1 and 2 only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GiB, MiB = 2**30, 2**20
SMALL = {"arch": "decoder", "d_model": 512, "n_heads": 8, "n_kv_heads": 2, "n_layers": 6, "vocab_size": 32000,
         "ffn_dim": 1376, "max_seq_len": 1024}
VARIANTS = [("16-bit", []), ("int4 weights", ["quant:bits=4"]),
            ("int4 weights + int8 KV", ["quant:bits=4", "kv_quant:bits=8"]),
            ("+ chunked prefill", ["quant:bits=4", "kv_quant:bits=8", "chunked_prefill:chunk=CHUNK"])]


def memopt(*args: str, may_fail: bool = False) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "memopt", *args, "--json"], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        if may_fail:
            return {"error": out.stderr.strip().removeprefix("error: ")}
        raise SystemExit(f"memopt {' '.join(args)} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def variant_args(strategies: list[str], chunk: int) -> list[str]:
    return ["-s", "+".join(s.replace("CHUNK", str(chunk)) for s in strategies)] if strategies else []


def phase_rows(spec_file: Path | str, common: list[str], chunk: int, measure: bool) -> list[str]:
    rows = []
    for label, strategies in VARIANTS:
        args = [str(spec_file), *common, *variant_args(strategies, chunk)]
        traced = memopt("estimate", *args)["runs"][0]
        real = memopt("profile", *args)["runs"][0] if measure else None
        shown = real or traced
        inf = shown["inference"]
        phases = shown["phase_peak_bytes"]
        unit, scale = ("GiB", GiB) if not measure else ("MiB", MiB)
        cells = [label, f"{shown['state_bytes']['params'] / scale:,.2f}", f"{inf['kv_cache_bytes'] / scale:,.2f}",
                 f"{phases['prefill'] / scale:,.2f}", f"{phases['decode'] / scale:,.2f}",
                 f"{shown['peak_bytes'] / scale:,.2f}"]
        if real is not None:
            off = 100 * (traced["peak_bytes"] - real["peak_bytes"]) / real["peak_bytes"]
            drift = real.get("drift")
            cells += [f"{traced['peak_bytes'] / scale:,.2f} ({off:+.2f}%)",
                      f"{inf['time_to_first_token_s'] * 1000:,.0f} ms", f"{inf['decode_tokens_per_s']:,.0f}",
                      f"{100 * drift['tokens_differ']:.1f}% / {100 * drift['logits_rel_error']:.2f}%" if drift else "-"]
        rows.append("| " + " | ".join(cells) + " |")
        print(f"  {label}: peak {shown['peak_bytes'] / scale:,.2f} {unit}", file=sys.stderr)
    return rows


def apart(formula: int, traced: int) -> str:
    """How far the formula's answer is from the traced one."""
    return f"{100 * (formula - traced) / traced:+.0f}%" if traced else ("same" if not formula else "-")


def fits_rows(budgets: list[int]) -> list[str]:
    rows = []
    for preset in ("llama-7b", "llama-70b"):
        for context in (4096, 32768):
            for budget in budgets:
                spec = Path(f"/tmp/memopt-bench-{preset}.yaml")
                spec.write_text(f"model: {{preset: {preset}, max_seq_len: 131072}}\n")
                began = time.perf_counter()
                doc = memopt("estimate", str(spec), "--mode", "generate", "--prompt-len", str(context - 128),
                             "--new-tokens", "128", "--batch-size", "1", "--dtype", "fp16", "--device", "cuda",
                             "--fits", f"{budget}GiB", may_fail=True)
                seconds = time.perf_counter() - began
                if "error" in doc:  # nothing fits, not even with a single strategy: exit 1, as memopt says
                    rows.append(f"| {preset} | {context // 1024}k | {budget} GiB | 0 | - | 0 | - | "
                                f"nothing fits, {seconds:.0f} s |")
                    print(f"  {preset} {context} {budget} GiB: {doc['error'][:120]}", file=sys.stderr)
                    continue
                cap = doc["capacity"]
                f = cap["formula"]

                rows.append(f"| {preset} | {context // 1024}k | {budget} GiB | {cap['max_batch']:,} | "
                            f"{f['max_batch']:,} ({apart(f['max_batch'], cap['max_batch'])}) | "
                            f"{cap['max_context']:,} | "
                            f"{f['max_context']:,} ({apart(f['max_context'], cap['max_context'])}) | "
                            f"{cap['estimates']} in {seconds:.0f} s |")
                print(f"  {preset} {context} {budget} GiB: batch {cap['max_batch']} (formula {f['max_batch']}), "
                      f"context {cap['max_context']} (formula {f['max_context']})", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-fits", action="store_true", help="skip part 3 (the capacity searches)")
    parser.add_argument("--fits-only", action="store_true", help="part 3 only")
    args = parser.parse_args()
    if not args.fits_only:
        measured_parts()
    if not args.no_fits:
        fits_part()


def measured_parts() -> None:
    """Parts 1 and 2: the small decoder measured and estimated, llama-7b estimated."""
    small = Path("/tmp/memopt-bench-small-decoder.yaml")
    small.write_text(json.dumps({"model": SMALL, "train": {"batch_size": 8, "steps": 2},
                                 "run": {"device": "cpu", "dtype": "bfloat16"}}))
    print("small decoder, measured", file=sys.stderr)
    small_rows = phase_rows(small, ["--mode", "generate", "--prompt-len", "448", "--new-tokens", "64"], 128, True)
    print("llama-7b, estimated", file=sys.stderr)
    began = time.perf_counter()
    big_rows = phase_rows("llama-7b", ["--mode", "generate", "--prompt-len", "3968", "--new-tokens", "128",
                                       "--batch-size", "8", "--dtype", "fp16", "--device", "cuda"], 512, False)
    big_s = time.perf_counter() - began
    print("\n### Small decoder (d512, GQA 8/2, L6, V32000), bfloat16, CPU, 8 x (448 + 64), measured\n")
    print("| variant | weights MiB | KV cache MiB | prefill peak MiB | decode peak MiB | peak MiB | estimate (off) "
          "| time to first token | decode tok/s | drift (tokens / logits) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(small_rows))
    print(f"\n### llama-7b, float16, CUDA, 8 x (3968 + 128), estimated ({big_s:.0f} s for the four)\n")
    print("| variant | weights GiB | KV cache GiB | prefill peak GiB | decode peak GiB | peak GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(big_rows))


def fits_part() -> None:
    """Part 3: what fits, and the llama-70b 32k estimate's time."""
    print("what fits", file=sys.stderr)
    rows = fits_rows([24, 80, 141])
    print("\n### What fits (float16, CUDA; context = prompt + 128 new tokens)\n")
    print("| model | context | budget | max batch (traced) | formula (off) | longest context at batch 1 (traced) | "
          "formula (off) | estimates |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    spec = Path("/tmp/memopt-bench-llama-70b.yaml")
    spec.write_text("model: {preset: llama-70b, max_seq_len: 32768}\n")
    began = time.perf_counter()
    doc = memopt("estimate", str(spec), "--mode", "generate", "--prompt-len", str(32768 - 128), "--new-tokens", "128",
                 "--batch-size", "1", "--dtype", "fp16", "--device", "cuda")
    run = doc["runs"][0]
    print(f"\nllama-70b at 32k, one sequence: peak {run['peak_bytes'] / GiB:,.2f} GiB (KV cache "
          f"{run['inference']['kv_cache_bytes'] / GiB:,.2f} GiB), estimated in {time.perf_counter() - began:.1f} s "
          f"(the command, process start included), RSS {run['rss_peak_bytes'] / GiB:.2f} GiB")


if __name__ == "__main__":
    main()
