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
    """Run an op that exists only as a CompositeImplicitAutograd decomposition (``aten.matmul``, ``aten.linear``,
    ...) as that decomposition with ``mode`` active, so the mode sees the allocations inside it; NotImplemented for
    any other op.

    With autograd on, such ops are decomposed before they reach a dispatch mode; under ``torch.inference_mode``
    they arrive whole, and the copies inside them (matmul's reshapes) would be invisible. FakeTensorMode
    decomposes them the same way, which keeps real and traced runs alike. An op that also has a kernel of its own
    for the tensors' device (``silu_backward`` has a CPU and a CUDA kernel beside its math formula) runs that
    kernel, as it does without the mode: decomposing it would change what runs (the formula's temporaries).
    """
    device = next((t.device.type for t in _flat_tensors(args)), "cpu")
    key = (func, device)
    composite = _COMPOSITE.get(key)
    if composite is None:  # decided once per op and device: this runs on every op a tracker sees
        composite = _COMPOSITE[key] = getattr(func, "namespace", None) == "aten" and \
            func.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd) and \
            not _has_own_kernel(func, device)
    if not composite:
        return NotImplemented
    with mode:  # the C++ decomposition, as the dispatcher runs it (decompose() would prefer torch._decomp's Python
        # one, which differs: its aten.dropout clones its input when not training, the C++ one returns it)
        return func._op_dk(torch._C.DispatchKey.CompositeImplicitAutograd, *args, **kwargs)


def _has_own_kernel(func: Any, device: str) -> bool:
    """Whether ``func`` has a kernel of its own for ``device`` (its backend's, or a CompositeExplicitAutograd one)."""
    keys = torch._C.DispatchKey
    backend = {"cuda": keys.CUDA, "meta": keys.Meta}.get(device, keys.CPU)
    return bool(func.has_kernel_for_dispatch_key(backend)
                or func.has_kernel_for_dispatch_key(keys.CompositeExplicitAutograd))


def _flat_tensors(args: Any) -> Iterator[torch.Tensor]:
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _flat_tensors(a)


_COMPOSITE: dict[tuple[Any, str], bool] = {}


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: a DTensor's local shard (FSDP2's parameters, gradients and optimizer
    state), any other tensor itself."""
    return t.to_local() if type(t).__name__ == "DTensor" else t  # type: ignore[attr-defined]


def device_mesh(device: str, world_size: int) -> Any:
    """A 1-D DeviceMesh over the process group; made outside any FakeTensorMode (making one under it fails on
    ``aten._local_scalar_dense``), which is what lets ``fully_shard`` shard fake tensors."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import init_device_mesh

    with unset_fake_temporarily():
        return init_device_mesh(device, (world_size,))


_MESHES: dict[tuple[Any, ...], Any] = {}


