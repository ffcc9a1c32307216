"""The whole-stack ops (layers overlapped in time on CPU threads): stack_inference, and
stack_forward with its autograd (lstm_ext.ops.StackFunction), against nn.LSTM / nn.GRU /
nn.RNN, and the modules' choice of them."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import lstm_ext
from autograd_checks import assert_recorded_backward_is_fused_backward
from lstm_ext.ops import StackFunction

KINDS = {  # mode: (torch class, extra constructor arguments)
    "LSTM": (nn.LSTM, {}),
    "GRU": (nn.GRU, {}),
    "RNN_TANH": (nn.RNN, {}),
    "RNN_RELU": (nn.RNN, {"nonlinearity": "relu"}),
}
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    # Every stored value rounds (ulp at 1: 1e-3 and 8e-3), and torch's GEMMs sum in another order.
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


@contextlib.contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def torch_stack(mode, I, H, L, dtype, bias=True, proj_size=0):
    cls, extra = KINDS[mode]
    if proj_size:
        extra = {**extra, "proj_size": proj_size}
    return cls(I, H, L, bias=bias, dtype=dtype, **extra)


def op_args(ref, x, hx, batch_sizes=None):
    """stack_inference's arguments for the torch module ``ref`` (single direction)."""
    weights = [w for layer in ref.all_weights for w in layer]
    h0, c0 = hx if ref.mode == "LSTM" else (hx, None)
    return (x, h0, c0, weights, ref.bias, getattr(ref, "proj_size", 0) > 0, batch_sizes, ref.mode)


def call(ref, x, hx, batch_sizes=None):
    y, h_n, c_n = torch.ops.lstm_ext.stack_inference(*op_args(ref, x, hx, batch_sizes))
    return y, ((h_n, c_n) if ref.mode == "LSTM" else h_n)


def initial_state(ref, N, L, dtype):
    h = torch.randn(L, N, getattr(ref, "proj_size", 0) or ref.hidden_size, dtype=dtype)
    return (h, torch.randn(L, N, ref.hidden_size, dtype=dtype)) if ref.mode == "LSTM" else h


def flat(out):
    y, hx = out
    return [y, *hx] if isinstance(hx, tuple) else [y, hx]


@pytest.mark.parametrize("mode", list(KINDS))
@pytest.mark.parametrize("L", [2, 3, 4])
@pytest.mark.parametrize("n_threads", [1, 2, 3])  # 3 on 2 cores: more threads than cores, L=3 overlapped
@pytest.mark.parametrize("dtype", list(TOL), ids=["f64", "f32", "f16", "bf16"])
def test_matches_torch(mode, L, n_threads, dtype):
    torch.manual_seed(0)
    ref = torch_stack(mode, 5, 7, L, dtype)
    x = torch.randn(40, 3, 5, dtype=dtype)  # T=40: several blocks of steps per layer
    hx = initial_state(ref, 3, L, dtype)
    with torch.no_grad(), threads(n_threads):
        expected = flat(ref(x, hx))
        got = flat(call(ref, x, hx))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_overlapped_layers_on_library_gemms(dtype):
    """Steps of 8 Mflop whose weights (256 KiB) fit a core's L2: on 2 threads the layers
    overlap (lstm_cpu.cpp's overlap_layers), each thread running its layer's GEMMs, which
    on an Intel CPU are MKL's (float32) and with AMX oneDNN's batch-reduce GEMM (bfloat16)."""
    torch.manual_seed(0)
    ref = torch_stack("LSTM", 128, 128, 2, dtype)
    x = torch.randn(12, 64, 128, dtype=dtype)
    hx = initial_state(ref, 64, 2, dtype)
    with torch.no_grad(), threads(2):
        for g, e in zip(flat(call(ref, x, hx)), flat(ref(x, hx))):
            torch.testing.assert_close(g, e, **TOL[dtype])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("proj_size", [0, 3])
def test_lstm_bias_and_projection(bias, proj_size):
    ref = torch_stack("LSTM", 4, 6, 2, torch.float64, bias=bias, proj_size=proj_size)
    x = torch.randn(9, 2, 4, dtype=torch.float64)
    hx = initial_state(ref, 2, 2, torch.float64)
    with torch.no_grad():
        for g, e in zip(flat(call(ref, x, hx)), flat(ref(x, hx))):
            torch.testing.assert_close(g, e, **TOL[torch.float64])


