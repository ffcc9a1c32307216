"""The fused GRU and RNN (tanh, relu) layer ops against nn.GRU / nn.RNN and the reference layer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lstm_ext  # noqa: F401
from autograd_checks import assert_recorded_backward_is_fused_backward
from lstm_ext.functional import rnn_cell, rnn_layer
from lstm_ext.reference import rnn_layer_reference

MODES = ["GRU", "RNN_TANH", "RNN_RELU"]
GATES = {"GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=0.05, atol=0.05),
}
PACKED = torch.tensor([4, 3, 1])  # T = 3 steps, N = 4, a shrinking batch


def make_layer(mode, T, N, I, H, dtype=torch.float64, bias=True, seed=0, scale=1.0, batch_sizes=None):
    """Random inputs of one layer, all requiring grad. With batch_sizes, x is packed data."""
    g = torch.Generator().manual_seed(seed)
    G = GATES[mode] * H

    def r(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    return dict(
        x=r(int(batch_sizes.sum()), I) if batch_sizes is not None else r(T, N, I),
        h0=r(N, H), w_ih=r(G, I), w_hh=r(G, H),
        b_ih=r(G) if bias else None, b_hh=r(G) if bias else None,
    )


def run(a, mode, reverse=False, batch_sizes=None):
    return rnn_layer(*a.values(), mode=mode, reverse=reverse, batch_sizes=batch_sizes)


def reference(a, mode, reverse=False, batch_sizes=None):
    return rnn_layer_reference(*a.values(), mode=mode, reverse=reverse, batch_sizes=batch_sizes)


def tensors(a):
    return [v for v in a.values() if v is not None]


def torch_layer(mode, I, H, dtype, bias):
    """nn.GRU / nn.RNN of one layer, and its weights as the functional arguments."""
    torch.manual_seed(0)
    if mode == "GRU":
        ref = nn.GRU(I, H, bias=bias, dtype=dtype)
    else:
        ref = nn.RNN(I, H, bias=bias, nonlinearity=mode[4:].lower(), dtype=dtype)
    names = ["weight_ih_l0", "weight_hh_l0"] + (["bias_ih_l0", "bias_hh_l0"] if bias else [])
    weights = [getattr(ref, n) for n in names] + [None, None] * (not bias)
    return ref, weights


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck(mode, reverse, bias, packed):
    bs = PACKED if packed else None
    a = make_layer(mode, 3, 4, 3, 3, bias=bias, batch_sizes=bs)
    keys = [k for k, v in a.items() if v is not None]

    def f(*ts):
        return run({**a, **dict(zip(keys, ts))}, mode, reverse, bs)

    assert torch.autograd.gradcheck(f, tensors(a))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse, packed", [(False, False), (True, True)])
def test_double_backward_is_exact(mode, reverse, packed):
    bs = PACKED if packed else None
    a = make_layer(mode, 3, 4, 2, 3, batch_sizes=bs)
    keys = list(a)

    def f(*ts):
        return run(dict(zip(keys, ts)), mode, reverse, bs)

    assert torch.autograd.gradgradcheck(f, list(a.values()))
    assert_recorded_backward_is_fused_backward(f, list(a.values()))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,N,I,H", [(1, 1, 1, 1), (5, 1, 3, 7), (7, 3, 5, 5), (20, 8, 16, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch(mode, dtype, T, N, I, H, bias):
    ref, weights = torch_layer(mode, I, H, dtype, bias)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, N, I, dtype=dtype, generator=g, requires_grad=True)
    h0 = torch.randn(1, N, H, dtype=dtype, generator=g, requires_grad=True)
    y_ref, h_ref = ref(x, h0)
    y, h = rnn_layer(x, h0[0], *weights, mode=mode)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(h, h_ref[0], **TOL[dtype])
    gy, gh = torch.randn(y.shape, dtype=dtype, generator=g), torch.randn(h.shape, dtype=dtype, generator=g)
    wrt = [x, h0, *[w for w in weights if w is not None]]
    got = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), wrt)
    want = torch.autograd.grad((y_ref * gy).sum() + (h_ref[0] * gh).sum(), wrt)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse", [False, True])
def test_packed_matches_torch(mode, reverse):
    """PackedSequence.data with batch_sizes gives torch's packed results, each direction."""
    torch.manual_seed(0)
    kind = dict(nonlinearity=mode[4:].lower()) if mode != "GRU" else {}
    ref = (nn.GRU if mode == "GRU" else nn.RNN)(3, 5, bidirectional=True, dtype=torch.float64, **kind)
    x = torch.randn(4, 4, 3, dtype=torch.float64, requires_grad=True)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([4, 4, 2, 1]))
    out_ref, h_ref = ref(packed)
    sfx = "_reverse" if reverse else ""
    w = [getattr(ref, f"{n}_l0{sfx}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    y, h = rnn_layer(packed.data, x.new_zeros(4, 5), *w, mode=mode, reverse=reverse, batch_sizes=packed.batch_sizes)
    half = slice(5, 10) if reverse else slice(0, 5)
    torch.testing.assert_close(y, out_ref.data[:, half], **TOL[torch.float64])
    torch.testing.assert_close(h, h_ref[int(reverse)], **TOL[torch.float64])
    got = torch.autograd.grad(y.square().sum() + h.sum(), [x, *w], retain_graph=True)
    want = torch.autograd.grad(out_ref.data[:, half].square().sum() + h_ref[int(reverse)].sum(), [x, *w])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("mode", MODES)
def test_cell_matches_torch_cell(mode):
    torch.manual_seed(0)
    if mode == "GRU":
        ref = nn.GRUCell(4, 6, dtype=torch.float64)
    else:
        ref = nn.RNNCell(4, 6, nonlinearity=mode[4:].lower(), dtype=torch.float64)
    x, h = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    got = rnn_cell(x, h, ref.weight_ih, ref.weight_hh, ref.bias_ih, ref.bias_hh, mode=mode)
    torch.testing.assert_close(got, ref(x, h), **TOL[torch.float64])


@pytest.mark.parametrize("mode", MODES)
def test_only_some_outputs_used_and_skipped_gradients(mode):
    """Unused outputs count as zero gradients; unrequested gradients are not computed."""
    a = make_layer(mode, 4, 2, 3, 3)
    for pick in [lambda y, h: h, lambda y, h: y[1:3]]:
        got = torch.autograd.grad(pick(*run(a, mode)).sum(), tensors(a))
        want = torch.autograd.grad(pick(*reference(a, mode)).sum(), tensors(a))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL[torch.float64])
    d = {k: v.detach() for k, v in a.items()}
    y, h, saved = torch.ops.lstm_ext.rnn_forward(*d.values(), None, False, mode)
    with torch.no_grad():
        dx, dh0, dw_ih, dw_hh, db_ih, db_hh = torch.ops.lstm_ext.rnn_backward(
            torch.ones_like(y), None, d["x"], d["h0"], d["w_ih"], d["w_hh"], None, False, mode, y, saved,
            [False, False, True],
        )
    assert dx.numel() == dw_ih.numel() == dw_hh.numel() == 0
    want = torch.autograd.grad(reference(a, mode)[0].sum(), [a["h0"], a["b_ih"], a["b_hh"]])
    for got, w in zip((dh0, db_ih, db_hh), want):
        torch.testing.assert_close(got, w, **TOL[torch.float64])


@pytest.mark.parametrize("mode", MODES)
def test_extreme_inputs_match_reference(mode):
    """Saturated gates (and, for relu, large values) as in the reference, finite gradients."""
    a = make_layer(mode, 10, 3, 4, 5, dtype=torch.float32)
    with torch.no_grad():
        a["x"].mul_(1e3 if mode != "RNN_RELU" else 1e1)
        a["w_hh"].mul_(1e2 if mode != "RNN_RELU" else 0.1)
    y, h = run(a, mode)
    y_ref, h_ref = reference(a, mode)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    got = torch.autograd.grad(y.sum(), tensors(a))
    want = torch.autograd.grad(y_ref.sum(), tensors(a))
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which", ["b_ih", "b_hh"])
def test_single_bias_matches_reference(mode, which):
    """The GRU keeps b_hh apart from b_ih; either alone must work, forward and inference."""
    a = make_layer(mode, 12, 3, 4, 5)
    a["b_hh" if which == "b_ih" else "b_ih"] = None
    y_ref, h_ref = reference(a, mode)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            y, h = run(a, mode)
        torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
        torch.testing.assert_close(h, h_ref, **TOL[torch.float64])
    got = torch.autograd.grad(y_ref.sum(), tensors(a))
    want = torch.autograd.grad(run(a, mode)[0].sum(), tensors(a))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float64])


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_close_to_float64(mode):
    a64 = make_layer(mode, 6, 3, 8, 16, scale=0.5)
    a16 = {k: v.detach().to(torch.bfloat16).requires_grad_() for k, v in a64.items()}
    y16, _ = run(a16, mode)
    y64, _ = run(a64, mode)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.double(), y64, **TOL[torch.bfloat16])
    g16 = torch.autograd.grad(y16.float().sum(), a16["w_hh"])[0]
    g64 = torch.autograd.grad(y64.sum(), a64["w_hh"])[0]
    torch.testing.assert_close(g16.double(), g64, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("packed", [None, PACKED])
def test_opcheck(mode, packed):
    a = make_layer(mode, 3, 4, 3, 3, batch_sizes=packed)
    args = (*a.values(), packed, True, mode)
    torch.library.opcheck(torch.ops.lstm_ext.rnn_forward.default, args)
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    torch.library.opcheck(torch.ops.lstm_ext.rnn_inference.default, detached)
    y, h, saved = torch.ops.lstm_ext.rnn_forward(*detached)
    d = {k: v.detach() for k, v in a.items()}
    bwd_args = (torch.randn_like(y), torch.randn_like(h), d["x"], d["h0"], d["w_ih"], d["w_hh"], packed, True,
                mode, y, saved, [True, True, True])
    torch.library.opcheck(torch.ops.lstm_ext.rnn_backward.default, bwd_args)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T, N, H", [(3, 5, 8), (20, 64, 64)])  # the last: several blocks of steps
@pytest.mark.parametrize("reverse, packed", [(False, False), (True, False), (False, True), (True, True)])
def test_inference_matches_forward(device, mode, T, N, H, reverse, packed):
    """rnn_inference reuses one buffer for blocks of steps; it must give rnn_forward's results."""
    bs = torch.tensor([N] * (T // 3) + [N - 1] * (T // 3) + [2] * (T - 2 * (T // 3))) if packed else None
    a = {k: v.detach().to(device) for k, v in make_layer(mode, T, N, 6, H, scale=0.3, batch_sizes=bs).items()}
    y, h, saved = torch.ops.lstm_ext.rnn_forward(*a.values(), bs, reverse, mode)
    rows = (int(bs.sum()),) if packed else (T, N)
    assert saved.shape == (*rows, (4 if mode == "GRU" else 1) * H) and y.shape == (*rows, H)
    y_i, h_i = torch.ops.lstm_ext.rnn_inference(*a.values(), bs, reverse, mode)
    torch.testing.assert_close(y_i, y, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(h_i, h, rtol=1e-13, atol=1e-13)
    y_ref, h_ref = reference(a, mode, reverse, bs)
    torch.testing.assert_close(y_i, y_ref, **TOL[torch.float64])
    torch.testing.assert_close(h_i, h_ref, **TOL[torch.float64])


def test_unknown_mode_is_refused():
    a = {k: v.detach() for k, v in make_layer("GRU", 3, 2, 4, 5).items()}
    with pytest.raises(RuntimeError, match="mode must be GRU, RNN_TANH or RNN_RELU, but got 'LSTM'"):
        torch.ops.lstm_ext.rnn_inference(*a.values(), None, False, "LSTM")


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(w_ih=torch.randn(16, 4, dtype=torch.float64)), r"expected w_ih of shape \[15, 4\]"),
        (dict(w_hh=torch.randn(15, 4, dtype=torch.float64)), "expected w_hh of shape"),
        (dict(b_hh=torch.randn(14, dtype=torch.float64)), "expected b_hh of shape"),
        (dict(h0=torch.randn(2, 5)), "expected h0 of dtype Double like x, but got Float"),
        (dict(x=torch.randn(2, 4, dtype=torch.float64)), "expected x of shape"),
    ],
)
def test_bad_input_raises(changes, match):
    a = {k: v.detach() for k, v in make_layer("GRU", 3, 2, 4, 5).items()}
    a.update(changes)
    with pytest.raises(RuntimeError, match="lstm_ext.rnn_layer: " + match):
        run(a, "GRU")


@pytest.mark.parametrize("mode, dtype", [("RNN_TANH", torch.bfloat16), ("RNN_RELU", torch.bfloat16),
                                         ("GRU", torch.float32)])
def test_cpu_autocast_output_dtype_is_torchs(mode, dtype):
    """Under CPU autocast nn.RNN computes in bfloat16 while nn.GRU keeps float32 state."""
    ref, weights = torch_layer(mode, 4, 6, torch.float32, True)
    x = torch.randn(5, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, _ = ref(x)
        y, h = rnn_layer(x, x.new_zeros(3, 6), *weights, mode=mode)
    assert y_ref.dtype == dtype and y.dtype == dtype and h.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0.05, atol=0.05)


def test_direct_calls_refuse_missing_derivatives():
    a = make_layer("GRU", 3, 2, 4, 5)
    with pytest.raises(RuntimeError, match="rnn_inference has no derivative"):
        torch.ops.lstm_ext.rnn_inference(*a.values(), None, False, "GRU")
    import torch.autograd.forward_ad as fwAD
    d = {k: v.detach() for k, v in a.items()}
    with fwAD.dual_level():
        x = fwAD.make_dual(d["x"], torch.ones_like(d["x"]))
        with pytest.raises(RuntimeError, match="rnn_forward has no forward-mode derivative"):
            torch.ops.lstm_ext.rnn_forward(x, *list(d.values())[1:], None, False, "GRU")


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("reverse, packed", [(False, False), (True, True)])
def test_cuda_matches_cpu_float64(mode, dtype, tol, reverse, packed):
    bs = PACKED if packed else None
    a = make_layer(mode, 3, 4, 5, 6, batch_sizes=bs)
    cuda = {k: v.detach().to("cuda", dtype).requires_grad_() for k, v in a.items()}
    want = run(a, mode, reverse, bs)
    got = run(cuda, mode, reverse, bs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double().cpu(), w, rtol=tol, atol=tol)
    gw = torch.autograd.grad(sum(o.sum() for o in want), tensors(a))
    gg = torch.autograd.grad(sum(o.sum() for o in got), tensors(cuda))
    for g, w in zip(gg, gw):
        torch.testing.assert_close(g.double().cpu(), w, rtol=tol, atol=tol)
