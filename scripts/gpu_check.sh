#!/usr/bin/env bash
# The CUDA checks, for a session that is lent a GPU: the CUDA tests and the CUDA benchmark rows, output to $OUT.
set -uo pipefail
export PYTHONPATH=$PWD:$PWD/.devdeps  # .devdeps: pure wheels the device lacks (pydantic), carried by the caller
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
printf 'model: {arch: decoder, d_model: 512, n_heads: 8, n_kv_heads: 2, n_layers: 6, vocab_size: 32000, ffn_dim: 1376, max_seq_len: 1024}\ntrain: {batch_size: 8, steps: 2}\nrun: {dtype: bfloat16}\n' > /tmp/memopt-gpu-decoder.yaml
nvidia-smi --query-gpu=name,memory.total --format=csv
python -c "import torch, typer, rich, pydantic, yaml, psutil; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python -c "import transformers, peft, bitsandbytes; print('hf extras present')" 2>/dev/null || echo "no hf extras"
[ -n "${SKIP_TESTS:-}" ] || timeout 300 python -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tail -25
for mix in "" "offload_states" "offload_states:params=true+ckpt+chunked_ce" "offload_states:params=true+optim_in_bwd+ckpt+chunked_ce+offload"; do
  name=${mix:-baseline}
  timeout 120 python -m memopt profile configs/seed.yaml --device cuda --steps 3 ${mix:+-s "$mix"} --json > "$OUT/${name//[:+=,]/_}.json" 2> "$OUT/${name//[:+=,]/_}.err"
  python - "$OUT/${name//[:+=,]/_}.json" "$name" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))["runs"][0]
    f = r.get("strategy_facts", {}).get("offload_states", {})
    print(f"{sys.argv[2]:70s} peak {r['peak_bytes']/2**20:9.2f} MiB  step {r['step_time_s']*1000:8.1f} ms  "
          f"cuda max_allocated {r['cuda']['max_allocated_bytes']/2**20 if r.get('cuda') else 0:9.2f} MiB  moved {f}")
except Exception as exc:
    print(sys.argv[2], "failed:", exc, open(sys.argv[1].replace('.json', '.err')).read()[-500:])
PY
done
# deployment memory (issue 14): generation on CUDA, static vs dynamic cache, kv_quant, chunked prefill, weights offload
for mix in "" "kv_quant:bits=8" "quant:bits=4+kv_quant:bits=8" "quant:bits=4+kv_quant:bits=8+chunked_prefill:chunk=128" "offload"; do
  name=gen_${mix:-baseline}
  timeout 120 python -m memopt profile /tmp/memopt-gpu-decoder.yaml --device cuda --mode generate --prompt-len 448 --new-tokens 64 ${mix:+-s "$mix"} --json > "$OUT/${name//[:+=,]/_}.json" 2> "$OUT/${name//[:+=,]/_}.err"
  python - "$OUT/${name//[:+=,]/_}.json" "$name" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))["runs"][0]
    i = r["inference"]
    print(f"{sys.argv[2]:60s} peak {r['peak_bytes']/2**20:9.2f} MiB  kv {i['kv_cache_bytes']/2**20:8.2f} MiB  "
          f"ttft {i['time_to_first_token_s']*1000:7.1f} ms  decode {i['decode_tokens_per_s']:9.0f} tok/s  "
          f"cuda max_allocated {r['cuda']['max_allocated_bytes']/2**20:9.2f} MiB")
except Exception as exc:
    print(sys.argv[2], "failed:", exc, open(sys.argv[1].replace('.json', '.err')).read()[-500:])
PY
done
