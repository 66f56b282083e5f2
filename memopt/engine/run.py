"""The one dispatcher: a spec's run, real or traced on fake tensors, in this process or on N ranks, training or
inference. Mechanics only: the policy around a run (will it fit here, accuracy drift) is memopt.app.profile's."""

from __future__ import annotations

import contextlib

from memopt.core._torch_private import fake_process_group, fake_tensor_mode
from memopt.core.errors import MemoptError
from memopt.core.results import RunResult
from memopt.engine import ranks
from memopt.engine.inference import measure_inference
from memopt.engine.keras_tf import run_tensorflow
from memopt.engine.step import Progress
from memopt.engine.train import measure_training
from memopt.spec import KerasModelSpec, Spec


def run(spec: Spec, name: str = "baseline", *, timeline: bool = False, stacks: bool = False,
        device_memory: int | None = None, progress: Progress | None = None, grads_to: str | None = None,
        fake: bool = False) -> RunResult:
    """Measure one spec: a warm-up step, then ``train.steps`` tracked steps (or passes). Raises MemoptError.

    ``timeline``: record every event of the step (memopt.core.trace; ``stacks``: with the Python stack of each
    allocation). ``grads_to``: save the warm-up step's gradients there (for gradient cosine between runs).
    ``fake``: trace the very same step under FakeTensorMode (no storage): an estimate, one measured step.
    ``spec.world_size`` > 1: on that many ranks (launched here, or this process is one of torchrun's); under
    fake tensors one rank is traced in a fake process group and stands for all.
    """
    if isinstance(spec.model, KerasModelSpec) and spec.model.backend == "tensorflow":
        return run_tensorflow(spec, name, fake=fake)
    if isinstance(spec.model, KerasModelSpec) and fake:
        raise MemoptError("estimate: a Keras model on the PyTorch backend cannot be traced on fake tensors (Keras "
                          "reads its initial values as it builds); memopt profile measures it, and --backend "
                          "tensorflow estimates from XLA's buffer assignment")
    if spec.world_size > 1 and not ranks.in_process_group():
        if fake:
            with fake_process_group(spec.world_size):
                traced = run(spec, name, timeline=timeline, stacks=stacks, device_memory=device_memory,
                             progress=progress, fake=True)
            traced.world_size = spec.world_size  # every rank alike: one traced stands for all
            return traced
        if ranks.under_launcher():
            return ranks.run_as_rank(spec, name, run, timeline=timeline, stacks=stacks, device_memory=device_memory,
                                     progress=progress)
        return ranks.launch(spec, name, device_memory=device_memory, progress=progress)
    measure = measure_training if spec.run.mode == "train" else measure_inference
    with fake_tensor_mode() if fake else contextlib.nullcontext():
        return measure(spec, name, timeline=timeline, stacks=stacks, device_memory=device_memory, progress=progress,
                       grads_to=None if fake else grads_to, fake=fake)
