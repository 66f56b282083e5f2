"""A Keras model on TensorFlow, measured in a process of its own (``python -m memopt.engine.keras_tf``): the
allocator must be told to report every allocation before TensorFlow is imported, and Keras keeps one backend per
process.

Profile: a warm-up step (the optimizer's slots are made), ``train.steps`` timed steps, then two steps under the
profiler, whose allocator events are replayed (memopt.measure.tensorflow): peak tensor bytes, by category and op,
with the allocator's own peak (its chunks) beside it. TensorFlow runs one op at a time here (inter-op parallelism
1): in one process every step allocates in the same order. In graph mode the order of independent ops (AdamW's
weight decay, say) differs from one process to the next, and the peak with it, by up to 2%; a ``jit_compile``
step is one XLA program, the same to the byte in every run.

Estimate: the step compiled by XLA (``jit_compile``), whose buffer assignment says what it needs before it runs;
the compile happens at the first step's call, so that one step does run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from memopt.adapters.keras import INSTALL
from memopt.core.errors import MemoptError
from memopt.core.processes import child_env, die_with_parent, exit_reason, last_reply, user_output_to_stderr
from memopt.core.results import RunResult, StepMemory
from memopt.spec import KerasModelSpec, Spec, spec_from_data

CHILD_ENV = {"TF_CPU_ALLOCATOR_USE_BFC": "true", "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
TIMEOUT_S = 3600


def run_tensorflow(spec: Spec, name: str, *, fake: bool = False) -> RunResult:
    """The run, measured in a child process; MemoptError with the child's reason when it fails."""
    if spec.run.mode != "train":
        raise MemoptError(f"run.mode: {spec.run.mode}: memopt measures a Keras model's training step on TensorFlow "
                          "(--backend torch measures a forward pass)")
    if spec.run.device == "cuda":
        raise MemoptError("run.device: cuda: memopt measures TensorFlow's CPU allocator (tensorflow-cpu); "
                          "--backend torch runs a Keras model on CUDA")
    with tempfile.TemporaryDirectory(prefix="memopt-xla-") as dump:
        env = child_env(**CHILD_ENV)
        if fake:
            env["XLA_FLAGS"] = f"--xla_dump_to={dump} --xla_dump_hlo_as_text"
        request = json.dumps({"spec": spec.to_dict(), "name": name, "fake": fake, "dump": dump})
        try:
            proc = subprocess.run([sys.executable, "-m", "memopt.engine.keras_tf"], input=request,
                                  capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise MemoptError(f"{name}: the TensorFlow step did not finish in {TIMEOUT_S} s") from None
    reply = last_reply(proc.stdout)
    if reply is None:
        raise MemoptError(f"{name}: the TensorFlow process {exit_reason(proc.returncode, proc.stderr)}")
    if "error" in reply:
        raise MemoptError(reply["error"])
    return RunResult.from_json(reply["run"], device=reply["device"])


def measure(spec: Spec, name: str, fake: bool, dump: Path) -> RunResult:
    """In the child: build, warm up, time, then profile two steps (or, ``fake``, read XLA's buffer assignment)."""
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise MemoptError(f"model.backend: tensorflow, but TensorFlow is not installed ({exc.name or exc} missing): "
                          f"{INSTALL}") from None

    from memopt.adapters.keras import build_keras, keras_batch, keras_vocab_size, variable_bytes

    tf.config.threading.set_inter_op_parallelism_threads(1)  # one op at a time: one order in a process
    assert isinstance(spec.model, KerasModelSpec)
    model = build_keras(spec.model, spec)
    if fake:
        model.jit_compile = True
    vocab = keras_vocab_size(spec.model, model)
    # tensors once, here: a step converting NumPy arrays would allocate them again, freed whenever Python lets go
    batch = tuple(tf.convert_to_tensor(part) for part in keras_batch(spec.model, spec, vocab, 0))
    start = time.perf_counter()
    loss = _step(model, batch)  # warm-up: the optimizer's slots exist from here on (with jit_compile: XLA compiles)
    warm_up_s = time.perf_counter() - start
    trainable = sum(int(tf.size(v)) for v in model.trainable_variables)
    total = sum(int(tf.size(v)) for v in model.weights)
    result = RunResult(name=name, strategies=[], device="cpu", estimated=fake, params_total=total,
                       params_trainable=trainable)
    optimizer = model.optimizer
    states = {"params": variable_bytes(model.weights), "buffers": 0,
              "grads": _gradient_bytes(model, batch), "optimizer": variable_bytes(optimizer.variables)
              if optimizer is not None else 0}
    if fake:
        result.step_time_s, result.loss = warm_up_s, loss
        return _from_buffer_assignment(result, states, dump)
    for _ in range(spec.train.steps):
        start = time.perf_counter()
        loss = _step(model, batch)
        result.step_times_s.append(time.perf_counter() - start)
    result.step_time_s = statistics.median(result.step_times_s)
    result.loss = loss
    result.memory, result.tensorflow = _profiled_step(model, batch, states, dump)
    result.notes.append("TensorFlow's allocator events; categories by op names and shapes" + (
        "" if model.jit_compile else "; graph mode: up to 2% from run to run (README)"))
    return result


def _step(model: Any, batch: tuple[Any, Any]) -> float:
    logs = model.train_on_batch(batch[0], batch[1], return_dict=True)
    return float(logs.get("loss", float("nan")))


def _gradient_bytes(model: Any, batch: tuple[Any, Any]) -> int:
    """Bytes of one step's gradients as TensorFlow makes them: dense ones the size of their weight, an embedding's
    sparse one (``IndexedSlices``) its looked-up rows and their indices."""
    import tensorflow as tf

    if model.optimizer is None:
        return 0
    x, y = batch
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = model.compute_loss(x=x, y=tf.convert_to_tensor(y), y_pred=y_pred)
    grads = tape.gradient(loss, model.trainable_variables)
    total = 0
    for g in grads:
        if g is None:
            continue
        parts = [g.values, g.indices] if isinstance(g, tf.IndexedSlices) else [g]
        total += sum(int(tf.size(p)) * p.dtype.size for p in parts)
    return total


PROFILED_STEPS = 2  # each under the profiler on its own; the run reports the higher


def _profiled_step(model: Any, batch: tuple[Any, Any], states: dict[str, int],
                   dump: Path) -> tuple[StepMemory, dict[str, Any]]:
    """Steps under the profiler, their allocator events replayed; the higher step's memory, and TensorFlow's own
    figures (its allocator's peak; every profiled step's peak)."""
    import tensorflow as tf

    from memopt.measure.tensorflow import read_allocator_events, replay

    shapes = {"[" + ",".join(str(d) for d in v.shape) + "]" for v in model.trainable_variables}
    scope = model.optimizer.name if model.optimizer is not None else ""
    replayed, allocator_peak = [], 0
    for i in range(PROFILED_STEPS):
        logdir = dump / f"profile{i}"
        tf.config.experimental.reset_memory_stats("CPU:0")
        tf.profiler.experimental.start(str(logdir))
        try:
            _step(model, batch)
        finally:
            tf.profiler.experimental.stop()
        allocator_peak = max(allocator_peak, int(tf.config.experimental.get_memory_info("CPU:0")["peak"]))
        planes = sorted(logdir.rglob("*.xplane.pb"))
        events = read_allocator_events(planes[-1]) if planes else []
        if not events:
            raise MemoptError("TensorFlow's profiler recorded no allocation: its memory events cannot be read")
        replayed.append(replay(events, {"params": states["params"], "optimizer": states["optimizer"]}, scope,
                               shapes))
    top = max(replayed, key=lambda r: r.peak_bytes)
    memory = StepMemory(peak_bytes=top.peak_bytes, peak_breakdown=top.peak_breakdown,
                        category_peak_bytes=top.category_peak_bytes, phase_peak_bytes=top.phase_peak_bytes,
                        state_bytes=states, peak_phase=top.peak_phase, peak_module=top.peak_op or None)
    facts = {"allocator_peak_bytes": allocator_peak, "step_peaks_bytes": [r.peak_bytes for r in replayed],
             "events": top.events, "jit_compile": bool(model.jit_compile)}
    return memory, facts


def _from_buffer_assignment(result: RunResult, states: dict[str, int], dump: Path) -> RunResult:
    from memopt.measure.tensorflow import read_buffer_assignment

    try:
        assignment = read_buffer_assignment(dump)
    except ValueError as exc:
        raise MemoptError(f"estimate: {exc} (XLA compiles the step with jit_compile)") from None
    weights_and_slots = states["params"] + states["optimizer"]
    # XLA's temp buffer holds gradients, activations and temporaries alike: one figure, under temporaries
    breakdown = {"params": states["params"], "buffers": 0, "grads": 0, "optimizer": states["optimizer"],
                 "activations": 0, "temporaries": assignment.total_bytes - weights_and_slots}
    result.memory = StepMemory(peak_bytes=assignment.total_bytes, peak_breakdown=breakdown,
                               category_peak_bytes=breakdown, phase_peak_bytes={"step": assignment.total_bytes},
                               state_bytes=states,
                               peak_phase="step", peak_module=None)
    result.tensorflow = {"xla_buffer_assignment": assignment.to_json()}
    result.notes.append("XLA's buffer assignment of the jit-compiled step")
    return result


def main() -> None:
    """The child: read the request, measure, print the run (or the error) as JSON."""
    die_with_parent()
    with user_output_to_stderr():
        request = json.loads(sys.stdin.read())
        reply: dict[str, Any]
        try:
            spec = spec_from_data(request["spec"])
            result = measure(spec, request["name"], request["fake"], Path(request["dump"]))
            reply = {"device": result.device, "run": result.to_json()}
        except MemoptError as exc:
            reply = {"error": str(exc)}
        except MemoryError:
            reply = {"error": f"{request.get('name', 'run')}: out of memory (MemoryError)"}
        except Exception as exc:  # TensorFlow's own (ResourceExhaustedError, InvalidArgumentError, ...)
            first = (str(exc).strip().splitlines() or [""])[0]
            reply = {"error": f"model.keras: the TensorFlow step raised {type(exc).__name__}: {first}"}
    print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
