"""One rank that memopt.engine.ranks.launch started (``python -m memopt.engine.rank_worker``): it reads the spec as
JSON on stdin, joins the process group, runs the spec and prints its run (or the error) as JSON."""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from memopt.core.errors import MemoptError
from memopt.engine.devices import resolve_device
from memopt.engine.ranks import join_process_group
from memopt.engine.run import run
from memopt.spec import spec_from_data


def main() -> None:
    """One launched rank: join the group, run the spec, print the run (or the error) as JSON."""
    request = json.loads(sys.stdin.read())
    spec = spec_from_data(request["spec"])
    code = 0
    try:
        join_process_group(resolve_device(spec.run.device))
        result = run(spec, request["name"], device_memory=request.get("device_memory"))
        print(json.dumps({"device": result.device, "run": result.to_json()}), flush=True)
    except MemoptError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        code = 1
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    main()
