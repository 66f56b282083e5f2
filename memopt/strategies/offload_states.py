"""Model states off the device: optimizer state, gradients and parameters, streamed unit by unit.

The tiers are those of activation offload: a CUDA device's states go to pinned CPU memory, a CPU device's to
files in a temporary folder (removed at the end of the run, and at once when a write fails).

- ``optimizer``: the optimizer state lives off the device. Each parameter steps on its own: on a CPU device its
  state is read into the device, stepped, written back and freed (one parameter's state on the device at a
  time); on CUDA it steps on the CPU where the state lives, on an fp32 master copy, which is then copied to
  the device (ZeRO-Offload). Gradients leave the device as they are produced (summed there over micro-
  batches) unless ``optim_in_bwd`` steps each parameter in backward, when no gradient moves at all.
- ``params``: parameters live off the device too. The model is cut into units (each repeated block, and each
  other module that holds parameters: embedding, norms, head); a unit's parameters are brought in when it
  runs (forward, checkpointed recomputation, or autograd unpacking a saved weight in backward), with the next
  unit in that direction prefetched, and released when a unit further on needs the room: at most
  ``1 + prefetch`` units are on the device. Releasing frees the storage (``resize_(0)``) and keeps the
  tensor, so autograd's saved references and the gradient's shape stay valid (as FSDP1 does).
"""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, cast

import torch
from pydantic import Field
from torch import nn

from memopt.adapters import ModelAdapter
from memopt.core._torch_private import current_saved_tensors_hooks, in_fake_mode, storage_key
from memopt.core.errors import StrategyError
from memopt.core.results import Category
from memopt.strategies import register
from memopt.strategies.base import Options, SavedTensors, StepPlan, Strategy
from memopt.strategies.tiers import DiskTier, FakeTier, HostTier, Tier
from memopt.strategies.vocab_stream import (  # AdamW steps an offloaded parameter CHUNK_ELEMENTS at a time
    CHUNK_ELEMENTS,
    VocabRows,
    auto_rows,
    embedding_forward,
    logits_forward,
    streamed_cross_entropy,
)


class OffloadStatesOptions(Options):
    optimizer: bool = Field(True, description="optimizer state (and gradients) off the device")
    params: bool = Field(False, description="parameters off the device, brought in unit by unit")
    prefetch: int = Field(1, ge=0, le=8, description="units brought in ahead of the one running")
    target: Literal["auto", "cpu", "disk"] = Field("auto", description="auto: cpu on CUDA, disk on CPU")
    folder: str | None = Field(None, description="where the disk tier writes (default: the system's temporary "
                                                 "folder)")
    vocab_rows: int | None = Field(None, ge=0, le=2**24, description=(
        "params: the embedding and the output head are read in chunks of this many vocabulary rows, never whole "
        "(auto: 2^20 elements a chunk); 0 brings each in whole as a unit"))


