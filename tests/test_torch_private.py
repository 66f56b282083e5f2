"""The private PyTorch APIs memopt wraps still behave as it relies on."""

import torch

from memopt.core._torch_private import (
    TorchDispatchMode,
    current_saved_tensors_hooks,
    observe_saved_tensors,
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
