"""This machine's rates, probed in a few seconds and cached: the cost model of ``memopt optimize`` divides by them.

- ``flops_per_s``: a float32 matmul (1024 x 1024 x 1024) repeated for about half a second, on the run's device;
- ``write_bytes_per_s`` / ``read_bytes_per_s``: 64 MiB written to and read back from the tier that offload uses on
  that device (files in the temporary folder for a CPU device, pinned host memory for CUDA), through the same
  Tier classes, best of three.

The rates are cached in ``$MEMOPT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/memopt``, else ``~/.cache/memopt``),
keyed by host, torch version, device and thread count; a cache that cannot be read or written is probed again.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from memopt.strategies.tiers import DiskTier, HostTier, Tier

PROBE_BYTES = 64 * 2**20
MATMUL_N = 1024


@dataclass(frozen=True)
class Rates:
    flops_per_s: float
    write_bytes_per_s: float
    read_bytes_per_s: float


def cache_file() -> Path:
    root = os.environ.get("MEMOPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "memopt")
    return Path(root) / "rates.json"


def _key(device: str) -> str:
    return f"{platform.node()}|torch {torch.__version__}|{device}|{torch.get_num_threads()} threads"


def machine_rates(device: str) -> Rates:
    """The cached rates of ``device`` ("cpu" or "cuda") on this machine, probed when not cached yet."""
    path, key = cache_file(), _key(device)
    try:
        cached = json.loads(path.read_text())
        return Rates(**cached[key])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    rates = probe(device)
    try:
        try:
            known = json.loads(path.read_text())
            known = known if isinstance(known, dict) else {}
        except (OSError, ValueError):
            known = {}
        known[key] = asdict(rates)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: probed again next time
    return rates


def probe(device: str) -> Rates:
    return Rates(_matmul_rate(device), *_copy_rates(device))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _matmul_rate(device: str, seconds: float = 0.5) -> float:
    a = torch.randn(MATMUL_N, MATMUL_N, device=device)
    b = torch.randn(MATMUL_N, MATMUL_N, device=device)
    torch.mm(a, b)  # warm-up
    _sync(device)
    runs, began = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        runs += 1
        _sync(device)
        elapsed = time.perf_counter() - began
        if elapsed >= seconds:
            return 2 * MATMUL_N**3 * runs / elapsed


def _copy_rates(device: str) -> tuple[float, float]:
    tier: Tier = HostTier() if device == "cuda" else DiskTier("probe", "memopt-probe-")
    block = torch.ones(PROBE_BYTES // 4, device=device)
    back = torch.empty_like(block)
    writes, reads = [], []
    try:
        for _ in range(3):  # one key, rewritten: as a step after the first rewrites its states
            began = time.perf_counter()
            tier.put("probe", block)
            _sync(device)
            writes.append(time.perf_counter() - began)
            began = time.perf_counter()
            tier.read_into("probe", back)
            _sync(device)
            reads.append(time.perf_counter() - began)
    finally:
        tier.close()
    return PROBE_BYTES / max(min(writes), 1e-6), PROBE_BYTES / max(min(reads), 1e-6)
