"""Profile/estimate JSON of a fixed set of runs, with timings, pids and host views removed: what a refactor must
leave unchanged, to the byte.

    python scripts/pin_json.py write before.json   # on the old code
    python scripts/pin_json.py diff before.json    # on the new code: prints every difference, exit 1 if any
    python scripts/pin_json.py diff before.json hf-llama   # only the runs whose name holds 'hf-llama'

Runs (each through the real command line, in its own process): the tiny encoder, the tiny decoder and a tiny
Hugging Face llama config (when transformers is installed) x baseline, ckpt+offload, quant:bits=4,lora=8 and
--mode generate, each profiled and estimated (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 500, "max_position_embeddings": 128}
SETS = {"baseline": [], "ckpt+offload": ["-s", "ckpt+offload"], "quant4-lora8": ["-s", "quant:bits=4,lora=8"],
        "generate": ["--mode", "generate", "--prompt-len", "24", "--new-tokens", "8"]}
# measured wall-clock times, the host's views and anything else that varies from run to run
VOLATILE = {"step_time_s", "step_times_s", "host", "python_heap_peak_bytes", "rss_peak_bytes", "pid", "time_s",
            "ttft_s", "decode_tokens_per_s", "elapsed_s", "created", "tokens_per_s", "prefill_s", "decode_s",
            "slowdown", "memopt_version"}


def models(tmp: Path) -> dict[str, list[str]]:
    found = {"tiny": [str(ROOT / "configs/tiny.yaml")], "tiny-decoder": [str(ROOT / "configs/tiny-decoder.yaml")]}
    try:
        import transformers  # noqa: F401
    except ImportError:
        return found
    (tmp / "llama").mkdir()
    (tmp / "llama" / "config.json").write_text(json.dumps(LLAMA))
    found["hf-llama"] = ["configs/tiny.yaml", "--hf", str(tmp / "llama" / "config.json"), "--batch-size", "2"]
    return found


def scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in VOLATILE and not k.endswith("_s")}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def collect(only: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model, args in models(Path(tmp)).items():
            for name, extra in SETS.items():
                for command in ("profile", "estimate"):
                    key = f"{command} {model} {name}"
                    if only and only not in key:
                        continue
                    print(key, file=sys.stderr, flush=True)
                    if model == "tiny" and name in ("generate", "quant4-lora8"):
                        extra_args = extra if name != "generate" else ["--mode", "infer"]  # an encoder cannot generate
                    else:
                        extra_args = extra
                    if model == "hf-llama" and name != "generate":
                        extra_args = [*extra_args, "--seq-len", "32"]
                    done = subprocess.run([sys.executable, "-m", "memopt", command, *args, *extra_args, "--json"],
                                          capture_output=True, text=True, cwd=ROOT)
                    text = done.stdout.replace(tmp, "TMP")  # the temporary folder's name differs each time
                    out[key] = scrub(json.loads(text)) if done.returncode == 0 else {
                        "exit": done.returncode, "stderr": done.stderr.strip().splitlines()[-1:]}
    return out


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new:
                found.append(f"{path}.{key}: {'added' if key not in old else 'removed'}")
            else:
                found.extend(differences(old[key], new[key], f"{path}.{key}"))
        return found
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{path}[{i}]")]
    if isinstance(old, float) and isinstance(new, float) and abs(old - new) <= 1e-9 * max(1.0, abs(old)):
        return []
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def main() -> int:
    action, path = sys.argv[1], Path(sys.argv[2])
    only = sys.argv[3] if len(sys.argv) > 3 else ""  # a part of the run names: only those (write: merged in)
    current = collect(only)
    if action == "write":
        if only and path.exists():
            current = {**json.loads(path.read_text()), **current}
        path.write_text(json.dumps(current, indent=1, sort_keys=True))
        print(f"{len(current)} runs written to {path}")
        return 0
    pinned = json.loads(path.read_text())
    found = differences({k: v for k, v in pinned.items() if only in k}, current)
    for line in found:
        print(line)
    print(f"{len(current)} runs, {len(found)} differences")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