@pytest.mark.parametrize("mode", list(KINDS))
@pytest.mark.parametrize("n_threads", [1, 2])
def test_packed_matches_torch(mode, n_threads):
    ref = torch_stack(mode, 4, 6, 2, torch.float64)
    seqs = [torch.randn(n, 4, dtype=torch.float64) for n in (7, 5, 5, 2)]
    packed = pack_sequence(seqs)
    hx = initial_state(ref, 4, 2, torch.float64)
    with torch.no_grad(), threads(n_threads):
        out_ref, hx_ref = ref(packed, hx)
        got = call(ref, packed.data, hx, packed.batch_sizes)
    for g, e in zip(flat(got), flat((out_ref.data, hx_ref))):
        torch.testing.assert_close(g, e, **TOL[torch.float64])


def test_steps_without_rows_are_passed_on():
    """batch_sizes may end in zeros: a layer above still gets told those steps are done."""
    ref = torch_stack("GRU", 3, 4, 2, torch.float64).requires_grad_(False)
    batch_sizes = torch.tensor([2, 1, 0, 0])
    x = torch.randn(3, 3, dtype=torch.float64)
    h0 = torch.randn(2, 2, 4, dtype=torch.float64)
    with threads(2):
        y, h_n = call(ref, x, h0, batch_sizes)
    expected_y, expected_h = call(ref, x, h0, torch.tensor([2, 1]))
    torch.testing.assert_close(y, expected_y, rtol=0, atol=0)
    torch.testing.assert_close(h_n, expected_h, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["stack_inference", "stack_forward"])
@pytest.mark.parametrize("mode", list(KINDS))
@pytest.mark.parametrize("packed", [False, True])
def test_opcheck(op, mode, packed):
    ref = torch_stack(mode, 3, 4, 2, torch.float64).requires_grad_(False)
    batch_sizes = torch.tensor([3, 2, 2]) if packed else None
    x = torch.randn(7, 3, dtype=torch.float64) if packed else torch.randn(3, 3, 3, dtype=torch.float64)
    torch.library.opcheck(
        getattr(torch.ops.lstm_ext, op).default, op_args(ref, x, initial_state(ref, 3, 2, torch.float64), batch_sizes)
    )


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.__setitem__(3, a[3][:-1]), "expected 4 weights per layer, but got 7 in all"),
        (lambda a: a.__setitem__(1, a[1][:1]), r"expected h0 of shape \(2, N, \*\) for 2 layers"),
        (lambda a: a.__setitem__(2, None), "c0 is for the LSTM, and it needs one"),
        (lambda a: a.__setitem__(7, "GRUU"), "mode must be LSTM, GRU, RNN_TANH or RNN_RELU, but got 'GRUU'"),
        (lambda a: a.__setitem__(5, True), "expected 5 weights per layer"),
        # The second layer's weights are checked before the first runs.
        (lambda a: a[3].__setitem__(4, torch.randn(24, 5, dtype=torch.float64)),
         r"lstm_ext.stack_inference: expected w_ih of shape \[24, 6\]"),
    ],
)
def test_bad_input_raises(change, match):
    ref = torch_stack("LSTM", 5, 6, 2, torch.float64).requires_grad_(False)
    args = list(op_args(ref, torch.randn(4, 2, 5, dtype=torch.float64), initial_state(ref, 2, 2, torch.float64)))
    change(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lstm_ext.stack_inference(*args)


def test_refuses_inputs_that_require_grad():
    ref = torch_stack("RNN_TANH", 3, 4, 2, torch.float64)  # parameters require grad
    with pytest.raises(RuntimeError, match="stack_inference has no derivative"):
        call(ref, torch.randn(2, 1, 3, dtype=torch.float64), torch.zeros(2, 1, 4, dtype=torch.float64))


# ---------------------------------------------------------------- training: stack_forward


def stack_function(ref, batch_sizes=None):
    """StackFunction for the weights of ``ref`` as a function of (x, h0, [c0,] *weights),
    c0 for the LSTM only; returns y, h_n and, for the LSTM, c_n."""
    lstm = ref.mode == "LSTM"

    def f(x, h0, *rest):
        c0, weights = (rest[0], rest[1:]) if lstm else (None, rest)
        y, h_n, c_n = StackFunction.apply(
            x, h0, c0, ref.bias, getattr(ref, "proj_size", 0) > 0, batch_sizes, ref.mode, *weights
        )
        return (y, h_n, c_n) if lstm else (y, h_n)

    return f


def leaves(ref, x, hx):
    """x, h0, c0 (None for the RNNs) and ref's weights, as fresh leaves that require grad."""
    h0, c0 = hx if ref.mode == "LSTM" else (hx, None)
    weights = [w for layer in ref.all_weights for w in layer]
    return [t.detach().clone().requires_grad_() if t is not None else None for t in (x, h0, c0, *weights)]


def outputs_and_gradients(f, inputs, seed=2):
    """f's outputs and the gradients of the inputs (None skipped) for random output gradients."""
    inputs = [t for t in inputs if t is not None]
    outputs = f(*inputs)
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outputs]
    return [o.detach() for o in outputs] + list(torch.autograd.grad(outputs, inputs, grads))


