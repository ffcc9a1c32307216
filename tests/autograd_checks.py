"""Checks shared by the op and module tests of every cell."""
from __future__ import annotations

import torch


def assert_recorded_backward_is_fused_backward(f, inputs: list[torch.Tensor]) -> None:
    """The create_graph backward of f (through the reference layer) gives the fused backward's
    gradients. gradgradcheck differentiates that backward against itself, so it cannot see a
    wrong first derivative there: this pins it to the fused one, which gradcheck checks."""
    outputs = f(*inputs)
    g = torch.Generator().manual_seed(1)
    grad_outputs = [torch.randn(o.shape, dtype=o.dtype, generator=g) for o in outputs]
    fused = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True)
    recorded = torch.autograd.grad(outputs, inputs, grad_outputs, create_graph=True)
    assert all(r.requires_grad for r in recorded)  # it took the differentiable path
    for got, want in zip(recorded, fused):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def assert_compiled_step_matches(model, compiled, x: torch.Tensor, close) -> None:
    """A backward of ``compiled(x)`` (a scalar loss) gives the eager ``model``'s loss and
    parameter gradients, compared by the test file's ``close`` at float32 tolerance."""
    model.zero_grad()
    expected = model(x)
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = compiled(x)
    got.backward()
    close(got, expected, torch.float32)
    for name, param in model.named_parameters():
        close(param.grad, grads[name], torch.float32, name)
