"""The fused layer op against nn.LSTM and the plain-PyTorch reference."""
from __future__ import annotations

import decimal

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lstm_ext  # noqa: F401
from autograd_checks import assert_recorded_backward_is_fused_backward
from lstm_ext.functional import lstm_cell, lstm_layer
from lstm_ext.reference import lstm_layer_reference

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def make_layer(T, N, I, H, P=0, dtype=torch.float64, bias=True, seed=0, scale=1.0, batch_sizes=None):
    """Random inputs of one layer, all requiring grad; P > 0 adds a projection. With
    batch_sizes (T steps, N = batch_sizes[0]), x is packed data (sum(batch_sizes), I)."""
    g = torch.Generator().manual_seed(seed)
    Hout = P or H

    def r(*shape):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    return dict(
        x=r(int(batch_sizes.sum()), I) if batch_sizes is not None else r(T, N, I),
        h0=r(N, Hout), c0=r(N, H), w_ih=r(4 * H, I), w_hh=r(4 * H, Hout),
        b_ih=r(4 * H) if bias else None, b_hh=r(4 * H) if bias else None,
        w_hr=r(P, H) if P else None,
    )


def run(a, reverse=False, batch_sizes=None):
    y, (h, c) = lstm_layer(
        a["x"], (a["h0"], a["c0"]), a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["w_hr"],
        reverse=reverse, batch_sizes=batch_sizes,
    )
    return y, h, c


def differentiable(a):
    return [v for v in a.values() if v is not None]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("proj", [0, 2])
def test_gradcheck(reverse, bias, packed, proj):
    bs = torch.tensor([4, 3, 1]) if packed else None
    a = make_layer(3, 4, 3, 3, P=proj, bias=bias, batch_sizes=bs)
    keys = [k for k, v in a.items() if v is not None]

    def f(*tensors):
        return run({**a, **dict(zip(keys, tensors))}, reverse, bs)

    assert torch.autograd.gradcheck(f, differentiable(a))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_double_backward_is_exact(reverse, packed):
    bs = torch.tensor([4, 3, 1]) if packed else None
    a = make_layer(3, 4, 2, 3, P=2, batch_sizes=bs)
    keys = list(a)

    def f(*tensors):
        return run(dict(zip(keys, tensors)), reverse, bs)

    assert torch.autograd.gradgradcheck(f, list(a.values()))
    assert_recorded_backward_is_fused_backward(f, list(a.values()))


