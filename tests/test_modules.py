"""lstm_ext.LSTM and lstm_ext.LSTMCell against torch.nn.LSTM and nn.LSTMCell."""
from __future__ import annotations

import copy
import io
from typing import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from autograd_checks import assert_compiled_step_matches
from lstm_ext.modules import LSTM, LSTMCell

# Relative tolerance; absolute errors are allowed up to the same fraction of the
# tensor's largest magnitude (gradients summed over long or saturated sequences).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
I, H, P, T, N = 4, 5, 3, 6, 3


def make_pair(
    ref_type: type[nn.Module] = nn.LSTM, dtype: torch.dtype = torch.float64, **config
) -> tuple[nn.Module, nn.Module]:
    """A torch module and its lstm_ext twin holding the same weights (via state_dict)."""
    ext_type = {nn.LSTM: LSTM, nn.LSTMCell: LSTMCell}[ref_type]
    ref = ref_type(**config, dtype=dtype)
    ext = ext_type(**config, dtype=dtype)
    ext.load_state_dict(ref.state_dict())
    return ref, ext


def run(module: nn.Module, leaves: list[Tensor], build: Callable) -> dict[str, Tensor]:
    """Forward ``build(*leaves)`` through ``module``, backward a random projection of
    every output, and return outputs plus the gradients of the leaves and parameters."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    module.zero_grad(set_to_none=True)
    out = module(*build(*leaves))
    if isinstance(getattr(module, "module", module), (nn.LSTM, LSTM)):  # also in DataParallel
        y, (h, c) = out
        results = {"y": y.data if isinstance(y, PackedSequence) else y, "h": h, "c": c}
    else:
        results = {"h": out[0], "c": out[1]}
    gen = torch.Generator().manual_seed(1)
    loss = sum((v * torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device)).sum()
               for v in results.values())
    loss.backward()
    results.update({f"grad_leaf{i}": t.grad for i, t in enumerate(leaves)})
    results.update({f"grad_{n}": p.grad for n, p in module.named_parameters()})
    return results


def assert_same(ref: dict[str, Tensor], ext: dict[str, Tensor], dtype: torch.dtype) -> None:
    assert ref.keys() == ext.keys()
    for key in ref:
        assert (ref[key] is None) == (ext[key] is None), key
        if ref[key] is not None:
            assert not ext[key].isnan().any(), key
            close(ext[key], ref[key], dtype, key)


def close(got, expected, dtype: torch.dtype = torch.float64, what: str = "") -> None:
    """assert_close with TOL, elementwise or relative to the largest |expected|."""
    if isinstance(expected, (tuple, list)):
        assert len(got) == len(expected), what
        for i, (g, e) in enumerate(zip(got, expected)):
            close(g, e, dtype, f"{what}[{i}]")
        return
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        got, expected, rtol=TOL[dtype], atol=TOL[dtype] * scale, msg=lambda m: f"{what}: {m}"
    )


def check_parity(ref, ext, leaves, build, dtype=torch.float64) -> dict[str, Tensor]:
    expected = run(ref, leaves, build)
    got = run(ext, leaves, build)
    assert_same(expected, got, dtype)
    return got


def rand(*shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, dtype=dtype)


# --------------------------------------------------------------------------- LSTM parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("given_hx", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("proj_size", [0, P], ids=["noproj", "proj"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tf", "bf"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_lstm_parity(num_layers, bidirectional, batch_first, bias, proj_size, given_hx, dtype):
    ref, ext = make_pair(
        dtype=dtype, input_size=I, hidden_size=H, num_layers=num_layers, bias=bias,
        batch_first=batch_first, bidirectional=bidirectional, proj_size=proj_size,
    )
    rows = num_layers * (2 if bidirectional else 1)
    x = rand(N, T, I, dtype=dtype) if batch_first else rand(T, N, I, dtype=dtype)
    leaves = [x]
    if given_hx:
        leaves += [rand(rows, N, proj_size or H, dtype=dtype), rand(rows, N, H, dtype=dtype)]
    got = check_parity(ref, ext, leaves, lambda x, *hx: (x, tuple(hx) or None), dtype)
    out = proj_size or H
    assert got["y"].shape == ((N, T) if batch_first else (T, N)) + (out * rows // num_layers,)
    assert got["h"].shape == (rows, N, out) and got["c"].shape == (rows, N, H)


@pytest.mark.parametrize("given_hx", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tf", "bf"])
@pytest.mark.parametrize("bidirectional,proj_size", [(False, 0), (True, 0), (True, P)])
def test_lstm_unbatched(bidirectional, proj_size, batch_first, given_hx):
    ref, ext = make_pair(
        input_size=I, hidden_size=H, num_layers=2, bidirectional=bidirectional,
        proj_size=proj_size, batch_first=batch_first,
    )
    rows = 2 * (2 if bidirectional else 1)
    leaves = [rand(T, I)]
    if given_hx:
        leaves += [rand(rows, proj_size or H), rand(rows, H)]
    got = check_parity(ref, ext, leaves, lambda x, *hx: (x, tuple(hx) or None))
    assert got["y"].dim() == 2 and got["h"].shape == (rows, proj_size or H)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("given_hx", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize(
    "num_layers,bidirectional,proj_size", [(1, False, 0), (2, True, 0), (2, True, P), (3, False, P)]
)
def test_lstm_packed(num_layers, bidirectional, proj_size, enforce_sorted, given_hx, dtype):
    ref, ext = make_pair(
        dtype=dtype, input_size=I, hidden_size=H, num_layers=num_layers,
        bidirectional=bidirectional, proj_size=proj_size,
    )
    # Mixed lengths with a tie and a length-1 row; sorted order needed for enforce_sorted.
    lengths = [6, 6, 4, 2, 1] if enforce_sorted else [4, 6, 1, 6, 2]
    rows = num_layers * (2 if bidirectional else 1)
    leaves = [rand(6, len(lengths), I, dtype=dtype)]
    if given_hx:
        leaves += [rand(rows, len(lengths), proj_size or H, dtype=dtype),
                   rand(rows, len(lengths), H, dtype=dtype)]

    def build(x, *hx):
        return pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted), tuple(hx) or None

    check_parity(ref, ext, leaves, build, dtype)
    packed, _ = ext(build(*leaves)[0])
    expected, _ = ref(build(*leaves)[0])
    assert torch.equal(packed.batch_sizes, expected.batch_sizes)
    for field in ("sorted_indices", "unsorted_indices"):
        a, b = getattr(packed, field), getattr(expected, field)
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("bidirectional,proj_size", [(False, 0), (True, 0), (True, P)])
def test_lstm_no_grad_parity(bidirectional, proj_size, packed, dtype):
    """Under no_grad the layers run the lstm_inference op (no saved state): same outputs."""
    ref, ext = make_pair(
        dtype=dtype, input_size=I, hidden_size=H, num_layers=2, bidirectional=bidirectional,
        proj_size=proj_size, batch_first=True,
    )
    rows = 2 * (2 if bidirectional else 1)
    x = rand(5, 20, I, dtype=dtype)
    hx = (rand(rows, 5, proj_size or H, dtype=dtype), rand(rows, 5, H, dtype=dtype))
    inp = pack_padded_sequence(x, [7, 20, 1, 13, 20], batch_first=True, enforce_sorted=False) if packed else x
    with torch.no_grad():
        (y_ref, (h_ref, c_ref)), (y, (h, c)) = ref(inp, hx), ext(inp, hx)
    if packed:
        y_ref, y = y_ref.data, y.data
    close(y, y_ref, dtype, "y")
    close(h, h_ref, dtype, "h")
    close(c, c_ref, dtype, "c")


@pytest.mark.parametrize("given_hx", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tf", "bf"])
@pytest.mark.parametrize("bidirectional,proj_size", [(False, 0), (True, P)])
def test_lstm_empty_batch(bidirectional, proj_size, batch_first, given_hx):
    ref, ext = make_pair(
        input_size=I, hidden_size=H, num_layers=2, bidirectional=bidirectional,
        proj_size=proj_size, batch_first=batch_first,
    )
    rows = 2 * (2 if bidirectional else 1)
    leaves = [rand(0, T, I) if batch_first else rand(T, 0, I)]
    if given_hx:
        leaves += [rand(rows, 0, proj_size or H), rand(rows, 0, H)]
    got = check_parity(ref, ext, leaves, lambda x, *hx: (x, tuple(hx) or None))
    assert got["y"].shape[-1] == (proj_size or H) * (2 if bidirectional else 1)
    assert got["h"].shape == (rows, 0, proj_size or H) and got["c"].shape == (rows, 0, H)


@pytest.mark.parametrize("batch_first", [False, True], ids=["tf", "bf"])
@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_lstm_non_contiguous(layout, batch_first):
    ref, ext = make_pair(
        input_size=I, hidden_size=H, num_layers=2, bidirectional=True, batch_first=batch_first
    )
    if layout == "transposed":
        leaves = [rand(T, N, I) if batch_first else rand(N, T, I), rand(N, 4, H), rand(N, 4, H)]

        def build(x, h, c):
            return x.transpose(0, 1), (h.transpose(0, 1), c.transpose(0, 1))
    else:
        x = rand(N, T, 2 * I) if batch_first else rand(T, N, 2 * I)
        leaves = [x, rand(4, N, 2 * H), rand(4, N, 2 * H)]

        def build(x, h, c):
            return x[..., ::2], (h[..., 1::2], c[..., ::2])

    assert not build(*leaves)[0].is_contiguous()
    check_parity(ref, ext, leaves, build)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_lstm_long_sequence(dtype):
    ref, ext = make_pair(dtype=dtype, input_size=3, hidden_size=4, bidirectional=True)
    leaves = [rand(2000, 2, 3, dtype=dtype), rand(2, 2, 4, dtype=dtype), rand(2, 2, 4, dtype=dtype)]
    check_parity(ref, ext, leaves, lambda x, h, c: (x, (h, c)), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("scale", [1e2, 1e4, 1e8])
def test_lstm_extreme_inputs(scale, dtype):
    ref, ext = make_pair(dtype=dtype, input_size=I, hidden_size=H, num_layers=2, proj_size=P)
    with torch.no_grad():  # large weights too, so the gates saturate both ways
        for r, e in zip(ref.parameters(), ext.parameters()):
            r.mul_(10)
            e.copy_(r)
    leaves = [rand(T, N, I, dtype=dtype) * scale, rand(2, N, P, dtype=dtype) * scale,
              rand(2, N, H, dtype=dtype) * scale]
    got = check_parity(ref, ext, leaves, lambda x, h, c: (x, (h, c)), dtype)
    assert all(torch.isfinite(v).all() for v in got.values())


def test_lstm_same_init_as_torch():
    for config in [dict(), dict(num_layers=3, bidirectional=True, proj_size=2), dict(bias=False)]:
        torch.manual_seed(7)
        ref = nn.LSTM(I, H, **config)
        after_ref = torch.rand(3)
        torch.manual_seed(7)
        ext = LSTM(I, H, **config)
        assert torch.equal(torch.rand(3), after_ref)  # same number of RNG draws
        ref_params, ext_params = dict(ref.named_parameters()), dict(ext.named_parameters())
        assert list(ref_params) == list(ext_params)
        for name in ref_params:
            assert torch.equal(ref_params[name], ext_params[name]), name
        assert [[p.shape for p in g] for g in ref.all_weights] == [
            [p.shape for p in g] for g in ext.all_weights
        ]


@pytest.mark.parametrize("direction", ["torch_to_ext", "ext_to_torch"])
def test_lstm_state_dict_round_trip(direction):
    config = dict(input_size=I, hidden_size=H, num_layers=2, bidirectional=True, proj_size=P)
    src, dst = (nn.LSTM(**config), LSTM(**config))
    if direction == "ext_to_torch":
        src, dst = dst, src
    state = src.state_dict()
    dst.load_state_dict(state, strict=True)
    assert list(dst.state_dict()) == list(state)
    x = torch.randn(T, N, I)
    y_src, (h_src, c_src) = src(x)
    y_dst, (h_dst, c_dst) = dst(x)
    for a, b in [(y_src, y_dst), (h_src, h_dst), (c_src, c_dst)]:
        close(a, b, torch.float32)


# --------------------------------------------------------------------------- LSTM errors


def _hx(rows=2, n=N, h=H, c=H, dims=3, dtype=torch.float32):
    shape = (rows, n) if dims == 3 else (rows,)
    return torch.zeros(*shape, h, dtype=dtype), torch.zeros(*shape, c, dtype=dtype)


def _packed(feature=I, dtype=torch.float32, enforce_sorted=False):
    lengths = (6, 4, 2) if enforce_sorted else (6, 2, 4)
    x = torch.randn(T, N, feature, dtype=dtype)
    return pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)


# (id, call, nn.LSTM's message equals ours exactly, key words of our message)
LSTM_ERRORS = [
    ("1d_input", lambda m: m(torch.randn(I)), True, ["2D or 3D", "1D"]),
    ("4d_input", lambda m: m(torch.randn(1, T, N, I)), True, ["2D or 3D", "4D"]),
    ("input_size", lambda m: m(torch.randn(T, N, I + 1)), True, ["input_size", "Expected 4, got 5"]),
    ("input_dtype", lambda m: m(torch.randn(T, N, I).double()), True, ["dtype", "float64", "float32"]),
    ("h_shape", lambda m: m(torch.randn(T, N, I), _hx(h=H + 1)), True, ["hidden[0]", "(2, 3, 5)"]),
    ("c_shape", lambda m: m(torch.randn(T, N, I), _hx(c=H + 1)), True, ["hidden[1]", "(2, 3, 5)"]),
    ("hx_layers", lambda m: m(torch.randn(T, N, I), _hx(rows=1)), True, ["hidden[0]", "[1, 3, 5]"]),
    ("hx_batch", lambda m: m(torch.randn(T, N, I), _hx(n=N + 1)), True, ["hidden[0]", "[2, 4, 5]"]),
    ("2d_hx_3d_input", lambda m: m(torch.randn(T, N, I), _hx(dims=2)), True, ["3-D", "(2-D, 2-D)"]),
    ("3d_hx_2d_input", lambda m: m(torch.randn(T, I), _hx(n=1)), True, ["2-D", "(3-D, 3-D)"]),
    ("hx_not_tuple", lambda m: m(torch.randn(T, N, I), torch.zeros(2, N, H)), True, ["3-D"]),
    ("empty_sequence", lambda m: m(torch.randn(0, N, I)), True, ["sequence length", "0"]),
    ("empty_unbatched", lambda m: m(torch.randn(0, I)), True, ["sequence length", "0"]),
    ("hx_dtype", lambda m: m(torch.randn(T, N, I), _hx(dtype=torch.float64)), False, ["hidden[0]", "float64"]),
    ("packed_input_size", lambda m: m(_packed(feature=I + 1)), False, ["input_size", "got 5"]),
    ("packed_dtype", lambda m: m(_packed(dtype=torch.float64)), False, ["dtype", "float64"]),
    # Sorted: for unsorted input nn.LSTM index_selects hx first and so accepts extra rows.
    ("packed_h_batch", lambda m: m(_packed(enforce_sorted=True), _hx(n=N + 1)), False,
     ["hidden[0]", "(2, 3, 5)"]),
    ("packed_h_shape", lambda m: m(_packed(), _hx(h=H + 1)), False, ["hidden[0]", "(2, 3, 5)"]),
    ("packed_c_shape", lambda m: m(_packed(), _hx(c=H + 1)), False, ["hidden[1]", "(2, 3, 5)"]),
]


@pytest.mark.parametrize("call,exact,words", [e[1:] for e in LSTM_ERRORS], ids=[e[0] for e in LSTM_ERRORS])
def test_lstm_forward_errors(call, exact, words):
    ref, ext = make_pair(dtype=torch.float32, input_size=I, hidden_size=H, num_layers=2)
    with pytest.raises(Exception) as expected:
        call(ref)
    with pytest.raises(expected.type) as got:
        call(ext)
    assert type(got.value) is expected.type  # pytest.raises also accepts subclasses
    message = str(got.value)
    if exact:
        assert message == str(expected.value)
    for word in words:
        assert word in message


# (kwargs, nn.LSTM's message equals ours exactly, key words of our message). For
# non-int num_layers/proj_size nn.LSTM fails later, inside range()/torch.empty, with a
# message about that call; ours names the argument (same type).
@pytest.mark.parametrize(
    "kwargs,exact,words",
    [
        (dict(dropout=-0.1), True, ["dropout", "[0, 1]"]),
        (dict(dropout=1.5), True, ["dropout", "[0, 1]"]),
        (dict(dropout=True), True, ["dropout", "[0, 1]"]),
        (dict(dropout="0.1"), True, ["dropout", "[0, 1]"]),
        (dict(bias=1), True, ["bias", "bool", "int"]),
        (dict(batch_first=None), True, ["batch_first", "bool"]),
        (dict(input_size=0), True, ["input_size", "greater than zero"]),
        (dict(input_size=2.0), True, ["input_size", "int", "float"]),
        (dict(hidden_size=-1), True, ["hidden_size", "greater than zero"]),
        (dict(hidden_size="5"), True, ["hidden_size", "int", "str"]),
        (dict(num_layers=0), True, ["num_layers", "greater than zero"]),
        (dict(num_layers=1.5), False, ["num_layers", "int", "float"]),
        (dict(proj_size=-1), True, ["proj_size", "zero"]),
        (dict(proj_size=H), True, ["proj_size", "smaller than hidden_size"]),
        (dict(proj_size=1.5), False, ["proj_size", "int", "float"]),
    ],
)
def test_lstm_constructor_errors(kwargs, exact, words):
    config = {"input_size": I, "hidden_size": H, **kwargs}
    with pytest.raises(Exception) as expected:
        nn.LSTM(**config)
    with pytest.raises(expected.type) as got:
        LSTM(**config)
    assert type(got.value) is expected.type  # pytest.raises also accepts subclasses
    if exact:
        assert str(got.value) == str(expected.value)
    for word in words:
        assert word in str(got.value)


def test_lstm_dropout_warning_for_one_layer():
    with pytest.warns(UserWarning, match="num_layers greater than 1.*dropout=0.5") as record:
        LSTM(I, H, dropout=0.5)
    assert record[0].filename == __file__  # points at the caller, not at lstm_ext


# --------------------------------------------------------------------------- LSTM dropout


def test_lstm_dropout_between_layers_only_in_training():
    ref, ext = make_pair(input_size=I, hidden_size=H, num_layers=2, dropout=1.0, bidirectional=True)
    x = rand(T, N, I)
    # p=1 zeroes all of layer 0's output: deterministic, and equal to nn.LSTM's.
    for mode in (True, False):
        ref.train(mode), ext.train(mode)
        for a, b in zip(ref(x)[1], ext(x)[1]):
            close(b, a, torch.float64)
    ext.train()
    y_drop = ext(x)[0]
    assert not torch.allclose(y_drop, ext.eval()(x)[0])


def test_lstm_dropout_random_mask():
    ext = LSTM(I, H, num_layers=2, dropout=0.5, dtype=torch.float64).train()
    x = rand(T, N, I)
    torch.manual_seed(0)
    first = ext(x)[0]
    assert not torch.equal(first, ext(x)[0])  # a fresh mask per call
    torch.manual_seed(0)
    assert torch.equal(first, ext(x)[0])  # drawn from the global RNG


def test_lstm_no_dropout_after_last_layer():
    with pytest.warns(UserWarning):
        ref, ext = make_pair(input_size=I, hidden_size=H, dropout=1.0)
    x = rand(T, N, I)
    ext.train()
    close(ext(x)[0], ref.eval()(x)[0], torch.float64)


# --------------------------------------------------------------------------- module behaviour


@pytest.mark.parametrize(
    "config",
    [dict(), dict(num_layers=2, bias=False, batch_first=True, dropout=0.25, bidirectional=True,
                  proj_size=2)],
)
def test_lstm_repr_matches_torch(config):
    assert repr(LSTM(I, H, **config)) == repr(nn.LSTM(I, H, **config))


def test_lstm_flatten_parameters_is_noop():
    ext = LSTM(I, H, num_layers=2)
    before = {n: p.clone() for n, p in ext.named_parameters()}
    ptrs = [p.data_ptr() for p in ext.parameters()]
    assert ext.flatten_parameters() is None
    assert ptrs == [p.data_ptr() for p in ext.parameters()]
    assert all(torch.equal(before[n], p) for n, p in ext.named_parameters())


def test_lstm_to_double():
    ref, ext = make_pair(dtype=torch.float32, input_size=I, hidden_size=H, num_layers=2, proj_size=P)
    ref.double(), ext.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in ext.parameters())
    check_parity(ref, ext, [rand(T, N, I)], lambda x: (x,))


@pytest.mark.cuda
def test_lstm_cuda():
    """On CUDA: nn.LSTM's outputs and gradients, as computed on the CPU (float64)."""
    ref, ext = make_pair(input_size=I, hidden_size=H, num_layers=2, bidirectional=True, proj_size=P)
    ext.cuda()
    assert all(p.is_cuda for p in ext.parameters())
    leaves = [rand(T, N, I), rand(4, N, P), rand(4, N, H)]

    def build(x, h, c):
        return x, (h, c)

    expected = run(ref, leaves, build)
    got = run(ext, [t.cuda() for t in leaves], build)
    assert all(v.is_cuda for v in got.values())
    assert_same(expected, {k: v.cpu() for k, v in got.items()}, torch.float64)


