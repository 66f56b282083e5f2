#!/usr/bin/env bash
# The CUDA checks, for a session that is lent a GPU (under 8 minutes on one): the CUDA tests, then the benchmark
# rows of scripts/gpu_rows.py (tracker peak, allocated, reserved, the difference named, step time vs baseline).
# Output files go to $OUT.
set -uo pipefail
export PYTHONPATH=$PWD:$PWD/.devdeps  # .devdeps: pure wheels the device lacks (pydantic), carried by the caller
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv
python -c "import torch, typer, rich, pydantic, yaml, psutil; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python -c "import transformers, peft, bitsandbytes; print('hf extras present')" 2>/dev/null || echo "no hf extras"
[ -n "${SKIP_TESTS:-}" ] || timeout 240 python -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tail -25
timeout 300 python scripts/gpu_rows.py "$OUT"
