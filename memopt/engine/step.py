"""The training step's mechanics: a Session (model built, strategies applied, optimizer), its batches, and one
step (forward, backward, optimizer) as the strategies' plan says. Measuring a run is memopt.engine.train."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memopt.adapters import ModelAdapter
from memopt.adapters.build import build_adapter, user_batch, vocab_size
from memopt.core._torch_private import in_fake_mode, is_fake
from memopt.core.errors import MemoptError
from memopt.core.results import RunResult
from memopt.engine.data import text_batch
from memopt.engine.devices import resolve_device
from memopt.engine.ranks import rank
from memopt.measure.tracker import ModelWatch, TensorTracker
from memopt.model.kv_plan import KvPlan
from memopt.spec import KerasModelSpec, PythonModelSpec, Spec
from memopt.strategies import StepPlan, Strategy, build_strategies
from memopt.strategies.base import SavedTensors

Progress = Callable[[str], None]
TRACED_MICRO_BATCHES = 2  # under fake tensors: the first micro-batch (no grads yet) and a steady-state one


@dataclass
class Session:
    """A built, strategy-applied model ready to step; what ``run`` measures and tests inspect."""

    spec: Spec
    device: str          # where tensors live (the CPU when tracing fake tensors for a CUDA estimate)
    target_device: str   # the device the run stands for
    adapter: ModelAdapter
    optimizer: Any | None
    plan: StepPlan
    strategies: list[Strategy[Any]]
    saved: SavedTensors  # where strategies report tensors they keep for backward; the tracker while measuring

    @property
    def model(self) -> nn.Module:
        return self.adapter.model


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> Any | None:
    """The spec's optimizer over the trainable parameters (None for ``none`` or nothing to train)."""
    if name == "none" or not params:
        return None
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr)


def prepare(spec: Spec, fake: bool = False) -> Session:
    """Build the model, apply the strategies in order and build the optimizer; nothing is stepped.

    ``fake``: called under FakeTensorMode; tensors are traced on the CPU whatever device they stand for
    (this PyTorch build may have no CUDA), strategies are still checked against the target device.
    """
    target = resolve_device(spec.run.device, estimate=fake)
    device = "cpu" if fake else target
    saved = SavedTensors()
    strategies = build_strategies(spec, target, saved)
    torch.manual_seed(spec.run.seed)
    adapter = build_adapter(spec, device)
    for strategy in strategies:
        strategy.apply(adapter)
    optimizer = None
    if spec.run.mode == "train":
        trainable = [p for p in adapter.model.parameters() if p.requires_grad]
        if not trainable:
            what = "has no trainable parameters" + (" (the strategies froze them all)" if strategies else "")
            if next(adapter.model.parameters(), None) is None:
                what = "has no parameters"
            raise MemoptError(f"model: {spec.model.title()} {what}: a training step has nothing to update "
                              "(--mode infer measures a forward pass)")
        optimizer = adapter.own_optimizer()  # a compiled Keras model's
        for strategy in strategies:
            optimizer = strategy.attach_optimizer(adapter, make_optimizer) or optimizer
        if optimizer is None and not isinstance(spec.model, KerasModelSpec):
            optimizer = make_optimizer(spec.train.optimizer, trainable, spec.train.lr)
    else:
        adapter.model.eval()  # inference: dropout off
    plan = StepPlan(kv=KvPlan(spec.generate.cache))
    for strategy in strategies:
        strategy.configure(plan)
    return Session(spec, device, target, adapter, optimizer, plan, strategies, saved)


def make_batch(spec: Spec, device: str, step: int = 0) -> Any:
    """Seeded random token ids: inputs and next-token targets, (batch, seq) each; or, for a model with its own
    ``model.batch``, what that function returns for (batch_size, seq_len, device) under the same seed."""
    seed = spec.run.seed * 1_000_003 + step
    if isinstance(spec.model, PythonModelSpec) and spec.model.batch is not None:
        return user_batch(spec.model.batch, spec.train.batch_size, spec.train.seq_len, device, seed)
    if isinstance(spec.model, KerasModelSpec):  # (x, y) as the model's fit takes them
        from memopt.adapters.keras import keras_batch

        vocab = None if spec.model.batch is not None else vocab_size(spec.model)
        return tuple(torch.as_tensor(part, device=device) for part in keras_batch(spec.model, spec, vocab, step))
    if spec.train.data is not None and not in_fake_mode():  # an estimate needs the shapes only
        return text_batch(spec, device, step)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_size(spec.model), (spec.train.batch_size, spec.train.seq_len + 1), generator=gen)
    ids = ids.to(device)
    return ids[:, :-1], ids[:, 1:]


