"""Devices: which one a run uses, waiting for it, its allocation granularity, and a memory limit held on it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from memopt.core.errors import MemoptError
from memopt.measure.tracker import CUDA_BLOCK, TensorTracker
from memopt.spec import Spec


def resolve_device(requested: str, estimate: bool = False) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; 'cuda' without a GPU is a clear error (unless estimating)."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available() and not estimate:
        raise MemoptError("run.device: cuda was requested but no CUDA device is available here "
                          "(use --device cpu, or memopt estimate --device cuda)")
    return requested


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def block_size(device: str) -> int:
    """What the device's allocator rounds a block up to (CUDA's caching allocator: 512 bytes)."""
    return CUDA_BLOCK if device == "cuda" else 1


@contextlib.contextmanager
def limit_watch(spec: Spec, device_memory: int | None, fake: bool, stage: str) -> Iterator[TensorTracker | None]:
    """With ``device_memory``, live tensors are held under it from the model's build on (build and warm-up;
    the measured steps have their own tracker), an overflow naming the ``stage`` the tracker is told."""
    if device_memory is None or fake:
        yield None
        return
    device = resolve_device(spec.run.device)
    with TensorTracker(device, limit_bytes=device_memory,
                       round_to=block_size(device)) as tracker:
        tracker.stage = stage
        yield tracker
