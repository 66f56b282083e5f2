"""The step as a Chrome trace (the JSON that Perfetto's ui.perfetto.dev and chrome://tracing open): a counter track
of the live total and one per category, in bytes, and slices for the phases and the modules."""

from __future__ import annotations

from typing import Any

from memopt.core.trace import MemoryTrace

PID = 1
PHASE_TID, MODULE_TID = 1, 2


def _spans(names: list[Any], times_us: list[float]) -> list[tuple[Any, float, float]]:
    """Runs of the same name: (name, start, end) in microseconds."""
    spans: list[tuple[Any, float, float]] = []
    for name, t in zip(names, times_us):
        if spans and spans[-1][0] == name:
            spans[-1] = (name, spans[-1][1], t)
        else:
            if spans:
                spans[-1] = (spans[-1][0], spans[-1][1], t)
            spans.append((name, t, t))
    return spans


def chrome_trace(trace: MemoryTrace, title: str) -> dict[str, Any]:
    """The trace document; ``otherData.peak_bytes`` is the highest live total (the ``total`` counter's maximum)."""
    times = [t / 1000 for t in trace.times_ns]
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": PID, "args": {"name": title}},
        {"name": "thread_name", "ph": "M", "pid": PID, "tid": PHASE_TID, "args": {"name": "phases"}},
        {"name": "thread_name", "ph": "M", "pid": PID, "tid": MODULE_TID, "args": {"name": "modules"}},
    ]
    last: list[int] | None = None
    for t, live in zip(times, trace.bytes):
        events.append({"name": "total", "ph": "C", "ts": t, "pid": PID, "args": {"bytes": sum(live)}})
        for i, category in enumerate(trace.categories):
            if last is None or live[i] != last[i]:
                events.append({"name": category, "ph": "C", "ts": t, "pid": PID, "args": {"bytes": live[i]}})
        last = live
    for tid, names, cat in ((PHASE_TID, trace.phases, "phase"), (MODULE_TID, trace.modules, "module")):
        for name, start, end in _spans(names, times):
            if name is not None:
                events.append({"name": name, "cat": cat, "ph": "X", "ts": start, "dur": max(end - start, 0.001),
                               "pid": PID, "tid": tid})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"tool": "memopt", "peak_bytes": trace.peak_bytes(), "title": title}}
