"""stack_inference, the whole-stack inference op (layers overlapped in time on CPU threads),
against nn.LSTM / nn.GRU / nn.RNN, and the modules' choice of it."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import lstm_ext

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


@pytest.mark.parametrize("mode", list(KINDS))
@pytest.mark.parametrize("packed", [False, True])
def test_opcheck(mode, packed):
    ref = torch_stack(mode, 3, 4, 2, torch.float64).requires_grad_(False)
    batch_sizes = torch.tensor([3, 2, 2]) if packed else None
    x = torch.randn(7, 3, dtype=torch.float64) if packed else torch.randn(3, 3, 3, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.lstm_ext.stack_inference.default, op_args(ref, x, initial_state(ref, 3, 2, torch.float64),
                                                            batch_sizes)
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


# ---------------------------------------------------------------- the modules' choice


@pytest.fixture
def stack_calls(monkeypatch):
    """Counts the modules' calls of stack_inference."""
    calls = []
    op = torch.ops.lstm_ext.stack_inference

    def counted(*args):
        calls.append(args)
        return op(*args)

    monkeypatch.setattr(torch.ops.lstm_ext, "stack_inference", counted)
    return calls


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


@pytest.mark.parametrize(
    "kwargs, setup",
    [
        (dict(num_layers=2, bidirectional=True), "no_grad"),
        (dict(num_layers=2, dropout=0.5), "no_grad, training"),
        (dict(num_layers=2), "grad"),
        (dict(num_layers=2), "grad, autocast"),
    ],
)
def test_modules_skip_it_where_it_does_not_serve(kwargs, setup, stack_calls):
    module, _ = ext_module("LSTM", **kwargs)
    module.train("training" in setup)
    x = torch.randn(5, 3, 4)
    grad = contextlib.nullcontext() if setup.startswith("grad") else torch.no_grad()
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if "autocast" in setup else contextlib.nullcontext()
    with grad, cast:
        module(x)
    assert stack_calls == []
