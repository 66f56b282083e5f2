"""Run one profile in its own Python process, so that peaks, caches and crashes never leak between runs.

The parent sends the resolved spec as JSON on stdin; the child (``python -m memopt.app.isolate``) runs it
and prints one JSON object on stdout: ``{"device": ..., "run": <schema-1 run dict, or the failed run>, "timeline":
<its events when asked for, else null>}``.
"""

from __future__ import annotations

import json
import subprocess
import sys

from memopt.app.profile import profile
from memopt.core.errors import MemoptError
from memopt.core.processes import child_env, die_with_parent, exit_reason, last_reply, user_output_to_stderr
from memopt.core.results import RunResult
from memopt.core.trace import MemoryTrace
from memopt.spec import Spec, spec_from_data


def run_isolated(spec: Spec, name: str, *, device_memory: int | None = None, timeout: float | None = None,
                 grads_to: str | None = None, drift: bool = True, timeline: bool = False,
                 stacks: bool = False) -> RunResult:
    """The run, read back from the child's JSON; a run that dies comes back failed (``ok`` false) with why.
    ``drift`` false: the lossy strategies' drift is not measured again (a repeated run of the same set).
    ``timeline`` (``stacks``): its events come back too (memopt.core.trace)."""
    request = json.dumps({"spec": spec.to_dict(), "name": name, "device_memory": device_memory,
                          "grads_to": grads_to, "drift": drift, "timeline": timeline, "stacks": stacks})
    env = child_env()
    try:
        proc = subprocess.run([sys.executable, "-m", "memopt.app.isolate"], input=request, capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return _failed(spec, name, f"timed out after {timeout:.0f} s")
    reply = last_reply(proc.stdout)
    if reply is not None:
        result = RunResult.from_json(reply["run"], device=reply["device"])
        if reply.get("timeline") is not None and result.memory is not None:
            result.memory.timeline = MemoryTrace.from_json(reply["timeline"])
        return result
    return _failed(spec, name, exit_reason(proc.returncode, proc.stderr))


def _failed(spec: Spec, name: str, error: str) -> RunResult:
    return RunResult.failed(name, [s.to_dict() for s in spec.strategies], error, device=spec.run.device)


def main() -> None:
    """The child: read the request, profile it (memopt.app.profile: preflight, drift, the run), print the run (what
    user code prints goes to stderr); it dies with its parent."""
    die_with_parent()
    with user_output_to_stderr():
        request = json.loads(sys.stdin.read())
        spec = spec_from_data(request["spec"])
        try:
            result = profile(spec, request["name"], device_memory=request.get("device_memory"),
                             grads_to=request.get("grads_to"), drift=request.get("drift", True),
                             timeline=request.get("timeline", False), stacks=request.get("stacks", False))
        except MemoptError as exc:
            result = _failed(spec, request["name"], str(exc))
        except MemoryError:
            result = _failed(spec, request["name"], "out of memory (MemoryError)")
    timeline = result.memory.timeline if result.memory is not None else None
    print(json.dumps({"device": result.device, "run": result.to_json(),
                      "timeline": timeline.to_json() if timeline is not None else None}), flush=True)


if __name__ == "__main__":
    main()