def nn_lstm_pair(I, H, P, dtype, bias):
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, bias=bias, proj_size=P, dtype=dtype)
    weights = dict(
        w_ih=ref.weight_ih_l0, w_hh=ref.weight_hh_l0,
        b_ih=ref.bias_ih_l0 if bias else None, b_hh=ref.bias_hh_l0 if bias else None,
        w_hr=ref.weight_hr_l0 if P else None,
    )
    return ref, weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "T,N,I,H,P",
    [(1, 1, 1, 1, 0), (5, 1, 3, 7, 0), (7, 3, 5, 5, 0), (1, 4, 2, 9, 0), (6, 2, 4, 6, 3), (20, 8, 16, 33, 0)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_nn_lstm(dtype, T, N, I, H, P, bias):
    ref, w = nn_lstm_pair(I, H, P, dtype, bias)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, N, I, dtype=dtype, generator=g, requires_grad=True)
    h0 = torch.randn(1, N, P or H, dtype=dtype, generator=g, requires_grad=True)
    c0 = torch.randn(1, N, H, dtype=dtype, generator=g, requires_grad=True)
    y_ref, (h_ref, c_ref) = ref(x, (h0, c0))
    y, (h, c) = lstm_layer(x, (h0[0], c0[0]), **w)
    tol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(h, h_ref[0], **tol)
    torch.testing.assert_close(c, c_ref[0], **tol)

    # Every output feeds the loss, with different weights, so every gradient path counts.
    gy, gh, gc = (torch.randn(t.shape, dtype=dtype, generator=g) for t in (y, h, c))
    params = [x, h0, c0, *[p for p in w.values() if p is not None]]
    loss_ref = (y_ref * gy).sum() + (h_ref[0] * gh).sum() + (c_ref[0] * gc).sum()
    loss = (y * gy).sum() + (h * gh).sum() + (c * gc).sum()
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad(loss_ref, params)):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("proj", [0, 3])
def test_packed_matches_nn_lstm(reverse, proj):
    """PackedSequence.data with batch_sizes gives exactly nn.LSTM's packed results, each direction."""
    torch.manual_seed(0)
    ref = nn.LSTM(3, 5, bidirectional=True, proj_size=proj, dtype=torch.float64)
    lengths = torch.tensor([4, 4, 2, 1])
    x = torch.randn(4, 4, 3, dtype=torch.float64, requires_grad=True)
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths)
    out_ref, (h_ref, c_ref) = ref(packed)
    y_ref = out_ref.data
    sfx = "_reverse" if reverse else ""
    p = lambda name: getattr(ref, f"{name}_l0{sfx}")  # noqa: E731
    P = proj or 5
    y, (h, c) = lstm_layer(
        packed.data, (x.new_zeros(4, P), x.new_zeros(4, 5)), p("weight_ih"), p("weight_hh"),
        p("bias_ih"), p("bias_hh"), p("weight_hr") if proj else None,
        reverse=reverse, batch_sizes=packed.batch_sizes,
    )
    d = int(reverse)
    torch.testing.assert_close(y, y_ref[..., d * P:(d + 1) * P], **TOL[torch.float64])
    torch.testing.assert_close(h, h_ref[d], **TOL[torch.float64])
    torch.testing.assert_close(c, c_ref[d], **TOL[torch.float64])
    # Both reach x through the same packing: keep its graph for the second call.
    gx, = torch.autograd.grad((y ** 2).sum() + h.sum() + c.sum(), x, retain_graph=True)
    gx_ref, = torch.autograd.grad(
        (y_ref[..., d * P:(d + 1) * P] ** 2).sum() + h_ref[d].sum() + c_ref[d].sum(), x
    )
    torch.testing.assert_close(gx, gx_ref, **TOL[torch.float64])


def test_cell_matches_nn_lstm_cell():
    torch.manual_seed(0)
    ref = nn.LSTMCell(4, 6, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    hx = (torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64))
    got = lstm_cell(x, hx, ref.weight_ih, ref.weight_hh, ref.bias_ih, ref.bias_hh)
    for g, w in zip(got, ref(x, hx)):
        torch.testing.assert_close(g, w, **TOL[torch.float64])


def test_only_some_outputs_used():
    """Undefined incoming gradients (unused outputs) are treated as zeros."""
    a = make_layer(4, 2, 3, 3)
    for pick in [lambda y, h, c: h, lambda y, h, c: c, lambda y, h, c: y[1:3]]:
        got = torch.autograd.grad(pick(*run(a)).sum(), differentiable(a))
        want = torch.autograd.grad(pick(*lstm_layer_reference(*a.values())).sum(), differentiable(a))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL[torch.float64])


def test_needs_input_grad_skips_work():
    a = make_layer(3, 2, 3, 3)
    a["x"].requires_grad_(False)
    a["w_ih"].requires_grad_(False)
    y, h, c = run(a)
    grads = torch.autograd.grad(y.sum(), [a["h0"], a["w_hh"], a["b_ih"]])
    want = torch.autograd.grad(lstm_layer_reference(*a.values())[0].sum(), [a["h0"], a["w_hh"], a["b_ih"]])
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, **TOL[torch.float64])
    # The backward op leaves unrequested gradients empty.
    y, h, c, gates, cells, hidden = torch.ops.lstm_ext.lstm_forward(
        *[v.detach() if v is not None else None for v in a.values()], None, False
    )
    d = a
    with torch.no_grad():  # as autograd calls it: the backward op itself has no derivative
        dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = torch.ops.lstm_ext.lstm_backward(
            torch.ones_like(y), None, None, d["x"], d["h0"], d["c0"], d["w_ih"], d["w_hh"], None, None,
            False, y, gates, cells, hidden, [False, False, True],
        )
    assert dx.numel() == dw_ih.numel() == dw_hh.numel() == dw_hr.numel() == 0
    # What it does compute must still be right with the weight gradients switched off.
    want = torch.autograd.grad(
        lstm_layer_reference(*a.values())[0].sum(), [a["h0"], a["c0"], a["b_ih"]]
    )
    for got, w in zip((dh0, dc0, db), want):
        torch.testing.assert_close(got, w, **TOL[torch.float64])