def parallel_mesh(device: str, world_size: int, tp: int = 1) -> dict[str, Any]:
    """The process group's DeviceMesh by dimension: {"dp": every rank} or, with ``tp`` > 1, the two dimensions of the
    2-D mesh ("dp", "tp") = (world / tp, tp) (TorchTitan's layout: a tensor-parallel group is ``tp`` consecutive
    ranks). One mesh per process group and layout, so that tp and fsdp share it (FSDP2 needs its mesh and the
    tensor-parallel one from the same parent); made outside any FakeTensorMode, as ``device_mesh``."""
    import torch.distributed as dist

    key = (id(dist.group.WORLD), device, world_size, tp)
    if key not in _MESHES:
        _MESHES.clear()  # meshes of a destroyed process group are of no use
        if tp == 1:
            _MESHES[key] = {"dp": device_mesh(device, world_size)}
        else:
            from torch._subclasses.fake_tensor import unset_fake_temporarily
            from torch.distributed.device_mesh import init_device_mesh

            with unset_fake_temporarily():
                mesh = init_device_mesh(device, (world_size // tp, tp), mesh_dim_names=("dp", "tp"))
                _MESHES[key] = {"dp": mesh["dp"], "tp": mesh["tp"]}
    return _MESHES[key]


def leave_process_group() -> None:
    """Destroy the process group, and first the meshes made of it: a DeviceMesh alive past
    ``destroy_process_group`` keeps gloo's process group, whose destructor then runs at interpreter exit and
    aborts the process now and then ("terminate called without an active exception", SIGABRT)."""
    import gc

    import torch.distributed as dist

    _MESHES.clear()
    gc.collect()  # a sharded model's reference cycles may hold a mesh too
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def meshes_outside_fake_mode() -> Iterator[None]:
    """Inside, ``DeviceMesh._concatenate`` runs outside any FakeTensorMode: FSDP2 concatenates its mesh with a
    tensor-parallel parameter's (the 2-D layout), and a mesh's rank tensors are real, which FakeTensorMode refuses."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import DeviceMesh

    original = DeviceMesh._concatenate

    def concatenate(meshes: list[Any]) -> Any:
        with unset_fake_temporarily():
            return original(meshes)

    DeviceMesh._concatenate = staticmethod(concatenate)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        DeviceMesh._concatenate = staticmethod(original)  # type: ignore[method-assign]


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[None]:
    """A process group of ``world_size`` ranks in which this process is rank 0 and collectives do nothing
    (torch.testing's fake backend): one rank traced as if the others were there."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        leave_process_group()


@contextlib.contextmanager
def fsdp_memory_reporting(on_unshard_alloc: Callable[[torch.Tensor], None],
                          on_unshard_free: Callable[[torch.Tensor], None],
                          on_sharded_grad: Callable[[torch.Tensor], None],
                          allocating_as_unshard: Callable[[], Any]) -> Iterator[None]:
    """Tell a tracker what FSDP2 does to memory where no dispatched op shows it: its all-gather outputs are
    grown and freed by resizing their storages (``alloc_storage``/``free_storage``), and the sharded gradients
    are set after the reduce-scatter. Patches FSDPParam and FSDPParamGroup methods for the duration."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    originals: dict[tuple[type, str], Any] = {
        (cls, name): getattr(cls, name) for cls, name in (
            (FSDPParam, "alloc_all_gather_outputs"), (FSDPParam, "free_unsharded_param"),
            (FSDPParamGroup, "unshard"), (FSDPParamGroup, "wait_for_unshard"), (FSDPParamGroup, "post_backward"))}
    reporting = _fsdp_reporting_methods(originals, on_unshard_alloc, on_unshard_free, on_sharded_grad,
                                        allocating_as_unshard)
    for (cls, name), fn in reporting.items():
        setattr(cls, name, fn)
    try:
        yield
    finally:
        for (cls, name), fn in originals.items():
            setattr(cls, name, fn)


def _fsdp_reporting_methods(originals: dict[tuple[type, str], Any],
                            on_unshard_alloc: Callable[[torch.Tensor], None],
                            on_unshard_free: Callable[[torch.Tensor], None],
                            on_sharded_grad: Callable[[torch.Tensor], None],
                            allocating_as_unshard: Callable[[], Any]) -> dict[tuple[type, str], Any]:
    """The FSDPParam / FSDPParamGroup methods of ``originals``, each calling the original and telling the tracker."""
    import itertools

    by_name = {name: (cls, name) for cls, name in originals}

    def alloc(self: Any) -> None:
        originals[by_name["alloc_all_gather_outputs"]](self)
        for t in self.all_gather_outputs:
            on_unshard_alloc(t)

    def free(self: Any) -> None:
        originals[by_name["free_unsharded_param"]](self)
        for t in itertools.chain(self.all_gather_outputs, self._unsharded_inner_tensors):
            on_unshard_free(t)

    def as_unshard(name: str) -> Callable[..., Any]:
        def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
            with allocating_as_unshard():
                return originals[by_name[name]](self, *args, **kwargs)
        return wrapped

    def post_backward(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = originals[by_name["post_backward"]](self, *args, **kwargs)
        for fsdp_param in self.fsdp_params:
            grad = fsdp_param.sharded_param.grad
            if grad is not None:
                on_sharded_grad(local_tensor(grad))
        return out

    return {by_name["alloc_all_gather_outputs"]: alloc, by_name["free_unsharded_param"]: free,
            by_name["unshard"]: as_unshard("unshard"), by_name["wait_for_unshard"]: as_unshard("wait_for_unshard"),
            by_name["post_backward"]: post_backward}


def replicate(module: torch.nn.Module) -> None:
    """DDP on ``module`` in place (torch.distributed's composable ``replicate``): the module keeps its own forward,
    gradients are all-reduced in buckets during backward."""
    from torch.distributed._composable.replicate import replicate as replicate_module

    replicate_module(module)


def cpu_allocator_events(prof: Any) -> list[tuple[int, int]]:
    """(time in ns, bytes: + allocated, - freed) of every CPU allocator event a ``torch.profiler.profile(
    profile_memory=True)`` recorded, in order. From the profiler's kineto results (no public accessor for the
    ``[memory]`` events' sizes)."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch._C._autograd.DeviceType.CPU]
    return sorted((e.start_ns(), e.nbytes()) for e in events)


def profiler_mark_times(prof: Any, name: str) -> list[int]:
    """Start times in ns (the clock of cpu_allocator_events) of the ``record_function(name)`` ranges a profile
    recorded, in order."""
    return sorted(e.start_ns() for e in prof.profiler.kineto_results.events() if e.name() == name)