def torch_function(ref, batch_sizes=None):
    """ref as a function of (x, h0, [c0,] *its weights), like stack_function."""
    names = [n for layer in ref._all_weights for n in layer]
    lstm = ref.mode == "LSTM"

    def f(x, h0, *rest):
        hx, weights = ((h0, rest[0]), rest[1:]) if lstm else (h0, rest)
        inp = nn.utils.rnn.PackedSequence(x, batch_sizes) if batch_sizes is not None else x
        y, hx = torch.func.functional_call(ref, dict(zip(names, weights)), (inp, hx))
        y = y.data if batch_sizes is not None else y
        return (y, *hx) if lstm else (y, hx)

    return f


def assert_gradients_match(ref, x, hx, dtype, batch_sizes=None):
    """Outputs and the gradients of x, h0, c0 and every weight against ref's, for random
    output gradients. In float16 and bfloat16 torch's results are themselves off the exact
    ones: there ours may be off by at most twice as much as torch's (measured against
    ref in float64) plus a little."""
    ours = outputs_and_gradients(stack_function(ref, batch_sizes), leaves(ref, x, hx))
    theirs = outputs_and_gradients(torch_function(ref, batch_sizes), leaves(ref, x, hx))
    if dtype in (torch.float16, torch.bfloat16):
        exact_ref = copy.deepcopy(ref).double()
        exact = outputs_and_gradients(torch_function(exact_ref, batch_sizes),
                                      [t.double() if t is not None else None for t in leaves(ref, x, hx)])
    for k, (mine, reference) in enumerate(zip(ours, theirs)):
        assert reference.abs().max() > 0, "a zero reference would hide a dropped gradient"
        if dtype in (torch.float16, torch.bfloat16):
            truth = exact[k]
            error, torch_error = ((t.double() - truth).abs().max() for t in (mine, reference))
            assert error <= 2 * torch_error + 1e-3 * truth.abs().max(), (k, error, torch_error)
        else:
            torch.testing.assert_close(mine, reference, **TOL[dtype])


