"""What both framework callbacks do: start the measurement when training starts, a step per optimizer step (the
first the warm-up), stop it when training ends or fails, and write the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memopt.app.track import Tracking
from memopt.core.files import write_output
from memopt.core.results import RunResult
from memopt.render.outputs import json_text


class CallbackSession:
    """One training run's measurement, driven by a framework's callback hooks."""

    def __init__(self, label: str, json_out: str | Path | None, report: bool):
        self.label, self.json_out, self.report_at_end = label, json_out, report
        self.tracking: Tracking | None = None
        self.done: Tracking | None = None

    def start(self, model: Any, device: str | None) -> None:
        self.stop(failed=True)  # a run that ended without telling us
        tracking = Tracking(model, None, warmup_steps=1, device=device, label=self.label)
        tracking.__enter__()
        self.tracking = tracking

    def step_logs(self) -> dict[str, int]:
        """The last optimizer step's peak and the live bytes by category now, for the framework's logs."""
        tracking = self.tracking
        if tracking is None or not tracking.step_peaks:
            return {}
        live = {f"memopt/{category}_bytes": n for category, n in tracking.live_bytes().items()}
        return {"memopt/step_peak_bytes": tracking.step_peaks[-1], **live}

    def stop(self, failed: bool = False) -> None:
        """End the measurement (the hooks and the tracker come off); write the report unless training failed."""
        tracking, self.tracking = self.tracking, None
        if tracking is None:
            return
        if failed:
            tracking.__exit__(RuntimeError, RuntimeError("training failed"), None)
            return
        tracking.__exit__(None, None, None)
        self.done = tracking
        if self.json_out is not None:
            write_output(self.json_out, json_text(tracking.to_json()))
        if self.report_at_end:
            tracking.report()

    @property
    def result(self) -> RunResult:
        """The measured training run (after it ended)."""
        if self.done is None:
            raise RuntimeError(f"{self.label}: no finished training run was measured yet")
        return self.done.result
