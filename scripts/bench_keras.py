"""One Keras language model on Keras's PyTorch and TensorFlow backends, and memopt's own decoder of the same shape.

The model is tests/keras_lm.py's (2 pre-norm blocks, d128, 4 heads, GELU FFN 512, V1000) at batch 4 x seq 64,
AdamW, float32, CPU. Each row is one ``memopt profile`` (or ``estimate``) in its own process, so every figure is
that run's own: the PyTorch rows from memopt's tracker, the TensorFlow rows from TensorFlow's allocator events
(graph mode, then ``jit_compile``) and XLA's buffer assignment. Markdown on stdout, progress on stderr.

    python scripts/bench_keras.py      # about 2 minutes on 2 CPU cores (needs pip install 'memopt[tf]')
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
SHAPE = {"batch_size": 4, "seq_len": 64, "steps": 5, "optimizer": "adamw"}
KERAS = {"keras": "tests.keras_lm:make_lm"}
DECODER = {"arch": "decoder", "d_model": 128, "n_heads": 4, "n_layers": 2, "vocab_size": 1000, "ffn_dim": 512,
           "max_seq_len": 64}
ROWS: list[tuple[str, str, dict[str, Any], str, list[str]]] = [  # name, command, model, its peak, strategies
    ("Keras on PyTorch", "profile", {**KERAS, "backend": "torch"},
     "memopt's tracker: every tensor the step holds, by storage", []),
    ("Keras on PyTorch, ckpt", "profile", {**KERAS, "backend": "torch"},
     "the blocks recomputed in backward (torch.utils.checkpoint on their call)", ["ckpt"]),
    ("Keras on PyTorch, lora", "profile", {**KERAS, "backend": "torch"},
     "Keras's enable_lora (rank 8) on the blocks' Dense/EinsumDense, the rest frozen", ["lora"]),
    ("Keras on PyTorch, quant", "profile", {**KERAS, "backend": "torch"},
     "Keras's layer.quantize('int8') on the blocks' Dense/EinsumDense (kernels frozen)", ["quant"]),
    ("Keras on TensorFlow", "profile", {**KERAS, "backend": "tensorflow"},
     "TensorFlow's allocator events replayed (graph mode; up to 2% from run to run)", []),
    ("Keras on TensorFlow, jit_compile", "profile", {**KERAS, "backend": "tensorflow", "kwargs": {"jit": True}},
     "the allocator's events of the XLA step (the same every run)", []),
    ("Keras on TensorFlow, jit_compile", "estimate", {**KERAS, "backend": "tensorflow", "kwargs": {"jit": True}},
     "XLA's buffer assignment, total bytes", []),
    ("memopt decoder (RMSNorm, SwiGLU)", "profile", DECODER, "memopt's tracker", []),
]


def memopt(command: str, model: dict[str, Any], strategies: list[str]) -> dict[str, Any]:
    """One memopt command on a spec with this model section and strategies, in its own process; its run dict."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=ROOT, delete=False) as spec:
        json.dump({"model": model, "train": SHAPE, "run": {"device": "cpu", "dtype": "float32"},
                   "strategies": strategies}, spec)
    try:
        out = subprocess.run([sys.executable, "-m", "memopt", command, spec.name, "--json"], capture_output=True,
                             text=True, cwd=ROOT)
    finally:
        Path(spec.name).unlink()
    if out.returncode:
        raise SystemExit(f"memopt {command} failed: {out.stderr.strip()[-2000:]}")
    run: dict[str, Any] = json.loads(out.stdout)["runs"][0]
    return run


def main() -> None:
    print("| run | command | peak | params | grads | optimizer | activations (own peak) | step time "
          "| what the peak is |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name, command, model, meaning, strategies in ROWS:
        began = time.perf_counter()
        run = memopt(command, model, strategies)
        print(f"  {name} ({command}): {run['peak_bytes']:,} B in {time.perf_counter() - began:.0f} s", file=sys.stderr)
        states = run["state_bytes"]
        step = "-" if command == "estimate" else f"{run['step_time_s'] * 1000:.1f} ms"
        activations = run["category_peak_bytes"].get("activations")
        saved = "-" if activations is None or command == "estimate" else f"{activations / MiB:.2f} MiB"
        print(f"| {name} | {command} | {run['peak_bytes'] / MiB:.2f} MiB ({run['peak_bytes']:,} B) | "
              f"{states['params'] / MiB:.2f} MiB | {states['grads'] / MiB:.2f} MiB | "
              f"{states['optimizer'] / MiB:.2f} MiB | {saved} | {step} | {meaning} |")


if __name__ == "__main__":
    main()