def rank_shard(spec: Spec, batch: Any) -> Any:
    """This rank's rows of the global batch (all of it in a single process)."""
    if spec.batch_shards == 1:
        return batch
    return split_batch(batch, spec.batch_shards)[rank() // (spec.world_size // spec.batch_shards)]


def split_batch(batch: Any, k: int) -> list[Any]:
    """``k`` micro-batches: every tensor of the batch (a tensor, tuple, list or dict) chunked along dim 0."""
    if k == 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        parts = batch.chunk(k)
        if len(parts) != k:
            raise MemoptError(f"accum: a batch tensor of {batch.shape[0]} rows does not split into {k} micro-batches")
        return list(parts)
    if isinstance(batch, dict):
        split = {key: split_batch(value, k) for key, value in batch.items()}
        return [{key: parts[i] for key, parts in split.items()} for i in range(k)]
    if isinstance(batch, (tuple, list)):
        columns = [split_batch(item, k) for item in batch]
        return [type(batch)(column[i] for column in columns) if isinstance(batch, tuple) else
                [column[i] for column in columns] for i in range(k)]
    return [batch] * k


def phase(tracker: TensorTracker | None, name: str) -> contextlib.AbstractContextManager[None]:
    return tracker.in_phase(name) if tracker is not None else contextlib.nullcontext()


def forward_backward(session: Session, batch: Any, tracker: TensorTracker | None = None) -> float:
    """Forward and backward over the plan's micro-batches, inside the strategies' contexts; mean loss."""
    k = session.plan.micro_batches
    micro = split_batch(batch, k)
    if in_fake_mode():
        micro = micro[:TRACED_MICRO_BATCHES]  # micro-batches 3..k repeat the 2nd exactly: same shapes, same grads
    losses = []
    for piece in micro:
        with contextlib.ExitStack() as stack:
            if tracker is not None:
                stack.enter_context(tracker.saved_tensors())  # outermost: strategies' hooks take precedence
                stack.enter_context(reporting_to(session.saved, tracker))
            for make_context in session.plan.contexts:
                stack.enter_context(make_context())
            with phase(tracker, "forward"):
                loss = session.adapter.loss(piece)
                scaled = loss / k if k > 1 else loss
            with phase(tracker, "backward"):
                scaled.backward()
        losses.append(float("nan") if is_fake(loss) else loss.detach().float().item())
        del loss, scaled
    return sum(losses) / len(losses)


@contextlib.contextmanager
def reporting_to(saved: SavedTensors, tracker: TensorTracker) -> Iterator[None]:
    saved.observer, saved.tracker = tracker.saved, tracker
    try:
        yield
    finally:
        saved.observer = saved.tracker = None


def train_step(session: Session, tracker: TensorTracker | None = None, watch: ModelWatch | None = None,
               step: int = 0, before_step: Callable[[Session], None] | None = None) -> float:
    """One training step (forward, backward, optimizer) as the plan says; returns the mean loss.

    ``before_step`` sees the session between backward and the optimizer step (gradients complete).
    """
    optimizer = session.optimizer
    with phase(tracker, "forward"):
        batch = rank_shard(session.spec, make_batch(session.spec, session.device, step))
    loss = forward_backward(session, batch, tracker)
    if before_step is not None:
        before_step(session)
    with phase(tracker, "optimizer"), reporting_to(session.saved, tracker) if tracker else contextlib.nullcontext():
        if optimizer is not None:  # one that stepped in backward (optim_in_bwd) only tidies up here
            optimizer.step()
        if watch is not None:
            watch.rescan_optimizer()
        if tracker is not None:
            tracker.record_state()
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        else:
            session.model.zero_grad(set_to_none=True)
    return loss


def create_optimizer_state(session: Session) -> None:
    """Step the optimizer once on zero gradients: its lazily created state then exists, as after a warm-up.

    Used under fake tensors, where the zeros cost nothing and a traced warm-up step would double the time
    (tests hold estimates made this way equal to real profiles, for every strategy).
    """
    optimizer = session.optimizer
    if optimizer is None:
        return
    params = [p for p in session.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    for opt in getattr(optimizer, "optimizers", {}).values() or [optimizer]:
        opt.step()
    for p in params:
        p.grad = None


def add_strategy_facts(session: Session, result: RunResult) -> None:
    """What each strategy reports of its run (bytes it moved, kernels it used), and the step plan's notes."""
    for strategy in session.strategies:
        facts = strategy.report()
        if facts:
            result.strategy_facts[strategy.name] = facts
            if "mesh" in facts:  # the layout of a run on ranks, by dimension
                result.mesh = {**(result.mesh or {}), **facts["mesh"]}
    result.notes.extend(session.plan.notes)


def save_gradients(path: str) -> Callable[[Session], None]:
    """A ``before_step`` that writes the trainable parameters' gradients (float32, CPU) to ``path``."""
    def save(session: Session) -> None:
        grads = [p.grad.detach().float().cpu() if p.grad is not None else None
                 for p in session.model.parameters() if p.requires_grad]
        torch.save(grads, path)
    return save