@pytest.mark.parametrize("mode", list(KINDS))
@pytest.mark.parametrize("L", [2, 3])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", list(TOL), ids=["f64", "f32", "f16", "bf16"])
def test_training_matches_torch(mode, L, n_threads, dtype):
    torch.manual_seed(0)
    ref = torch_stack(mode, 5, 7, L, dtype)
    x = torch.randn(40, 3, 5, dtype=dtype)  # T=40: several blocks of steps per layer
    with threads(n_threads):
        assert_gradients_match(ref, x, initial_state(ref, 3, L, dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_training_overlapped_on_library_gemms(dtype):
    """As test_overlapped_layers_on_library_gemms, with every step saved for the backward."""
    torch.manual_seed(0)
    ref = torch_stack("LSTM", 128, 128, 2, dtype)
    with threads(2):
        assert_gradients_match(ref, torch.randn(12, 64, 128, dtype=dtype), initial_state(ref, 64, 2, dtype), dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("proj_size", [0, 3])
def test_training_lstm_bias_and_projection(bias, proj_size):
    ref = torch_stack("LSTM", 4, 6, 2, torch.float64, bias=bias, proj_size=proj_size)
    assert_gradients_match(ref, torch.randn(9, 2, 4, dtype=torch.float64), initial_state(ref, 2, 2, torch.float64),
                           torch.float64)


@pytest.mark.parametrize("mode", list(KINDS))
@pytest.mark.parametrize("n_threads", [1, 2])
def test_training_packed_matches_torch(mode, n_threads):
    ref = torch_stack(mode, 4, 6, 2, torch.float64)
    packed = pack_sequence([torch.randn(n, 4, dtype=torch.float64) for n in (7, 5, 5, 2)])
    with threads(n_threads):
        assert_gradients_match(ref, packed.data, initial_state(ref, 4, 2, torch.float64), torch.float64,
                               packed.batch_sizes)


def test_training_steps_without_rows_are_passed_on():
    """As test_steps_without_rows_are_passed_on, for the forward and the backward: the
    gradients are those of the same call without the empty steps."""
    ref = torch_stack("GRU", 3, 4, 2, torch.float64)
    x = torch.randn(3, 3, dtype=torch.float64)
    h0 = torch.randn(2, 2, 4, dtype=torch.float64)
    with threads(2):
        got = outputs_and_gradients(stack_function(ref, torch.tensor([2, 1, 0, 0])), leaves(ref, x, h0))
    expected = outputs_and_gradients(stack_function(ref, torch.tensor([2, 1])), leaves(ref, x, h0))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_training_gradcheck_and_double_backward(mode):
    ref = torch_stack(mode, 2, 3, 2, torch.float64, proj_size=2 if mode == "LSTM" else 0)
    inputs = [t for t in leaves(ref, torch.randn(4, 2, 2, dtype=torch.float64), initial_state(ref, 2, 2, torch.float64))
              if t is not None]
    f = stack_function(ref)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
    assert_recorded_backward_is_fused_backward(f, inputs)


def test_training_gradients_of_some_inputs_only():
    """Only the first layer's weights require grad: the others get none, and those
    requested are still torch's."""
    ref = torch_stack("LSTM", 3, 4, 2, torch.float64)
    x, h0, c0, *weights = leaves(ref, torch.randn(5, 2, 3, dtype=torch.float64), initial_state(ref, 2, 2, torch.float64))
    for w in (x, h0, c0, *weights[4:]):
        w.requires_grad_(False)
    y, h_n, c_n = stack_function(ref)(x, h0, c0, *weights)
    (y.sum() + c_n.sum()).backward()
    assert all(w.grad is None for w in weights[4:])
    ref_y, (_, ref_c) = ref(x, (h0, c0))
    (ref_y.sum() + ref_c.sum()).backward()
    for w, p in zip(weights[:4], ref.all_weights[0]):
        torch.testing.assert_close(w.grad, p.grad, **TOL[torch.float64])


@pytest.mark.parametrize("mode", list(KINDS))
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mask", [(True, True, True), (False, True, False), (True, False, True)])
def test_stack_backward_opcheck(mode, packed, mask):
    ref = torch_stack(mode, 3, 4, 2, torch.float64, proj_size=2 if mode == "LSTM" else 0).requires_grad_(False)
    batch_sizes = torch.tensor([3, 2, 2]) if packed else None
    x = torch.randn(7, 3, dtype=torch.float64) if packed else torch.randn(3, 3, 3, dtype=torch.float64)
    args = op_args(ref, x, initial_state(ref, 3, 2, torch.float64), batch_sizes)
    ys, h_n, c_n, saved, cells, hidden = torch.ops.lstm_ext.stack_forward(*args)
    x, h0, c0, weights, has_biases, has_projections, batch_sizes, mode = args
    grads = (torch.randn_like(ys[-1]), torch.randn_like(h_n), torch.randn_like(c_n) if c0 is not None else None)
    torch.library.opcheck(
        torch.ops.lstm_ext.stack_backward.default,
        (*grads, x, h0, c0, weights, has_biases, has_projections, batch_sizes, mode, ys, saved, cells, hidden,
         list(mask)),
    )


def test_stack_forward_checks_and_refuses_derivatives():
    ref = torch_stack("LSTM", 5, 6, 2, torch.float64)
    args = list(op_args(ref, torch.randn(4, 2, 5, dtype=torch.float64), initial_state(ref, 2, 2, torch.float64)))
    with pytest.raises(RuntimeError, match="stack_forward has no derivative"):
        torch.ops.lstm_ext.stack_forward(*args)
    args[3] = [w.detach() for w in args[3]][:-1]
    with pytest.raises(RuntimeError, match="lstm_ext.stack_forward: expected 4 weights per layer, but got 7"):
        torch.ops.lstm_ext.stack_forward(*args)


# ---------------------------------------------------------------- the modules' choice


def count_calls(monkeypatch, name):
    """Counts the modules' calls of torch.ops.lstm_ext.<name>: the list of their arguments."""
    calls = []
    op = getattr(torch.ops.lstm_ext, name)

    def counted(*args):
        calls.append(args)
        return op(*args)

    monkeypatch.setattr(torch.ops.lstm_ext, name, counted)
    return calls


@pytest.fixture
def stack_calls(monkeypatch):
    return count_calls(monkeypatch, "stack_inference")


@pytest.fixture
def training_calls(monkeypatch):
    return count_calls(monkeypatch, "stack_forward")


def ext_module(kind, **kwargs):
    module = getattr(lstm_ext, kind)(4, 6, **kwargs)
    ref = getattr(nn, kind)(4, 6, **kwargs)
    module.load_state_dict(ref.state_dict())
    return module, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_modules_take_it_for_inference(kind, num_layers, dtype, stack_calls):
    module, ref = ext_module(kind, num_layers=num_layers, dropout=0.3 if num_layers > 1 else 0.0)
    module.to(dtype).eval(), ref.to(dtype).eval()
    x = torch.randn(5, 3, 4, dtype=dtype)
    with torch.no_grad():
        got, expected = module(x), ref(x)
    assert len(stack_calls) == 1
    for g, e in zip(flat(got), flat(expected)):
        torch.testing.assert_close(g, e, **TOL[dtype])


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_modules_take_it_under_autocast(kind, num_layers, stack_calls):
    # The op casts as the layer ops do (the GRU not at all on CPU, like nn.GRU): the same
    # dtypes as torch's modules, and their values within bfloat16's precision.
    module, ref = ext_module(kind, num_layers=num_layers)
    x = torch.randn(5, 3, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = module(x), ref(x)
    assert len(stack_calls) == 1
    for g, e in zip(flat(got), flat(expected)):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g.float(), e.float(), **TOL[torch.bfloat16])


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_modules_take_stack_forward_for_training(kind, packed, training_calls):
    module, ref = ext_module(kind, num_layers=2, dropout=0.3)
    module.eval(), ref.eval()  # dropout out of effect
    seqs = [torch.randn(n, 4) for n in (5, 4, 2)]
    x = pack_sequence(seqs) if packed else torch.randn(5, 3, 4, requires_grad=True)
    outputs = []
    for m in (module, ref):
        m.zero_grad()
        y, hx = m(x)
        y = y.data if packed else y
        hs = hx if isinstance(hx, tuple) else (hx,)
        (y.square().sum() + sum(h.sum() for h in hs)).backward()
        outputs.append([y, *hs, *(p.grad for p in m.parameters())])
    assert len(training_calls) == 1
    for g, e in zip(*outputs):
        torch.testing.assert_close(g, e, **TOL[torch.float32])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_modules_take_stack_forward_under_autocast(kind, training_calls):
    # The module casts the op's inputs as the layer ops' autocast kernels do (the GRU not at
    # all on CPU, like nn.GRU), by ops that autograd records: torch's dtypes, its values
    # within bfloat16's precision, and float32 gradients for the float32 parameters.
    module, ref = ext_module(kind, num_layers=2)
    x = torch.randn(5, 3, 4, requires_grad=True)
    results = []
    for m in (module, ref):
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, hx = m(x)
        hs = hx if isinstance(hx, tuple) else (hx,)
        (y.float().square().sum() + sum(h.float().sum() for h in hs)).backward()
        results.append([y, *hs, x.grad, *(p.grad for p in m.parameters())])
    assert len(training_calls) == 1
    for g, e in zip(*results):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g.float(), e.float(), **TOL[torch.bfloat16])


@pytest.mark.parametrize(
    "op, kwargs, setup",
    [
        ("stack_inference", dict(num_layers=2, bidirectional=True), "no_grad"),
        ("stack_inference", dict(num_layers=2, dropout=0.5), "no_grad, training"),
        ("stack_inference", dict(num_layers=2), "grad"),
        ("stack_inference", dict(num_layers=2), "grad, autocast"),
        ("stack_forward", dict(num_layers=1), "grad"),
        ("stack_forward", dict(num_layers=2, bidirectional=True), "grad"),
        ("stack_forward", dict(num_layers=2, dropout=0.5), "grad, training"),
        ("stack_forward", dict(num_layers=2), "no_grad"),
    ],
)
def test_modules_skip_the_stack_ops_where_they_do_not_serve(op, kwargs, setup, monkeypatch):
    calls = count_calls(monkeypatch, op)
    module, _ = ext_module("LSTM", **kwargs)
    module.train("training" in setup)
    x = torch.randn(5, 3, 4)
    grad = contextlib.nullcontext() if setup.startswith("grad") else torch.no_grad()
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if "autocast" in setup else contextlib.nullcontext()
    with grad, cast:
        module(x)
    assert calls == []
