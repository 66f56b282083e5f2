"""Before a real run: will it fit in this machine (or in ``--device-memory``)? Refuse it clearly if not.

A run far larger than the machine would otherwise be killed by the OS's OOM killer with no message.
The standard formulas (cheap) decide whether to look closer; then the step is traced on fake tensors
(``memopt estimate``), and a run whose estimated peak exceeds what is available is refused with the
estimate and the single strategies that would make it fit.
"""

from __future__ import annotations

from collections.abc import Callable

import psutil

from memopt.analysis.estimate import analytic, estimate, fits
from memopt.core.errors import OutOfMemory, StrategyError
from memopt.core.units import format_bytes
from memopt.engine.devices import resolve_device
from memopt.spec import Spec

LOOK_CLOSER = 0.25      # trace an estimate when the formulas reach this share of what is available
SUGGEST_SECONDS = 20.0  # how long to look for strategies that would fit


def available_bytes(device: str) -> tuple[int, str]:
    """Free memory of the device and where the number comes from."""
    if device == "cuda":
        import torch

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
    rough = sum(v for k, v in analytic(spec).items() if k != "peak" and v is not None)
    if device_memory is None and rough < LOOK_CLOSER * budget:
        return
    say("checking that the run fits (estimate on fake tensors)")
    try:
        traced = estimate(spec)
    except StrategyError as exc:  # a strategy that cannot be traced (bitsandbytes' layers): the run's own
        say(f"not checked up front ({exc}); live tensors are watched as the run goes")  # tracker holds the limit
        return
    assert traced.memory is not None
    peak = traced.memory.peak_bytes
    if peak <= budget:
        return
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
