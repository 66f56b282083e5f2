"""A Hugging Face ``TrainerCallback`` that measures the Trainer's steps with memopt.

    from memopt.integrations.transformers import MemoptCallback
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[MemoptCallback(json_out="mem.json")])
    trainer.train()     # each logging step gains memopt/step_peak_bytes and memopt/<category>_bytes

The optimizer is found at its first step (the Trainer creates it lazily); a step is one optimizer step (so
``gradient_accumulation_steps`` micro-batches), the first is the warm-up; ``gradient_checkpointing`` and
``bf16=True`` need nothing. At the end the tables are printed (``report=True``) and ``json_out`` is written;
``callback.result`` holds the RunResult.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from memopt.core.results import RunResult
from memopt.integrations.session import CallbackSession


class MemoptCallback(TrainerCallback):
    def __init__(self, json_out: str | Path | None = None, report: bool = True):
        self.session = CallbackSession("memopt.integrations.transformers", json_out, report)
        self._logs: dict[str, int] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        device = next(model.parameters()).device.type if model is not None else None
        self.session.start(model, device)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._logs = self.session.step_logs()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is not None:  # what the callbacks after this one report (TensorBoard, W&B, ...)
            logs.update(self._logs)
        if state.log_history:  # the Trainer copied the logs into its history before calling the callbacks
            state.log_history[-1].update(self._logs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.session.stop()

    @property
    def result(self) -> RunResult:
        return self.session.result
