"""N ranks: memopt launches them (``--world-size N``), or runs as one of torchrun's; results gathered to rank 0.

Launched: each rank is ``python -m memopt.engine.rank_worker`` in its own session (process group), with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; it reads the spec as JSON on stdin, joins the process group (gloo
on CPU, NCCL on CUDA) and prints its run as JSON. The parent watches them all: the first rank that fails stops
every other one at once (a rank left waiting in a collective would wait forever), and the error names the rank
and why. No rank outlives the call, whatever happens: Ctrl-C, SIGTERM and SIGHUP stop every rank (the command
line turns them into KeyboardInterrupt), and a launcher killed outright takes its ranks with it (each rank asks
the kernel for a parent-death signal).

Under torchrun (``torchrun --nproc-per-node 2 -m memopt profile spec.yaml``), memopt joins the process group
torchrun describes, each rank runs its step, and rank 0 gathers the others' runs and reports.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memopt.core.errors import MemoptError
from memopt.core.processes import child_env, exit_reason, last_reply
from memopt.core.results import RunResult
from memopt.engine.devices import resolve_device
from memopt.spec import Spec

COLLECTIVE_TIMEOUT_S = 300  # a rank waiting longer than this in a collective gives up (its peers are gone)
CHILD_FLAG = "MEMOPT_RANK_CHILD"


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def in_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def under_launcher() -> bool:
    """Whether torchrun (or another launcher) started this process as one rank of several."""
    return os.environ.get(CHILD_FLAG) is None and int(os.environ.get("WORLD_SIZE", "1")) > 1


def join_process_group(device: str) -> None:
    """Join the process group the environment describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def combine(runs: list[RunResult]) -> RunResult:
    """One run of N ranks: the fields of the rank with the highest peak (the peak that decides whether it
    fits), ``world_size`` and every rank's own run under ``ranks``; the loss is the mean over the ranks."""
    ok = [r for r in runs if r.ok and r.memory is not None]
    worst = max(ok, key=lambda r: r.memory.peak_bytes if r.memory else 0)
    combined = RunResult.from_json(worst.to_json(), device=worst.device)
    combined.world_size = len(runs)
    combined.ranks = [{"rank": i, **r.to_json()} for i, r in enumerate(runs)]
    combined.loss = sum(r.loss for r in ok) / len(ok)
    combined.step_time_s = max(r.step_time_s for r in ok)
    combined.step_times_s = worst.step_times_s
    combined.rank = 0
    return combined


def run_as_rank(spec: Spec, name: str, run: Callable[..., RunResult], **kwargs: Any) -> RunResult:
    """Under torchrun: this process's run, and on rank 0 every rank's combined (other ranks get their own)."""
    import torch.distributed as dist

    from memopt.core._torch_private import leave_process_group

    join_process_group(resolve_device(spec.run.device))
    try:
        if dist.get_world_size() != spec.world_size:
            raise MemoptError(f"--world-size: the spec runs on {spec.world_size} ranks but torchrun started "
                              f"{dist.get_world_size()} (--nproc-per-node x --nnodes)")
        mine = run(spec, name, **kwargs)
        gathered: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else []
        dist.gather_object(mine.to_json(), gathered if dist.get_rank() == 0 else None, dst=0)
        if dist.get_rank() != 0:
            mine.rank = dist.get_rank()
            return mine
        return combine([RunResult.from_json(r, device=mine.device) for r in gathered])
    finally:
        leave_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(spec: Spec, name: str, *, device_memory: int | None = None,
           progress: Callable[[str], None] | None = None) -> RunResult:
    """Run ``spec`` on ``spec.world_size`` ranks on this machine; the combined run, or MemoptError naming the
    rank that failed (every rank is stopped then)."""
    resolve_device(spec.run.device)  # a device that is not here: one error, before any rank starts
    say = progress or (lambda _msg: None)
    world = spec.world_size
    request = json.dumps({"spec": spec.to_dict(), "name": name, "device_memory": device_memory})
    port = _free_port()
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="memopt-ranks-") as folder:
        try:
            for r in range(world):
                env = child_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=str(port), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                                **{CHILD_FLAG: "1"})
                out = open(Path(folder) / f"{r}.out", "w")
                err = open(Path(folder) / f"{r}.err", "w")
                proc = subprocess.Popen([sys.executable, "-m", "memopt.engine.rank_worker"], stdin=subprocess.PIPE,
                                        stdout=out, stderr=err, text=True, env=env, start_new_session=True)
                out.close()
                err.close()
                assert proc.stdin is not None
                proc.stdin.write(request)
                proc.stdin.close()
                procs.append(proc)
            say(f"{name}: {world} ranks running")
            failed = _wait(procs)
            if failed is not None:
                _stop(procs)
                raise MemoptError(f"rank {failed} of {world} failed: {_why(Path(folder), failed, procs[failed])}; "
                                  f"every rank was stopped")
            runs = [_read_run(Path(folder), r, world) for r in range(world)]
        finally:
            _stop(procs)
    return combine(runs)


def _wait(procs: list[subprocess.Popen[str]]) -> int | None:
    """Wait for every rank: the first that fails, or None. (A rank left waiting in a collective gives up after
    COLLECTIVE_TIMEOUT_S and fails.)"""
    while True:
        codes = [p.poll() for p in procs]
        for r, code in enumerate(codes):
            if code is not None and code != 0:
                return r
        if all(code == 0 for code in codes):
            return None
        time.sleep(0.05)


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    """Kill every rank still running, and whatever it started (its own session), then reap it."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not refused
            pass


def _why(folder: Path, r: int, proc: subprocess.Popen[str]) -> str:
    reply = last_reply((folder / f"{r}.out").read_text())
    if reply is not None and "error" in reply:
        return str(reply["error"])
    return exit_reason(proc.returncode or 0, (folder / f"{r}.err").read_text())


def _read_run(folder: Path, r: int, world: int) -> RunResult:
    reply = last_reply((folder / f"{r}.out").read_text())
    if reply is None or "run" not in reply:  # exit 0 without a run: something ended the rank early
        why = reply.get("error") if reply else exit_reason(0, (folder / f"{r}.err").read_text())
        raise MemoptError(f"rank {r} of {world} ended without a result: {why}")
    return RunResult.from_json(reply["run"], device=reply["device"])
