"""Before a real run: will it fit in this machine (or in ``--device-memory``)? Refuse it clearly if not; for N
ranks, before any of them starts.

A run far larger than the machine would otherwise be killed by the OS's OOM killer with no message.
The standard formulas (cheap) decide whether to look closer; then the step is traced on fake tensors
(``memopt estimate``), and a run whose estimated peak exceeds what is available is refused with the
estimate and the single strategies that would make it fit.
"""

from __future__ import annotations

from collections.abc import Callable

import psutil
import torch

from memopt.analysis.estimate import analytic, estimate, fits
from memopt.core.errors import MemoptError, OutOfMemory, StrategyError
from memopt.core.results import RunResult
from memopt.core.units import format_bytes
from memopt.engine.devices import resolve_device
from memopt.spec import Spec
from memopt.strategies import allocated_view

LOOK_CLOSER = 0.25      # trace an estimate when the formulas reach this share of what is available
SUGGEST_SECONDS = 20.0  # how long to look for strategies that would fit


def available_bytes(device: str) -> tuple[int, str]:
    """Free memory of the device and where the number comes from."""
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return free, "free CUDA memory"
    return psutil.virtual_memory().available, "available memory on this machine"


def ensure_fits_here(spec: Spec, device_memory: int | None, say: Callable[[str], None]) -> None:
    """Raise OutOfMemory, with the estimate and what would fit, when the run cannot fit; else return."""
    device = resolve_device(spec.run.device)
    if device_memory is not None:
        budget, what = device_memory, "--device-memory"
    else:
        budget, what = available_bytes(device)
    traced = _traced_if_close(spec, budget, device_memory is not None, say,
                              "checking that the run fits (estimate on fake tensors)")
    if traced is None or traced.memory is None or traced.memory.peak_bytes <= budget:
        return
    peak = traced.memory.peak_bytes
    where = f" in {traced.memory.peak_module}" if traced.memory.peak_module else ""
    message = (f"out of memory: the step's estimated peak is {format_bytes(peak)} (during "
               f"{traced.memory.peak_phase}{where}), over the {format_bytes(budget)} of {what}; nothing was run")
    found = fits(spec, peak, budget, say, deadline_s=SUGGEST_SECONDS, strongest_only=True)
    if found.helpers:
        best = sorted(found.helpers, key=lambda h: h["peak_bytes"])[:3]
        message += "; single strategies that would fit (estimated): " + ", ".join(
            f"{h['strategies']} ({format_bytes(h['peak_bytes'])})" for h in best)
    else:
        message += ("; no single strategy makes it fit: try memopt optimize --budget "
                    + format_bytes(budget).replace(" ", ""))
    raise OutOfMemory(message)


def _traced_if_close(spec: Spec, budget: int, limit_given: bool, say: Callable[[str], None],
                     checking: str) -> RunResult | None:
    """The spec's estimate (one rank's, on ranks) when the formulas reach LOOK_CLOSER of ``budget`` or a limit was
    given; None when it is far from it, or when a strategy cannot be traced (bitsandbytes' layers, ddp): the run's
    own tracker then holds the limit as it goes."""
    rough = sum(v for k, v in analytic(spec).items() if k != "peak" and v is not None)
    if not limit_given and rough < LOOK_CLOSER * budget:
        return None
    say(checking)
    try:
        return estimate(allocated_view(spec))
    except StrategyError as exc:
        say(f"not checked up front ({exc}); live tensors are watched as the run goes")
        return None


def interpreter_bytes() -> int:
    """What one more memopt process takes before its model: this process's resident memory (torch imported)."""
    return int(psutil.Process().memory_info().rss)


def ensure_ranks_fit(spec: Spec, device_memory: int | None, say: Callable[[str], None]) -> None:
    """Before N ranks start: N devices when they are GPUs, N interpreters in this machine's memory, and each rank's
    estimated peak (one rank traced in a fake process group) in what is left per rank (or ``--device-memory``).
    Raise MemoptError / OutOfMemory saying which, having started nothing."""
    world, device = spec.world_size, resolve_device(spec.run.device)
    if device == "cuda" and world > torch.cuda.device_count():
        raise MemoptError(f"--world-size: {world} ranks need {world} CUDA devices (one each), this machine has "
                          f"{torch.cuda.device_count()}; nothing was started")
    host, what = available_bytes("cpu")
    interpreters = world * interpreter_bytes()
    if interpreters > host:
        raise OutOfMemory(f"--world-size {world}: {world} rank processes need about {format_bytes(interpreters)} for "
                          f"their Python interpreters alone ({format_bytes(interpreters // world)} each, as this "
                          f"one), over the {format_bytes(host)} of {what}; nothing was started")
    if device_memory is not None:
        budget, what = device_memory, "--device-memory"
    elif device == "cuda":
        budget, what = available_bytes("cuda")
    else:
        budget, what = (host - interpreters) // world, f"{what} left to each of the {world} ranks"
    traced = _traced_if_close(spec, budget, device_memory is not None, say,
                              f"checking that {world} ranks fit (one rank traced on fake tensors)")
    if traced is None or traced.memory is None:
        return
    if traced.memory.peak_bytes > budget:
        raise OutOfMemory(f"--world-size {world}: each rank's estimated peak is "
                          f"{format_bytes(traced.memory.peak_bytes)} (during {traced.memory.peak_phase}), over the "
                          f"{format_bytes(budget)} of {what}; nothing was started")
