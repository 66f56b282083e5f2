"""The CUDA caching allocator's settings for the run's process (``PYTORCH_CUDA_ALLOC_CONF``).

They change what the allocator reserves, not what tensors allocate: fragmentation (``max_memory_reserved`` -
``max_memory_allocated`` at the peak) is what moves, and only a profile on a GPU measures it. memopt sets the
variable in the run's own process before CUDA initialises there (``memopt profile``, each run of ``compare``),
merged over any the user set; a process where CUDA is already initialised with other settings is refused.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from pydantic import Field

from memopt.core._torch_private import in_fake_mode
from memopt.core.errors import StrategyError
from memopt.strategies import register
from memopt.strategies.base import Options, Strategy

ENV = "PYTORCH_CUDA_ALLOC_CONF"


class AllocatorOptions(Options):
    expandable_segments: bool = Field(False, description="grow segments in place instead of new ones per size "
                                                         "(less fragmentation when sizes vary)")
    max_split_size_mb: int | None = Field(None, gt=20, description="blocks above this many MiB are never split "
                                                                   "(PyTorch needs more than 20)")
    garbage_collection_threshold: float | None = Field(None, gt=0, lt=1, description="free cached blocks once this "
                                                       "fraction of the device's memory is reserved")


def alloc_conf(options: AllocatorOptions) -> str:
    """The options as PYTORCH_CUDA_ALLOC_CONF writes them (only those set)."""
    parts = []
    if options.expandable_segments:
        parts.append("expandable_segments:True")
    if options.max_split_size_mb is not None:
        parts.append(f"max_split_size_mb:{options.max_split_size_mb}")
    if options.garbage_collection_threshold is not None:
        parts.append(f"garbage_collection_threshold:{options.garbage_collection_threshold:g}")
    return ",".join(parts)


def merged_conf(ours: str, theirs: str) -> str:
    """Our settings over the user's: a key both set takes ours, the user's others stay."""
    keys = {part.split(":", 1)[0] for part in ours.split(",") if part}
    kept = [part for part in theirs.split(",") if part and part.split(":", 1)[0].strip() not in keys]
    return ",".join([*kept, ours] if ours else kept)


@register
class Allocator(Strategy[AllocatorOptions]):
    name = "allocator"
    Options = AllocatorOptions
    summary = "the CUDA caching allocator's settings (PYTORCH_CUDA_ALLOC_CONF), set in the run's own process"
    saves = "reserved memory, not allocated: fragmentation (reserved - allocated at the peak)"
    devices = ("cuda",)
    modes = ("train", "infer", "generate")
    order = 0
    candidates = ({"expandable_segments": True},)
    searched = False  # allocated bytes stay the same: optimize and --fits work on those
    changes_allocated = False

    @classmethod
    def set_up_process(cls, options: Any) -> None:
        """Put the settings in this process's environment, merged over the user's, before CUDA initialises."""
        if not torch.cuda.is_initialized():
            os.environ[ENV] = merged_conf(alloc_conf(options), os.environ.get(ENV, ""))

    def check(self) -> None:
        conf = alloc_conf(self.options)
        if not conf:
            raise StrategyError("allocator: set expandable_segments, max_split_size_mb or "
                                "garbage_collection_threshold, otherwise nothing changes")
        if in_fake_mode():
            raise StrategyError("allocator: changes what the CUDA allocator reserves, which an estimate does not "
                                "model (it traces allocated bytes); profile on a GPU to measure it")
        current = os.environ.get(ENV, "")
        if torch.cuda.is_initialized() and merged_conf(conf, current) != current:
            raise StrategyError(f"allocator: CUDA was already initialised in this process, so {ENV}={conf} "
                                "cannot take effect; set it in the environment before Python starts")

    def report(self) -> dict[str, str]:
        return {ENV: os.environ.get(ENV, "")}
