"""The private PyTorch APIs memopt wraps still behave as it relies on."""

import pytest
import torch

from memopt.core._torch_private import (
    TorchDispatchMode,
    current_saved_tensors_hooks,
    fake_process_group,
    leave_process_group,
    meshes_outside_fake_mode,
    observe_saved_tensors,
    parallel_mesh,
    saved_tensors_by_node,
)


def test_observer_sees_saved_tensors_and_keeps_inner_hooks():
    seen, inner = [], []
    a = torch.randn(4, requires_grad=True)
    assert current_saved_tensors_hooks() is None
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (inner.append(1), t)[1], lambda t: t):
        with observe_saved_tensors(lambda t: seen.append(t.shape)):
            loss = (a * a).sum()
    loss.backward()
    assert len(seen) == 2 and len(inner) == 2
    assert torch.equal(a.grad, 2 * a.detach())


def test_dispatch_mode_sees_op_outputs():
    outs = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs.append(out)
            return out

    with Spy():
        torch.ones(3) + 1
    assert torch.equal(outs[-1], torch.full((3,), 2.0))


def test_graph_walk_names_each_saved_tensor_and_its_node():
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(4, 5, requires_grad=True)
    h = a @ b
    out = h.relu().sum()
    saved = list(saved_tensors_by_node(out))
    names = sorted(name for name, _ in saved)
    assert names == ["MmBackward0", "MmBackward0", "ReluBackward0"]
    relu_saved = next(t for name, t in saved if name == "ReluBackward0")
    assert torch.equal(relu_saved, h.relu())


def test_only_ops_without_a_kernel_of_their_own_are_decomposed():
    """matmul exists only as its decomposition (it arrives whole under inference_mode); silu_backward has a CPU
    kernel beside its math formula, and runs that kernel, as it does without a dispatch mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from memopt.core._torch_private import decompose_composite

    seen: list[str] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = decompose_composite(self, func, args, kwargs or {})
            if out is not NotImplemented:
                seen.append(f"decomposed {func}")
                return out
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    a, b, grad = torch.randn(2, 3, 4), torch.randn(4, 5), torch.randn(8)
    with torch.inference_mode(), Recorder():
        torch.matmul(a, b)
        torch.ops.aten.silu_backward(grad, torch.randn(8))
    assert "decomposed aten.matmul.default" in seen
    assert "aten.silu_backward.default" in seen and "decomposed aten.silu_backward.default" not in seen


def test_cpu_allocator_events_replay_to_what_was_allocated():
    from torch.profiler import ProfilerActivity, profile

    from memopt.core._torch_private import cpu_allocator_events

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kept = torch.empty(1000, dtype=torch.float32)
        del kept
    events = cpu_allocator_events(prof)
    assert (4000 in [n for _, n in events]) and (-4000 in [n for _, n in events])
    assert sum(n for _, n in events) == 0


def test_meshes_are_concatenated_outside_fake_mode_and_the_patch_is_undone():
    """FSDP2 on tensor-parallel parameters calls DeviceMesh._concatenate, whose rank tensors are real: under
    FakeTensorMode it runs outside the mode, and PyTorch's own function is back afterwards, also after an error."""
    from torch.distributed.device_mesh import DeviceMesh

    original = DeviceMesh._concatenate
    seen = []
    DeviceMesh._concatenate = staticmethod(lambda meshes: seen.append(torch._C._get_dispatch_mode(
        torch._C._TorchDispatchModeKey.FAKE)) or "joined")
    patched = DeviceMesh._concatenate
    try:
        with torch._subclasses.fake_tensor.FakeTensorMode(), meshes_outside_fake_mode():
            assert DeviceMesh._concatenate([]) == "joined"
        assert seen == [None] and DeviceMesh._concatenate is patched
        with pytest.raises(ValueError), meshes_outside_fake_mode():
            raise ValueError
        assert DeviceMesh._concatenate is patched
    finally:
        DeviceMesh._concatenate = staticmethod(original)


def test_leaving_the_process_group_lets_go_of_its_meshes():
    """A mesh alive past destroy_process_group keeps gloo's process group until interpreter exit, whose destructor
    then aborts a rank now and then (SIGABRT, 4 runs in 30 under torchrun here): memopt holds none after leaving."""
    import weakref

    import torch.distributed as dist

    with fake_process_group(4):
        mesh = weakref.ref(parallel_mesh("cpu", 4)["dp"])
        assert mesh() is not None
    assert mesh() is None and not dist.is_initialized()
    leave_process_group()  # nothing to leave: no error