class _Units:
    """The model's parameters in units, brought onto the device and released as the step moves along them."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], tier: Tier, capacity: int,
                 resized: Callable[[Any], None], streamed: Sequence[nn.Module] = ()):
        self.tier, self.capacity, self.resized = tier, capacity, resized
        in_blocks = {id(m) for block in blocks for m in block.modules()}
        order = {id(m): i for i, m in enumerate(model.modules())}  # registration order: forward order, as a rule
        owners = sorted([*blocks, *(m for m in model.modules() if id(m) not in in_blocks
                                    and any(True for _ in m.parameters(recurse=False)))], key=lambda m: order[id(m)])
        self.streamed = [cast(nn.Parameter, m.weight) for m in streamed]  # read in chunks of rows, never a unit
        seen: set[int] = {id(p) for p in self.streamed}
        self.params: list[list[nn.Parameter]] = []
        self.modules: list[nn.Module] = []
        for owner in owners:
            own = [p for p in owner.parameters() if id(p) not in seen]
            seen.update(id(p) for p in own)
            if own:
                self.params.append(own)
                self.modules.append(owner)
        for p in self.all_params():
            if not p.untyped_storage().resizable():  # e.g. a checkpoint's weights: a storage that can be released
                p.data = p.data.clone()
        self.unit_of = {storage_key(p): i for i, ps in enumerate(self.params) for p in ps}
        self.key_of = {id(p): f"p{i}_{j}" for i, ps in enumerate(self.params) for j, p in enumerate(ps)}
        self.key_of.update({id(p): f"v{i}" for i, p in enumerate(self.streamed)})
        self.nbytes = {id(p): p.untyped_storage().nbytes() for p in self.all_params()}
        self.resident: OrderedDict[int, None] = OrderedDict()  # unit -> None, least recently used first

    def all_params(self) -> Iterator[nn.Parameter]:
        for ps in self.params:
            yield from ps
        yield from self.streamed

    def offload_all(self) -> None:
        """Write every parameter to the tier and free it on the device."""
        for p in self.all_params():
            self.tier.put(self.key_of[id(p)], p.data)
            self._release(p)
        self.resident.clear()

    def _release(self, p: torch.Tensor) -> None:
        p.untyped_storage().resize_(0)
        self.resized(p.untyped_storage())

    def load_param(self, p: torch.Tensor) -> None:
        if p.untyped_storage().nbytes() == 0:
            p.untyped_storage().resize_(self.nbytes[id(p)])
            self.resized(p.untyped_storage())
            self.tier.read_into(self.key_of[id(p)], p.data)

    def store_param(self, p: torch.Tensor) -> None:
        """After an optimizer step: write the parameter back and free it, unless its unit is in use."""
        self.tier.put(self.key_of[id(p)], p.data)
        if self.unit_of[storage_key(p)] not in self.resident:
            self._release(p)

    def use(self, unit: int, backward: bool) -> None:
        """Bring ``unit`` (and the next one in this direction) onto the device, release the least recent."""
        wanted = [unit] + [u for u in range(unit - 1, unit - 1 - self.capacity + 1, -1) if u >= 0] if backward \
            else [unit] + [u for u in range(unit + 1, unit + self.capacity) if u < len(self.params)]
        for old in [u for u in self.resident if u not in wanted]:  # release first: never more than capacity
            del self.resident[old]
            for p in self.params[old]:
                self._release(p)
        for u in reversed(wanted):
            if u not in self.resident:
                for p in self.params[u]:
                    self.load_param(p)
            self.resident[u] = None
            self.resident.move_to_end(u)

    def release_all(self) -> None:
        for u in list(self.resident):
            for p in self.params[u]:
                self._release(p)
        self.resident.clear()


def _first_and_last(starts: range) -> Sequence[int]:
    return starts if len(starts) <= 2 else [starts[0], starts[-1]]


def _in_backward() -> bool:
    return bool(torch._C._current_graph_task_id() != -1)


@register
class OffloadStates(Strategy[OffloadStatesOptions]):
    name = "offload_states"
    Options = OffloadStatesOptions
    summary = ("optimizer state, gradients and (params: true) parameters off the device: CUDA -> pinned CPU, CPU -> "
               "files; parameters streamed unit by unit with prefetch")
    saves = "model states: optimizer state and gradients (and parameters but 1 + prefetch units) leave the device"
    order = 75
    refuses = {"optim8bit": "optim8bit keeps its 8-bit state on the device; offload_states moves AdamW's off it"}
    candidates = ({}, {"params": True})
    modes = ("train", "infer", "generate")
    inference_candidates = ({"params": True},)

    def __init__(self, options: OffloadStatesOptions, spec: Any, device: str, saved: SavedTensors | None = None):
        super().__init__(options, spec, device, saved)
        self.target = options.target if options.target != "auto" else ("cpu" if device == "cuda" else "disk")
        self.units: _Units | None = None
        self.tier: Tier | None = None
        self.step_in_backward = any(s.name == "optim_in_bwd" for s in spec.strategies)
        self._handles: list[Any] = []
        self.vocab_rows: list[VocabRows] = []

    def check(self) -> None:
        opts = self.options
        if self.spec.run.mode != "train" and not opts.params:
            raise StrategyError(f"offload_states.params: run.mode {self.spec.run.mode} has no optimizer state or "
                                "gradients; only the weights can move (params: true)")
        if not opts.optimizer and not opts.params:
            raise StrategyError("offload_states: set optimizer and/or params to true, otherwise nothing moves")
        if self.device == "cpu" and self.target == "cpu":
            raise StrategyError("offload_states.target: cpu on a CPU device moves nothing; use target: disk")
        if opts.optimizer and self.spec.train.optimizer == "none" and self.spec.run.mode == "train":
            raise StrategyError("offload_states.optimizer: train.optimizer is none, so there is no state to move")

    def _make_tier(self) -> Tier:
        if in_fake_mode():
            return FakeTier()
        if self.target == "disk":
            return DiskTier("offload_states", "memopt-states-", self.options.folder)
        return HostTier()

    def apply(self, model: ModelAdapter) -> None:
        self.tier = self._make_tier()
        if not self.options.params:
            return
        blocks = [getattr(b, "inner", b) for b in model.blocks()]
        streamed = self._streamed_modules(model)
        self.units = _Units(model.model, blocks, self.tier, 1 + self.options.prefetch, self.saved.resized,
                            streamed)
        for i, module in enumerate(self.units.modules):
            self._handles.append(module.register_forward_pre_hook(self._runs(i)))
        head = model.head()
        loss_head = getattr(model.model, "loss_head", None)
        if head is not None and isinstance(loss_head, nn.Module):  # a chunked loss reads the head's weight itself
            unit = self.units.unit_of.get(storage_key(head[1].weight))
            if unit is not None:
                self._handles.append(loss_head.register_forward_pre_hook(self._runs(unit)))
        self._stream(streamed, loss_head)
        self.units.offload_all()

    def _streamed_modules(self, model: ModelAdapter) -> list[nn.Embedding | nn.Linear]:
        """The embedding and the head to read in chunks of vocabulary rows, where the step allows it: training
        with AdamW state off the device, weights not tied, a plain nn.Embedding, a head without bias whose loss
        is chunked_ce's."""
        opts, train = self.options, self.spec.train
        if opts.vocab_rows == 0 or self.spec.run.mode != "train" or not opts.optimizer or train.optimizer != "adamw" \
                or model.tied_embeddings():
            return []
        found: list[nn.Embedding | nn.Linear] = []
        embedding = model.embedding()
        if embedding is not None and type(embedding[1]) is nn.Embedding and embedding[1].max_norm is None \
                and not embedding[1].sparse and not embedding[1].scale_grad_by_freq:
            found.append(embedding[1])
        head = model.head()
        if head is not None and type(head[1]) is nn.Linear and head[1].bias is None \
                and hasattr(getattr(model.model, "loss_head", None), "streamed_loss"):
            found.append(head[1])
        return found

    def _stream(self, streamed: list[nn.Embedding | nn.Linear], loss_head: Any) -> None:
        assert self.units is not None and self.tier is not None
        for module in streamed:
            weight = cast(nn.Parameter, module.weight)
            rows = VocabRows(weight, self.units.key_of[id(weight)], self.tier,
                             self.options.vocab_rows or auto_rows(weight.shape[1]), self.saved)
            self.vocab_rows.append(rows)
            # the instance's own forward, in its __dict__ (nn.Module keeps plain callables there)
            if isinstance(module, nn.Embedding):
                module.__dict__["forward"] = embedding_forward(module, rows)
            else:
                module.__dict__["forward"] = logits_forward(rows)
                loss_head.streamed_loss = functools.partial(streamed_cross_entropy, rows)

    def _runs(self, unit: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any) -> None:
            assert self.units is not None
            self.units.use(unit, backward=_in_backward())
        return hook

    def attach_optimizer(self, model: ModelAdapter, make_optimizer: Callable[..., Any]) -> Any | None:
        params = [p for p in model.model.parameters() if p.requires_grad]
        if not self.options.optimizer and not self.options.params:
            return None
        train = self.spec.train
        assert self.tier is not None
        optimizer = OffloadedOptimizer(params, lambda ps: make_optimizer(train.optimizer, ps, train.lr), self.tier,
                                       self.units, self.options.optimizer, self.step_in_backward, self.saved,
                                       self.device)
        for rows in self.vocab_rows:
            rows.gradients = optimizer
            optimizer.chunk_elements[id(rows.param)] = rows.rows * rows.d_model  # step it in its chunks of rows
        return optimizer

    def configure(self, plan: StepPlan) -> None:
        if self.units is not None:
            plan.contexts.append(self.context)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Parameters autograd saves for backward are brought back (with their unit) when it unpacks them."""
        units = self.units
        assert units is not None
        outer = current_saved_tensors_hooks()

        def pack(t: torch.Tensor) -> Any:
            unit = units.unit_of.get(storage_key(t))
            if unit is not None:
                return ("param", unit, t)
            return ("outer", outer[0](t) if outer is not None else t)

        def unpack(packed: Any) -> torch.Tensor:
            if packed[0] == "param":
                units.use(packed[1], backward=True)
                return packed[2]
            return outer[1](packed[1]) if outer is not None else packed[1]

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def close(self) -> None:
        if self.tier is not None:
            self.tier.close()

    def report(self) -> dict[str, Any]:
        tier = self.tier
        if tier is None:
            return {}
        facts = {"target": self.target, "moved_off_device_bytes": tier.written, "moved_to_device_bytes": tier.read}
        if self.units is not None:
            facts["units"] = len(self.units.params)
        if self.vocab_rows:
            facts["vocab_rows_per_chunk"] = self.vocab_rows[0].rows
        return facts


class OffloadedOptimizer:
    """One optimizer per parameter, its state kept in the tier between steps; gradients go there as produced."""

    def __init__(self, params: list[nn.Parameter], make: Callable[[list[Any]], Any], tier: Tier,
                 units: _Units | None, offload_state: bool, in_backward: bool, saved: SavedTensors, device: str):
        self.tier, self.units, self.offload_state, self.in_backward = tier, units, offload_state, in_backward
        self.saved = saved
        self.on_host = device == "cuda" and isinstance(tier, HostTier)
        # tracing a CUDA estimate: the optimizer steps on the host, which the trace (on the CPU) must not count
        self.host_step_traced = device == "cuda" and isinstance(tier, FakeTier) and offload_state
        self.params = params
        self.masters: dict[int, torch.Tensor] = {}  # on CUDA: the fp32 copy each parameter steps on, on the CPU
        if self.on_host:
            assert isinstance(tier, HostTier)
            host = tier.host
            for p in params:  # an offloaded parameter's home in pinned memory is its master
                self.masters[id(p)] = host[units.key_of[id(p)]] if units is not None else \
                    p.detach().to("cpu", copy=True).pin_memory()
        self.optimizers = {id(p): make([self._stepped(p)]) for p in params}
        self.grad_keys = {id(p): f"g{i}" for i, p in enumerate(params)}
        self.has_grad: set[int] = set()
        self.steps: dict[int, int] = {}  # AdamW steps taken per parameter (chunked path)
        self.streamed = {id(p) for p in units.streamed} if units is not None else set()  # read in rows of vocab
        self.chunk_elements: dict[int, int] = {}  # per parameter, where not CHUNK_ELEMENTS
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params
                         if id(p) not in self.streamed]  # theirs arrive in chunks, not through autograd

    def _stepped(self, p: torch.Tensor) -> torch.Tensor:
        return self.masters[id(p)] if self.on_host else p

    @property
    def state(self) -> dict[Any, Any]:
        """The state on the device now (none between steps when it is offloaded)."""
        merged: dict[Any, Any] = {}
        if not self.offload_state:
            for opt in self.optimizers.values():
                merged.update(opt.state)
        return merged

    def _on_grad(self, p: torch.Tensor) -> None:
        assert p.grad is not None
        if self.in_backward:
            self._step_one(p, p.grad)
            p.grad = None
            return
        if not self.offload_state and self.units is None:
            return
        key = self.grad_keys[id(p)]
        if id(p) in self.has_grad:  # another micro-batch: sum with what the tier holds
            earlier = torch.empty_like(p.grad)
            self.tier.read_into(key, earlier)
            p.grad.add_(earlier)
            del earlier
        self.tier.put(key, p.grad)
        self.has_grad.add(id(p))
        p.grad = None

    def add_streamed_grad(self, p: nn.Parameter, start_row: int, grad: torch.Tensor) -> None:
        """Rows of a streamed matrix's gradient, from ``start_row``: into the tier, summed with what an earlier
        micro-batch left there."""
        key, offset = self.grad_keys[id(p)], start_row * grad.shape[1] * grad.element_size()
        if id(p) in self.has_grad:
            earlier = torch.empty_like(grad)
            self.saved.mark(earlier, Category.GRADS)
            self.tier.read_into(key, earlier, offset)
            grad.add_(earlier)
            del earlier
        self.tier.reserve(key, p.shape, p.dtype)
        self.tier.write_at(key, grad, offset)

    def streamed_grad_done(self, p: nn.Parameter) -> None:
        """A streamed matrix's gradient is complete for this micro-batch (with optim_in_bwd: step it now)."""
        self.has_grad.add(id(p))
        if self.in_backward:
            self._step_streamed(p)

    def _step_streamed(self, p: nn.Parameter) -> None:
        self.has_grad.discard(id(p))
        opt = self.optimizers[id(p)]
        if self.host_step_traced:
            return
        if self.on_host:  # the master and the gradient are both in pinned memory: step there
            assert isinstance(self.tier, HostTier)
            master = self.masters[id(p)]
            master.grad = self.tier.host[self.grad_keys[id(p)]]
            opt.step()
            master.grad = None
            return
        self._adamw_in_chunks(p, None, opt)

    def step(self) -> None:
        if self.units is not None:
            self.units.release_all()  # step one parameter at a time, each brought in alone (none left after it)
        if self.in_backward:
            return
        for p in self.params:
            if id(p) in self.streamed:
                if id(p) in self.has_grad:
                    self._step_streamed(p)
                continue
            grad = p.grad
            if id(p) in self.has_grad:
                grad = torch.empty(p.shape, dtype=p.dtype, device=p.device)
                self.saved.mark(grad, Category.GRADS)
                self.tier.read_into(self.grad_keys[id(p)], grad)
                self.has_grad.discard(id(p))
            if grad is not None:
                self._step_one(p, grad)
            del grad
            p.grad = None

    def _state_keys(self, p: torch.Tensor) -> str:
        return f"s{self.grad_keys[id(p)][1:]}"

    def _step_one(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        opt = self.optimizers[id(p)]
        if self.host_step_traced:
            return  # the step is the host's: on the device only the gradient came and went
        if self.offload_state and not self.on_host and type(opt) is torch.optim.AdamW:
            if self.units is not None:
                self.units.load_param(p)
            self._adamw_in_chunks(p, grad, opt)
            if self.units is not None:
                self.units.store_param(p)
            return
        target = self._stepped(p)
        if self.units is not None:
            self.units.load_param(p)
        prefix = self._state_keys(p)
        if self.offload_state and not self.on_host:
            self._load_state(opt, target, prefix)
        target.grad = grad.to(target.device, dtype=target.dtype) if self.on_host else grad
        opt.step()
        target.grad = None
        if self.on_host and p.untyped_storage().nbytes() > 0:  # a copy on the device: refresh it
            p.data.copy_(target)
        if self.offload_state and not self.on_host:
            self._store_state(opt, target, prefix)
        if self.units is not None and not self.on_host:  # on CUDA the master is the parameter's home already
            self.units.store_param(p)

    @torch.no_grad()
    def _adamw_in_chunks(self, p: torch.Tensor, grad: torch.Tensor | None, opt: Any) -> None:
        """torch's single-tensor AdamW step, CHUNK_ELEMENTS of the parameter at a time: only one chunk of its two
        moments is ever on the device (read from the tier, updated, written back). ``grad`` None: a streamed
        matrix, whose parameter and gradient are read from the tier a chunk at a time too."""
        group = opt.param_groups[0]
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        steps = self.steps.get(id(p), 0) + 1
        self.steps[id(p)] = steps
        prefix = self._state_keys(p)
        size, numel = p.element_size(), p.numel()
        bias1, bias2_sqrt = 1 - beta1 ** steps, (1 - beta2 ** steps) ** 0.5
        streamed, step = grad is None, self.chunk_elements.get(id(p), CHUNK_ELEMENTS)
        starts = range(0, numel, step)
        traced = _first_and_last(starts) if in_fake_mode() else starts
        skipped = (len(starts) - len(traced)) * step * size  # bytes of each tensor in the middle chunks
        # an estimate traces the first and the last chunk: the middle ones repeat the first exactly
        self.tier.read += skipped * ((2 if steps > 1 else 0) + (2 if streamed else 0))
        self.tier.written += skipped * (2 + (1 if streamed else 0))
        param_key = self.units.key_of[id(p)] if self.units is not None else ""  # a streamed matrix's home
        for start in traced:
            n = min(step, numel - start)
            if grad is None:
                chunk = self._read_chunk(param_key, n, p, start, Category.PARAMS)
                g = self._read_chunk(self.grad_keys[id(p)], n, p, start, Category.GRADS)
            else:
                chunk, g = p.data.view(-1)[start:start + n], grad.reshape(-1)[start:start + n]
            moments = []
            for name in ("exp_avg", "exp_avg_sq"):
                value = torch.zeros_like(chunk) if steps == 1 else torch.empty_like(chunk)
                self.saved.mark(value, Category.OPTIMIZER)
                if steps > 1:
                    self.tier.read_into(f"{prefix}_{name}", value, start * size)
                moments.append(value)
            exp_avg, exp_avg_sq = moments
            chunk.mul_(1 - lr * decay)
            exp_avg.lerp_(g, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
            chunk.addcdiv_(exp_avg, denom, value=-lr / bias1)
            del denom
            self.tier.write_at(f"{prefix}_exp_avg", exp_avg, start * size)
            self.tier.write_at(f"{prefix}_exp_avg_sq", exp_avg_sq, start * size)
            if grad is None:
                self.tier.write_at(param_key, chunk, start * size)
            del exp_avg, exp_avg_sq, moments, chunk, g

    def _read_chunk(self, key: str, n: int, like: torch.Tensor, start: int, category: Category) -> torch.Tensor:
        chunk = torch.empty(n, dtype=like.dtype, device=like.device)
        self.saved.mark(chunk, category)
        self.tier.read_into(key, chunk, start * chunk.element_size())
        return chunk

    def _load_state(self, opt: Any, target: torch.Tensor, prefix: str) -> None:
        names = getattr(opt, "_memopt_state_layout", None)
        if names is None:
            return  # the first step creates it
        state: dict[str, Any] = {}
        for name, kept in names.items():
            if not isinstance(kept, tuple):
                state[name] = kept  # a plain value, kept as it was
                continue
            value = torch.empty(kept[0], dtype=kept[1], device=target.device)
            self.saved.mark(value, Category.OPTIMIZER)
            self.tier.read_into(f"{prefix}_{name}", value)
            state[name] = value
        opt.state[target] = state

    def _store_state(self, opt: Any, target: torch.Tensor, prefix: str) -> None:
        state = opt.state.pop(target, {})
        layout = {}
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                self.tier.put(f"{prefix}_{name}", value)
                layout[name] = (value.shape, value.dtype)
            else:
                layout[name] = value
        opt._memopt_state_layout = layout
        state.clear()

    def gradients(self) -> list[torch.Tensor | None]:
        """The gradients of this step, read back from the tier (for tests and checks; None where there is none)."""
        out: list[torch.Tensor | None] = []
        for p in self.params:
            grad = p.grad
            if id(p) in self.has_grad:
                grad = torch.empty(p.shape, dtype=p.dtype, device=p.device)
                self.tier.read_into(self.grad_keys[id(p)], grad)
            out.append(grad)
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
