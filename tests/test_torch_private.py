"""The private PyTorch APIs memopt wraps still behave as it relies on."""

import torch

from memopt._torch_private import TorchDispatchMode, current_saved_tensors_hooks, observe_saved_tensors


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