def test_lstm_autocast_cpu():
    ref, ext = make_pair(dtype=torch.float32, input_size=I, hidden_size=H, num_layers=2)
    x = torch.randn(T, N, I)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = ref(x), ext(x)
    assert got[0].dtype == expected[0].dtype == torch.bfloat16
    # bfloat16 keeps 8 bits: |y| < 0.3 here and is off by about 1e-3.
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=5e-3)
    # Gradients come back to the float32 weights through the casts. Some are as small as
    # 0.15 (weight_hh_l0) and off by at most 3e-3; atol=0.1 let weight_hh grads 10% off pass.
    got[0].float().sum().backward()
    expected[0].float().sum().backward()
    for p_ext, p_ref in zip(ext.parameters(), ref.parameters()):
        assert p_ext.grad.dtype == torch.float32
        torch.testing.assert_close(p_ext.grad, p_ref.grad, rtol=2e-2, atol=1e-2)


def _outputs_equal(a: nn.Module, b: nn.Module) -> None:
    x = rand(T, N, I)
    (ya, (ha, ca)), (yb, (hb, cb)) = a(x), b(x)
    assert torch.equal(ya, yb) and torch.equal(ha, hb) and torch.equal(ca, cb)


def test_lstm_deepcopy():
    ext = LSTM(I, H, num_layers=2, bidirectional=True, dtype=torch.float64)
    clone = copy.deepcopy(ext)
    assert all(p is not q for p, q in zip(ext.parameters(), clone.parameters()))
    _outputs_equal(ext, clone)


