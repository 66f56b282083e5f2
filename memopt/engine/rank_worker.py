"""One rank that memopt.engine.ranks.launch started (``python -m memopt.engine.rank_worker``): it reads the spec as
JSON on stdin, joins the process group, runs the spec and prints its run (or the error) as JSON."""

from __future__ import annotations

import json
import sys

from memopt.core._torch_private import leave_process_group
from memopt.core.errors import MemoptError
from memopt.core.processes import die_with_parent, user_output_to_stderr
from memopt.engine.devices import resolve_device
from memopt.engine.ranks import join_process_group
from memopt.engine.run import run
from memopt.spec import spec_from_data


def main() -> None:
    """One launched rank: die with the launcher, join the group, run the spec, print the run (or the error) as JSON
    (what user code prints goes to stderr: stdout holds this reply alone)."""
    die_with_parent()
    code = 0
    with user_output_to_stderr():
        try:
            request = json.loads(sys.stdin.read())
            spec = spec_from_data(request["spec"])
            join_process_group(resolve_device(spec.run.device))
            result = run(spec, request["name"], device_memory=request.get("device_memory"))
            reply: dict[str, object] = {"device": result.device, "run": result.to_json()}
        except MemoptError as exc:
            reply, code = {"error": str(exc)}, 1
        except Exception as exc:
            reply, code = {"error": f"{type(exc).__name__}: {exc}"}, 1
        finally:
            leave_process_group()
    print(json.dumps(reply), flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
