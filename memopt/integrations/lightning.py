"""A Lightning callback that measures the ``Trainer``'s optimizer steps with memopt.

    from memopt.integrations.lightning import MemoptCallback
    trainer = pl.Trainer(max_steps=100, callbacks=[MemoptCallback(json_out="mem.json")])

The models that run and the optimizers that step are found as they do (a LightningModule whose training_step
calls an inner model is fine); a step is one optimizer step, the first the warm-up. Per step,
``memopt/step_peak_bytes`` is logged through the LightningModule's ``log``; at the end the tables are printed
(``report=True``) and ``json_out`` written; ``callback.result`` holds the RunResult.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from memopt.core.results import RunResult
from memopt.integrations.session import CallbackSession


class MemoptCallback(pl.Callback):
    def __init__(self, json_out: str | Path | None = None, report: bool = True):
        self.session = CallbackSession("memopt.integrations.lightning", json_out, report)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.session.start(None, pl_module.device.type)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        logs = self.session.step_logs()
        if "memopt/step_peak_bytes" in logs:
            pl_module.log("memopt/step_peak_bytes", float(logs["memopt/step_peak_bytes"]), on_step=True)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.session.stop()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.session.stop(failed=True)

    @property
    def result(self) -> RunResult:
        return self.session.result