def test_extreme_inputs_stay_finite():
    a = make_layer(10, 3, 4, 5, dtype=torch.float32)
    with torch.no_grad():
        a["x"].mul_(1e4)
        a["w_hh"].mul_(1e3)
    y, h, c = run(a)
    assert torch.isfinite(y).all() and torch.isfinite(c).all()
    grads = torch.autograd.grad(y.sum() + c.sum(), differentiable(a))
    assert all(torch.isfinite(g).all() for g in grads)
    # Saturated gates: sigmoid is exactly 0 or 1, tanh exactly +-1, as in nn.LSTM.
    y_ref, h_ref, c_ref = lstm_layer_reference(*a.values())
    for got, want in ((y, y_ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Most gradients vanish under saturation; dc0 does not (f = 1 passes it through).
    grads_ref = torch.autograd.grad(y_ref.sum() + c_ref.sum(), differentiable(a))
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def activation_through_cell(values, gate, dtype=torch.float32):
    """Runs ``values`` through one gate of a one-step layer whose c_T is exactly that
    gate's activation: x @ eye(4H) passes the pre-activations through unchanged, the
    other gates saturate so that c_T = i * g with the other factor 1 (c0 = 0, f = 0).
    Returns the values laid out (N, H) and c_T."""
    H = 64
    values = torch.cat([values, values.new_zeros(-values.numel() % H)]).view(-1, H).to(dtype)
    N = values.shape[0]
    saturate = torch.full((N, H), 40.0, dtype=dtype)
    blocks = {"i": [values, -saturate, saturate, saturate], "g": [saturate, -saturate, values, saturate]}[gate]
    x = torch.cat(blocks, dim=1).unsqueeze(0)
    zeros = torch.zeros(N, H, dtype=dtype)
    _, (_, c) = lstm_layer(x, (zeros, zeros), torch.eye(4 * H, dtype=dtype), torch.zeros(4 * H, H, dtype=dtype))
    return values, c


def ulp_of(exact, dtype):
    """The spacing of ``dtype`` at |exact|, as float64."""
    mag = exact.to(dtype).abs()
    return (torch.nextafter(mag, torch.tensor(float("inf"), dtype=dtype)) - mag).double()


@pytest.mark.parametrize("dtype, max_ulp", [(torch.float32, 3), (torch.float64, 4)])
def test_vector_tanh_within_a_few_ulp_over_the_range(dtype, max_ulp):
    """The CPU kernels have their own vectorized tanh; compare it with torch.tanh (float64
    for float32; for float64, torch's own 1-ulp tanh, hence one more ulp of slack)."""
    mags = torch.logspace(-30, 2, 20000, dtype=torch.float64)
    values, c = activation_through_cell(
        torch.cat([mags, -mags, torch.linspace(-10, 10, 20001, dtype=torch.float64),
                   torch.linspace(0.5, 0.6, 4003, dtype=torch.float64)]), "g", dtype)
    exact = torch.tanh(values.double())
    err_ulp = (c.double() - exact).abs() / ulp_of(exact, dtype)
    assert err_ulp.max() <= max_ulp, (
        f"tanh({values.flatten()[err_ulp.argmax()].item()}) off by {err_ulp.max():.2f} ulp")


def exact_sigmoid(values):
    """sigmoid of float64 ``values``, correctly rounded: from 34 significant digits."""
    ctx, one = decimal.Context(prec=34), decimal.Decimal(1)
    return torch.tensor([float(ctx.divide(one, ctx.add(one, ctx.exp(-decimal.Decimal(x)))))
                         for x in values.flatten().tolist()], dtype=torch.float64).view(values.shape)


@pytest.mark.parametrize(
    "dtype, max_ulp, limit, tiny",
    [(torch.float32, 3, 100.0, 1e-37), (torch.float64, 2, 800.0, 1.3e-308)],
    ids=["f32", "f64"],
)
def test_sigmoid_within_a_few_ulp_over_the_range(dtype, max_ulp, limit, tiny):
    """The CPU kernels have their own inline exp and reciprocal; compare sigmoid with float64
    for float32, and for float64 with the correctly rounded value (torch's own float64
    sigmoid is off by up to 2 ulp near x = -38, more than the kernel's error). Below
    ``tiny`` (x < -85 in float32, x < -708 in float64) the kernel may round to any value
    that small (it clamps e^-x)."""
    values = torch.cat([torch.linspace(-limit, limit, 40001, dtype=torch.float64),
                        torch.linspace(-40, 40, 40001, dtype=torch.float64),
                        torch.logspace(-30, 1, 10000, dtype=torch.float64)]).to(dtype)
    values, c = activation_through_cell(torch.cat([values, -values]), "i", dtype)
    exact = torch.sigmoid(values.double()) if dtype == torch.float32 else exact_sigmoid(values)
    ulp = ulp_of(exact, dtype)
    err = (c.double() - exact).abs()
    assert (err <= max_ulp * ulp + tiny).all(), (
        f"sigmoid({values.flatten()[(err / ulp).argmax()].item()}) off by {(err / ulp).max():.2f} ulp")
    H, zeros = 64, torch.zeros(1, 64, dtype=dtype)
    assert torch.isnan(lstm_layer(torch.full((1, 1, 4 * H), float("nan"), dtype=dtype), (zeros, zeros),
                                  torch.eye(4 * H, dtype=dtype), torch.zeros(4 * H, H, dtype=dtype))[0]).all()


@pytest.mark.parametrize("which", ["b_ih", "b_hh"])
@pytest.mark.parametrize("grad", [True, False], ids=["forward", "inference"])
def test_single_bias_matches_reference(which, grad):
    """The kernels add b_ih + b_hh in the cell math; either bias alone must work too."""
    a = make_layer(12, 3, 4, 5)
    other = "b_hh" if which == "b_ih" else "b_ih"
    a[other] = None
    with torch.set_grad_enabled(grad):
        y, h, c = run(a)
    y_ref, h_ref, c_ref = lstm_layer_reference(*a.values())
    for got, want in ((y, y_ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(got, want, **TOL[torch.float64])
    if grad:
        wrt = [t for t in a.values() if t is not None]
        got = torch.autograd.grad((y.sum(), c.sum()), wrt)
        want = torch.autograd.grad((y_ref.sum(), c_ref.sum()), wrt)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL[torch.float64])


def test_bfloat16_close_to_float64():
    a64 = make_layer(6, 3, 8, 16)
    a16 = {k: v.detach().to(torch.bfloat16).requires_grad_() for k, v in a64.items() if v is not None}
    a16["w_hr"] = None
    y16, h16, c16 = run(a16)
    y64, h64, c64 = run(a64)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.double(), y64, rtol=0.05, atol=0.05)
    g16 = torch.autograd.grad(y16.float().sum(), a16["w_hh"])[0]
    g64 = torch.autograd.grad(y64.sum(), a64["w_hh"])[0]
    torch.testing.assert_close(g16.double(), g64, rtol=0.1, atol=0.1)


def test_opcheck():
    for packed, proj in [(None, 0), (torch.tensor([4, 3, 1]), 2)]:
        a = make_layer(3, 4, 3, 3, P=proj, batch_sizes=packed)
        args = (*a.values(), packed, True)
        torch.library.opcheck(torch.ops.lstm_ext.lstm_forward.default, args)
        out = torch.ops.lstm_ext.lstm_forward(
            *[t.detach() if isinstance(t, torch.Tensor) else t for t in args]
        )
        y, h, c, gates, cells, hidden = out
        bwd_args = (
            torch.randn_like(y), torch.randn_like(h), None, a["x"].detach(), a["h0"].detach(),
            a["c0"].detach(), a["w_ih"].detach(), a["w_hh"].detach(),
            a["w_hr"].detach() if proj else None, packed, True, y, gates, cells, hidden,
            [True, True, True],
        )
        torch.library.opcheck(torch.ops.lstm_ext.lstm_backward.default, bwd_args)
        detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
        torch.library.opcheck(torch.ops.lstm_ext.lstm_inference.default, detached)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T, N, H", [(3, 5, 8), (12, 5, 8), (20, 64, 64)])  # the last: 3 blocks of steps
@pytest.mark.parametrize("reverse, packed, proj", [
    (False, False, 0), (True, False, 0), (False, True, 0), (True, True, 0), (False, False, 3), (True, True, 3),
])
def test_inference_matches_forward(device, dtype, T, N, H, reverse, packed, proj):
    """lstm_inference projects blocks of steps into one reused buffer and updates the cells
    in place; it must give lstm_forward's y, h_n and c_n. functional.lstm_layer picks it
    when no gradient is needed."""
    batch_sizes = None
    if packed:
        batch_sizes = torch.tensor([N] * (T // 3) + [N - 1] * (T // 3) + [2] * (T - 2 * (T // 3)))
    a = {k: v.detach().to(device) if v is not None else None
         for k, v in make_layer(T, N, 6, H, P=proj, dtype=dtype, scale=0.3, batch_sizes=batch_sizes).items()}
    args = (*a.values(), batch_sizes, reverse)
    y, h, c, gates, cells, _ = torch.ops.lstm_ext.lstm_forward(*args)
    # What a packed forward keeps for the backward has no padding rows either.
    rows = (int(batch_sizes.sum()),) if packed else (T, N)
    assert gates.shape == (*rows, 4 * H) and cells.shape == (*rows, H) and y.shape == (*rows, proj or H)
    y_i, h_i, c_i = torch.ops.lstm_ext.lstm_inference(*args)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-13)
    for got, want in ((y_i, y), (h_i, h), (c_i, c)):
        torch.testing.assert_close(got, want, **tol)
    # The two ops give bitwise equal results on CPU, so equal outputs cannot tell which one
    # lstm_layer ran: record the ops it dispatches.
    with torch.no_grad(), _OpsCalled() as called:
        y_f, (h_f, c_f) = lstm_layer(a["x"], (a["h0"], a["c0"]), *list(a.values())[3:], reverse=reverse,
                                     batch_sizes=batch_sizes)
    assert called.names == ["lstm_ext::lstm_inference"]
    assert torch.equal(y_f, y_i) and torch.equal(h_f, h_i) and torch.equal(c_f, c_i)


class _OpsCalled(TorchDispatchMode):
    """Records the name of every op dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def bad(**changes):
    a = {k: (v.detach() if v is not None else None) for k, v in make_layer(3, 2, 4, 5).items()}
    a.update(changes)
    return a


@pytest.mark.parametrize(
    "changes,bs,match",
    [
        (dict(x=torch.randn(2, 4, dtype=torch.float64)), None, "expected x of shape"),
        (dict(x=torch.randn(3, 2, 4)), None, "expected h0 of dtype Float like x, but got Double"),
        (dict(w_ih=torch.randn(20, 3, dtype=torch.float64)), None, "expected w_ih of shape"),
        (dict(w_hh=torch.randn(20, 4, dtype=torch.float64)), None, "expected w_hh of shape"),
        (dict(h0=torch.randn(3, 5, dtype=torch.float64)), None, "expected h0 of shape"),
        (dict(c0=torch.randn(2, 5, dtype=torch.float32)), None, "expected c0 of dtype"),
        (dict(b_hh=torch.randn(19, dtype=torch.float64)), None, "expected b_hh of shape"),
        (dict(x=torch.randn(0, 2, 4, dtype=torch.float64)), None, "at least one step"),
        (dict(x=torch.randint(0, 3, (3, 2, 4))), None, "floating point"),
        ({}, torch.tensor([2, 2, 2]), r"with batch_sizes, expected x of shape \(sum\(batch_sizes\)"),
        (dict(x=torch.randn(5, 4, dtype=torch.float64)), torch.tensor([2, 2]), r"sum\(batch_sizes\) = 4 rows"),
        (dict(x=torch.randn(5, 4, dtype=torch.float64)), torch.tensor([2, 1, 2]), "non-increasing"),
        (dict(x=torch.randn(3, 4, dtype=torch.float64)), torch.tensor([1, 1, 1]), "expected h0 of shape"),
        (dict(x=torch.randn(5, 4, dtype=torch.float64)), torch.tensor([2.0, 2.0, 1.0]), "int64 CPU tensor"),
    ],
)
def test_bad_input_raises(changes, bs, match):
    a = bad(**changes)
    with pytest.raises(RuntimeError, match=match):
        run(a, batch_sizes=bs)


@pytest.mark.cuda
def test_device_mismatch_is_reported():
    a = bad(x=torch.randn(3, 2, 4, dtype=torch.float64, device="cuda"))
    with pytest.raises(RuntimeError, match="expected h0 on cuda:0 like x, but got cpu"):
        run(a)
    a = {k: (v.cuda() if v is not None else None) for k, v in bad().items()}
    with pytest.raises(RuntimeError, match="int64 CPU tensor"):
        run(a, batch_sizes=torch.tensor([2, 2, 2], device="cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize(
    "dtype,tol",
    [(torch.float64, 1e-10), (torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)],
)
@pytest.mark.parametrize("reverse,packed,proj", [(False, False, 0), (True, True, 3), (False, True, 2)])
def test_cuda_matches_cpu_float64(dtype, tol, reverse, packed, proj):
    # nn.LSTM's init scale: a stable recurrence, so differences are rounding, not chaos.
    bs = torch.tensor([4, 4, 3, 3, 2, 2, 1, 1, 1]) if packed else None
    a64 = make_layer(9, 4, 6, 20, P=proj, scale=20 ** -0.5, batch_sizes=bs)
    acu = {k: (v.detach().to("cuda", dtype).requires_grad_() if v is not None else None) for k, v in a64.items()}
    out64, outcu = run(a64, reverse, bs), run(acu, reverse, bs)
    for got, want in zip(outcu, out64):
        torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol)
    weights = [torch.linspace(-1, 1, t.numel(), dtype=torch.float64).view_as(t) for t in out64]
    loss64 = sum((o * w).sum() for o, w in zip(out64, weights))
    losscu = sum((o.double() * w.cuda()).sum() for o, w in zip(outcu, weights))
    # Each gradient's largest entry is 0.3 to 4.4 here: 10 * tol (0.5 for bfloat16) let a zero
    # dh0 pass. The CPU kernels in these dtypes are off by 1e-6 (float32), 4e-3 (float16) and
    # 3e-2 (bfloat16).
    for got, want in zip(torch.autograd.grad(losscu, differentiable(acu)), torch.autograd.grad(loss64, differentiable(a64))):
        torch.testing.assert_close(got.double().cpu(), want, rtol=tol * 2, atol=tol * 2)


@pytest.mark.cuda
def test_cuda_runs_on_current_stream():
    """On a side stream the op must queue behind the work already queued there: its input
    x is written on that stream after a long spin, so kernels launched on any other stream
    (the default one, say) would read x before it is written and give other results.
    (Running on a side stream with ready inputs, as before, passes whatever stream is used.)"""
    a = {k: (v.detach().cuda() if v is not None else None) for k, v in make_layer(50, 8, 16, 64).items()}
    want = run(a)[0]
    x = torch.zeros_like(a["x"])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())  # a and x are ready before the spin starts
    with torch.cuda.stream(s):
        torch.cuda._sleep(100_000_000)  # some 50 ms on the GPU
        x.copy_(a["x"])
        got = run({**a, "x": x})[0]
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("N,H,proj", [(1, 7, 0), (5, 33, 0), (13, 20, 3), (7, 64, 17)])
@pytest.mark.parametrize("packed", [False, True])
def test_float32_multi_step_calls_match_nn_lstm(N, H, proj, packed):
    """Calls of 8+ steps take the CPU's packed-weight GEMM in float32: odd shapes, partial
    rows (packed sequences), projections, both directions."""
    torch.manual_seed(0)
    ref = nn.LSTM(6, H, num_layers=2, bidirectional=True, proj_size=proj)
    ext = lstm_ext.LSTM(6, H, num_layers=2, bidirectional=True, proj_size=proj)
    ext.load_state_dict(ref.state_dict())
    T = 12
    x = torch.randn(T, N, 6, requires_grad=True)
    lengths = torch.randint(1, T + 1, (N,)).tolist()
    lengths[0] = T

    def run(model):
        inp = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        out, (h, c) = model(inp)
        y = nn.utils.rnn.pad_packed_sequence(out)[0] if packed else out
        loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + h.sum() + (c ** 2).sum()
        return (y, h, c), torch.autograd.grad(loss, [x, *model.parameters()])

    (outs, grads), (outs_ref, grads_ref) = run(ext), run(ref)
    for got, want in zip((*outs, *grads), (*outs_ref, *grads_ref)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
