"""The one place where memopt touches private PyTorch APIs (tests/test_torch_private.py covers each)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

Hook = Callable[[torch.Tensor], Any]


def current_saved_tensors_hooks() -> tuple[Hook, Hook] | None:
    """The innermost (pack, unpack) pair of saved-tensor hooks now in force, or None."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


@contextlib.contextmanager
def observe_saved_tensors(observer: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Call ``observer(t)`` on every tensor autograd saves, then hand it to the hooks already in force.

    Only the innermost pair of saved-tensor hooks runs, so a plain ``saved_tensors_hooks`` would
    replace, say, checkpoint's recomputation hooks; this wraps them instead.
    """
    inner = current_saved_tensors_hooks()
    if inner is None:
        def pack(t: torch.Tensor) -> Any:
            observer(t)
            return t

        def unpack(x: Any) -> torch.Tensor:
            return x
    else:
        inner_pack, inner_unpack = inner

        def pack(t: torch.Tensor) -> Any:
            observer(t)
            return inner_pack(t)

        unpack = inner_unpack  # type: ignore[assignment]  # the hooks already installed, as they are
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def fake_tensor_mode() -> FakeTensorMode:
    """A mode in which tensors have shapes, dtypes and devices but no storage: tracing without memory."""
    return FakeTensorMode()


def is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, FakeTensor)


def in_fake_mode() -> bool:
    """Whether a FakeTensorMode is active (new tensors are fake)."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode() is not None


class FlopCounter(TorchDispatchMode):
    """FLOPs of the enclosed ops (matmuls, attention, convolutions), real or fake tensors alike.

    Uses torch.utils.flop_counter's per-op formulas but not FlopCounterMode itself: that one tracks
    modules with hooks that keep checkpoint-recomputed tensors alive, which would distort the memory
    being measured at the same time.
    """

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = self.registry.get(func._overloadpacket)
        if count is not None:
            self.total += int(count(*args, **kwargs, out_val=out))
        return out

    def get_total_flops(self) -> int:
        return self.total


def flop_counter() -> FlopCounter:
    return FlopCounter()


def saved_tensors_by_node(output: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(node name, tensor) for every tensor the autograd graph behind ``output`` saved for backward.

    Reads the nodes' ``_saved_*`` attributes (the autograd notes' way to inspect saved tensors);
    a tensor saved by several nodes is yielded once per node.
    """
    stack, visited = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            value = getattr(node, attr)
            for item in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(item, torch.Tensor):
                    yield type(node).__name__, item
        stack.extend(fn for fn, _ in node.next_functions)


def storage_key(x: torch.Tensor | torch.UntypedStorage) -> int:
    """A key that identifies a tensor's storage (shared by its views) while it lives: the storage's
    C pointer (``_cdata``), which views and aliases share and which PyTorch offers no public name for."""
    storage = x.untyped_storage() if isinstance(x, torch.Tensor) else x
    return int(storage._cdata)


def decompose_composite(mode: TorchDispatchMode, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    """Run a CompositeImplicitAutograd op (``aten.matmul``, ``aten.linear``, ...) as its decomposition with ``mode``
    active, so the mode sees the allocations inside it; NotImplemented for any other op.

    With autograd on, such ops are decomposed before they reach a dispatch mode; under ``torch.inference_mode``
    they arrive whole, and the copies inside them (matmul's reshapes) would be invisible. FakeTensorMode
    decomposes them the same way, which keeps real and traced runs alike.
    """
    if getattr(func, "namespace", None) != "aten" or not func.has_kernel_for_dispatch_key(
            torch._C.DispatchKey.CompositeImplicitAutograd):
        return NotImplemented
    with mode:
        return func.decompose(*args, **kwargs)