def test_lstm_save_load_whole_module():
    ext = LSTM(I, H, num_layers=2, proj_size=P, batch_first=True, dtype=torch.float64)
    buffer = io.BytesIO()
    torch.save(ext, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is LSTM and repr(loaded) == repr(ext)
    _outputs_equal(ext, loaded)


def test_lstm_functional_call_with_swapped_weights():
    ref, ext = make_pair(input_size=I, hidden_size=H, num_layers=2, bidirectional=True, proj_size=P)
    swapped = {n: torch.randn_like(p) for n, p in ref.named_parameters()}
    x = rand(T, N, I)
    expected = torch.func.functional_call(ref, swapped, (x,))
    got = torch.func.functional_call(ext, swapped, (x,))
    close(got, expected, torch.float64)
    assert not torch.allclose(ext(x)[0], got[0])  # the swapped weights were used


class _Doubled(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return 2 * w


@pytest.mark.parametrize("no_grad", [False, True], ids=["grad", "no_grad"])
def test_lstm_weights_replaced_after_construction(no_grad):
    """Every way of replacing a weight reaches the kernels, in the per-layer path and in
    the one-op stack that inference takes: a parametrization (its property replaces the
    parameter), a new Parameter, and functional_call's swapped tensors."""
    ref, ext = make_pair(input_size=I, hidden_size=H, num_layers=2)
    x = rand(T, N, I)
    context = torch.no_grad if no_grad else torch.enable_grad
    for module in (ref, ext):
        nn.utils.parametrize.register_parametrization(module, "weight_hh_l1", _Doubled())
    with context():
        close(ext(x), ref(x), torch.float64)
    new_weight = rand(4 * H, I)
    for module in (ref, ext):
        module.weight_ih_l0 = nn.Parameter(new_weight.clone())
    with context():
        close(ext(x), ref(x), torch.float64)
        swapped = {"weight_hh_l0": rand(4 * H, H)}
        expected = torch.func.functional_call(ref, swapped, (x,))
        got = torch.func.functional_call(ext, swapped, (x,))
        close(got, expected, torch.float64)
        assert not torch.allclose(ext(x)[0], got[0])  # the swapped weight was used


@pytest.mark.skipif(torch.cuda.is_available(), reason="DataParallel then needs the module on a GPU")
def test_lstm_data_parallel_without_gpus():
    """Without GPUs DataParallel just calls the module: nn.LSTM's results, also wrapped."""
    ref, ext = make_pair(input_size=I, hidden_size=H, num_layers=2, bidirectional=True, batch_first=True)
    check_parity(nn.DataParallel(ref, dim=0), nn.DataParallel(ext, dim=0), [rand(N, T, I)],
                 lambda x: (x,))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA devices")
def test_lstm_data_parallel_multi_gpu():
    """DataParallel scatters the batch (dim 0, batch_first) over the GPUs and runs a replica
    on each: outputs, and the gradients reduced onto the module's parameters, are nn.LSTM's
    on the whole batch (float64 on the CPU)."""
    k = torch.cuda.device_count()
    ref, ext = make_pair(input_size=I, hidden_size=H, num_layers=2, bidirectional=True, batch_first=True)
    ext.cuda()
    x = rand(2 * k, T, I)
    expected = ref(x)
    y, (h, c) = nn.DataParallel(ext, dim=0)(x.cuda())
    assert y.device == torch.device("cuda", 0)
    # The replicas' (h, c), batch in dim 1, come back stacked along dim 0: regroup them.
    got = (y.cpu(), tuple(torch.cat(t.cpu().chunk(k), dim=1) for t in (h, c)))
    close(got, expected, torch.float64, "outputs")
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (expected[0], *expected[1])]
    sum((t * w).sum() for t, w in zip((expected[0], *expected[1]), weights)).backward()
    sum((t * w).sum() for t, w in zip((got[0], *got[1]), weights)).backward()
    for (name, p), q in zip(ext.named_parameters(), ref.parameters()):
        close(p.grad.cpu(), q.grad, torch.float64, name)


def test_lstm_is_not_an_nn_lstm():
    # Documented: deriving from nn.LSTM would make TorchDynamo graph-break.
    assert not isinstance(LSTM(I, H), nn.LSTM)


# --------------------------------------------------------------------------- compile, gradcheck


class _Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True, proj_size=P)
        self.head = nn.Linear(2 * P, 2)

    def forward(self, x: Tensor) -> Tensor:
        y, (h, c) = self.lstm(x)
        return self.head(y).sum() + h.square().sum() + c.mean()


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_lstm_compile_fullgraph(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Tagger()
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fails on a graph break
    for steps in (T, T + 3):  # the second length recompiles with a dynamic one
        assert_compiled_step_matches(model, compiled, torch.randn(N, steps, I), close)


def test_lstm_compile_fullgraph_no_grad():
    """Inference traces the lstm_inference op (no autograd) without graph breaks."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Tagger().eval()
    traced = []

    def backend(gm, example_inputs):  # aot_eager, noting the ops Dynamo traced
        traced.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(N, T, I)
    with torch.no_grad():
        close(compiled(x), model(x), torch.float32)
    # Both ops give the same outputs; only the graph shows which one was traced.
    layers = [t.split(".")[1] for t in traced if t.startswith("lstm_ext.")]  # op (.overload)
    assert layers == ["lstm_inference"] * 4, traced  # 2 layers x 2 directions


def _functional(module: nn.Module) -> tuple[Callable, tuple[Tensor, ...]]:
    """``module`` as a function of (x, h0, c0, *parameters), with those inputs."""
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in module.parameters())

    def f(x, h0, c0, *flat):
        y, (h, c) = torch.func.functional_call(module, dict(zip(names, flat)), (x, (h0, c0)))
        return y, h, c

    return f, params


def test_lstm_gradcheck():
    torch.manual_seed(0)
    ext = LSTM(2, 3, num_layers=2, bidirectional=True, dtype=torch.float64)
    f, params = _functional(ext)
    inputs = tuple(t.requires_grad_() for t in (rand(3, 2, 2), rand(4, 2, 3), rand(4, 2, 3)))
    assert torch.autograd.gradcheck(f, inputs + params)


def test_lstm_gradgradcheck():
    torch.manual_seed(0)
    ext = LSTM(2, 3, proj_size=2, dtype=torch.float64)
    f, params = _functional(ext)
    inputs = tuple(t.requires_grad_() for t in (rand(3, 2, 2), rand(1, 2, 2), rand(1, 2, 3)))
    assert torch.autograd.gradgradcheck(f, inputs + params)
    # gradgradcheck differentiates the create_graph backward against itself; its first
    # derivative must also be the fused backward's (which gradcheck checks).
    outputs = f(*inputs, *params)
    grad_outputs = [torch.randn_like(o) for o in outputs]
    fused = torch.autograd.grad(outputs, inputs + params, grad_outputs, retain_graph=True)
    recorded = torch.autograd.grad(outputs, inputs + params, grad_outputs, create_graph=True)
    close(recorded, fused, torch.float64, "create_graph gradients")


# --------------------------------------------------------------------------- LSTMCell


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("given_hx", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("batch", [None, 0, N], ids=["unbatched", "empty", "batched"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cell_parity(bias, batch, given_hx, dtype):
    ref, ext = make_pair(nn.LSTMCell, dtype=dtype, input_size=I, hidden_size=H, bias=bias)
    lead = () if batch is None else (batch,)
    leaves = [rand(*lead, I, dtype=dtype)]
    if given_hx:
        leaves += [rand(*lead, H, dtype=dtype), rand(*lead, H, dtype=dtype)]
    got = check_parity(ref, ext, leaves, lambda x, *hx: (x, tuple(hx) or None), dtype)
    assert got["h"].shape == lead + (H,) and got["c"].shape == lead + (H,)


def test_cell_same_init_and_state_dict():
    for bias in (True, False):
        torch.manual_seed(3)
        ref = nn.LSTMCell(I, H, bias=bias)
        torch.manual_seed(3)
        ext = LSTMCell(I, H, bias=bias)
        assert list(ref.state_dict()) == list(ext.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), ext.parameters()))
        assert repr(ref) == repr(ext)
        ref.load_state_dict(ext.state_dict())
        ext.load_state_dict(ref.state_dict())
    assert ext.bias_ih is None and ext.bias_hh is None


def _cell_hx(n=N, h=H, c=H, dims=2, dtype=torch.float32):
    lead = (n,) if dims == 2 else () if dims == 1 else (1, n)
    return torch.zeros(*lead, h, dtype=dtype), torch.zeros(*lead, c, dtype=dtype)


CELL_ERRORS = [
    ("0d_input", lambda m: m(torch.tensor(1.0)), True, ["1D or 2D", "0D"]),
    ("3d_input", lambda m: m(torch.randn(1, N, I)), True, ["1D or 2D", "3D"]),
    ("3d_hx", lambda m: m(torch.randn(N, I), _cell_hx(dims=3)), True, ["hx[0]", "3D"]),
    ("input_size", lambda m: m(torch.randn(N, I + 1)), True, ["input_size", "got 5 expected 4"]),
    ("input_size_1d", lambda m: m(torch.randn(I + 1)), True, ["input_size", "got 5 expected 4"]),
    ("h_size", lambda m: m(torch.randn(N, I), _cell_hx(h=H + 1)), True, ["hidden0", "got 6, expected 5"]),
    ("c_size", lambda m: m(torch.randn(N, I), _cell_hx(c=H + 1)), True, ["hidden1", "got 6, expected 5"]),
    ("h_batch", lambda m: m(torch.randn(N, I), (torch.zeros(N + 1, H), torch.zeros(N, H))), True,
     ["batch size 3", "hidden0 batch size 4"]),
    ("c_batch", lambda m: m(torch.randn(N, I), (torch.zeros(N, H), torch.zeros(N + 1, H))), True,
     ["batch size 3", "hidden1 batch size 4"]),
    ("2d_hx_1d_input", lambda m: m(torch.randn(I), _cell_hx(n=1)), False, ["1-D", "(2-D, 2-D)"]),
    ("1d_hx_2d_input", lambda m: m(torch.randn(1, I), _cell_hx(dims=1)), False, ["2-D", "(1-D, 1-D)"]),
    ("input_dtype", lambda m: m(torch.randn(N, I).double()), False, ["dtype", "float64"]),
    ("hx_dtype", lambda m: m(torch.randn(N, I), _cell_hx(dtype=torch.float64)), False, ["dtype", "float64"]),
]


@pytest.mark.parametrize("call,exact,words", [e[1:] for e in CELL_ERRORS], ids=[e[0] for e in CELL_ERRORS])
def test_cell_errors(call, exact, words):
    ref, ext = make_pair(nn.LSTMCell, dtype=torch.float32, input_size=I, hidden_size=H)
    with pytest.raises(Exception) as expected:
        call(ref)
    with pytest.raises(expected.type) as got:
        call(ext)
    assert type(got.value) is expected.type  # pytest.raises also accepts subclasses
    if exact:
        assert str(got.value) == str(expected.value)
    for word in words:
        assert word in str(got.value)


def test_cell_compile_fullgraph():
    torch._dynamo.reset()
    cell = LSTMCell(I, H, dtype=torch.float64)
    x, hx = rand(N, I), (rand(N, H), rand(N, H))
    got = torch.compile(cell, backend="aot_eager", fullgraph=True)(x, hx)
    close(got, cell(x, hx), torch.float64)


def test_cell_gradcheck():
    cell = LSTMCell(2, 3, dtype=torch.float64)
    names = [n for n, _ in cell.named_parameters()]

    def f(x, h, c, *flat):
        return torch.func.functional_call(cell, dict(zip(names, flat)), (x, (h, c)))

    inputs = [rand(2, 2), rand(2, 3), rand(2, 3)] + [p.detach().clone() for p in cell.parameters()]
    assert torch.autograd.gradcheck(f, tuple(t.requires_grad_() for t in inputs))

