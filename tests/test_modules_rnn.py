"""lstm_ext.GRU, RNN, GRUCell and RNNCell against torch.nn.GRU, nn.RNN, nn.GRUCell and
nn.RNNCell: results, gradients, construction and errors.

Everything is compared with torch's modules, not with lstm_ext's own reference layer, so
these tests hold whichever kernel lstm_ext.functional.rnn_layer dispatches to.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from autograd_checks import assert_compiled_step_matches
from lstm_ext.modules import GRU, RNN, GRUCell, RNNCell

# Relative tolerance; absolute errors are allowed up to the same fraction of the
# tensor's largest magnitude (gradients summed over a sequence).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
I, H, T, N = 4, 5, 6, 3

# id -> (torch class, lstm_ext class, constructor keywords beyond the sizes)
LAYERS = {
    "gru": (nn.GRU, GRU, {}),
    "rnn_tanh": (nn.RNN, RNN, {}),
    "rnn_relu": (nn.RNN, RNN, {"nonlinearity": "relu"}),
}
CELLS = {
    "grucell": (nn.GRUCell, GRUCell, {}),
    "rnncell_tanh": (nn.RNNCell, RNNCell, {}),
    "rnncell_relu": (nn.RNNCell, RNNCell, {"nonlinearity": "relu"}),
}
KINDS = {**LAYERS, **CELLS}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
layer_kinds = pytest.mark.parametrize("kind", list(LAYERS))
cell_kinds = pytest.mark.parametrize("kind", list(CELLS))


def make_pair(kind: str, dtype: torch.dtype = torch.float64, **config: Any) -> tuple[nn.Module, nn.Module]:
    """A torch module and its lstm_ext twin holding the same weights (via state_dict)."""
    ref_type, ext_type, extra = KINDS[kind]
    config = {"input_size": I, "hidden_size": H, **extra, **config, "dtype": dtype}
    ref, ext = ref_type(**config), ext_type(**config)
    ext.load_state_dict(ref.state_dict())
    return ref, ext


def rand(*shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, dtype=dtype)


def run(module: nn.Module, leaves: list[Tensor], build: Callable) -> dict[str, Tensor]:
    """Forward ``build(*leaves)`` through ``module``, backward a random projection of
    every output, and return outputs plus the gradients of the leaves and parameters."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    module.zero_grad(set_to_none=True)
    out = module(*build(*leaves))
    if isinstance(out, tuple):
        y, h = out
        results = {"y": y.data if isinstance(y, PackedSequence) else y, "h": h}
    else:
        results = {"h": out}
    gen = torch.Generator().manual_seed(1)
    loss = sum((v * torch.randn(v.shape, generator=gen, dtype=v.dtype)).sum() for v in results.values())
    loss.backward()
    results.update({f"grad_leaf{i}": t.grad for i, t in enumerate(leaves)})
    results.update({f"grad_{n}": p.grad for n, p in module.named_parameters()})
    return results


def close(got: Tensor, expected: Tensor, dtype: torch.dtype, what: str = "") -> None:
    """assert_close with TOL, elementwise or relative to the largest |expected|."""
    assert got.shape == expected.shape and got.dtype == expected.dtype, what
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        got, expected, rtol=TOL[dtype], atol=TOL[dtype] * scale, msg=lambda m: f"{what}: {m}"
    )


def check_parity(ref, ext, leaves, build, dtype=torch.float64) -> dict[str, Tensor]:
    expected, got = run(ref, leaves, build), run(ext, leaves, build)
    assert expected.keys() == got.keys()
    for key in expected:
        assert (expected[key] is None) == (got[key] is None), key
        if expected[key] is not None:
            close(got[key], expected[key], dtype, key)
    return got


# --------------------------------------------------------------------------- parity


@DTYPES
@pytest.mark.parametrize("given_hx", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tf", "bf"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2])
@layer_kinds
def test_parity(kind, num_layers, bidirectional, batch_first, bias, given_hx, dtype):
    ref, ext = make_pair(kind, dtype, num_layers=num_layers, bidirectional=bidirectional,
                         batch_first=batch_first, bias=bias)
    rows = num_layers * (2 if bidirectional else 1)
    leaves = [rand(N, T, I, dtype=dtype) if batch_first else rand(T, N, I, dtype=dtype)]
    if given_hx:
        leaves.append(rand(rows, N, H, dtype=dtype))
    got = check_parity(ref, ext, leaves, lambda x, h=None: (x, h), dtype)
    assert got["h"].shape == (rows, N, H)


@pytest.mark.parametrize("given_hx", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tf", "bf"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@layer_kinds
def test_unbatched(kind, bidirectional, batch_first, given_hx):
    ref, ext = make_pair(kind, num_layers=2, bidirectional=bidirectional, batch_first=batch_first)
    rows = 2 * (2 if bidirectional else 1)
    leaves = [rand(T, I)] + ([rand(rows, H)] if given_hx else [])
    got = check_parity(ref, ext, leaves, lambda x, h=None: (x, h))
    assert got["y"].shape == (T, H * (2 if bidirectional else 1)) and got["h"].shape == (rows, H)


@DTYPES
@pytest.mark.parametrize("given_hx", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@layer_kinds
def test_packed(kind, bidirectional, enforce_sorted, given_hx, dtype):
    ref, ext = make_pair(kind, dtype, num_layers=2, bidirectional=bidirectional)
    lengths = [6, 4, 1, 3] if not enforce_sorted else [6, 4, 3, 1]
    rows = 2 * (2 if bidirectional else 1)
    leaves = [rand(T, 4, I, dtype=dtype)] + ([rand(rows, 4, H, dtype=dtype)] if given_hx else [])

    def build(x, h=None):
        return pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted), h

    check_parity(ref, ext, leaves, build, dtype)


@layer_kinds
def test_unsorted_packed_hx_with_extra_rows_accepted_like_torch(kind):
    # torch permutes hx by sorted_indices before checking it: extra rows are dropped.
    ref, ext = make_pair(kind)
    packed = pack_padded_sequence(rand(T, N, I), [6, 2, 4], enforce_sorted=False)
    check_parity(ref, ext, [rand(1, N + 2, H)], lambda h: (packed, h))


@pytest.mark.parametrize("batch_first", [False, True], ids=["tf", "bf"])
@layer_kinds
def test_empty_batch(kind, batch_first):
    ref, ext = make_pair(kind, bidirectional=True, batch_first=batch_first)
    x = rand(0, T, I) if batch_first else rand(T, 0, I)
    (y_ref, h_ref), (y_ext, h_ext) = ref(x), ext(x)
    assert y_ext.shape == y_ref.shape and h_ext.shape == h_ref.shape == (2, 0, H)


@layer_kinds
def test_non_contiguous_input(kind):
    ref, ext = make_pair(kind, num_layers=2)
    x = rand(N, T, 2 * I)[:, :, ::2].transpose(0, 1)  # strided in every dimension
    assert not x.is_contiguous()
    check_parity(ref, ext, [x], lambda x: (x,))


# --------------------------------------------------------------------------- dropout


@layer_kinds
def test_dropout_only_between_layers_and_only_in_training(kind):
    ref, ext = make_pair(kind, num_layers=2, dropout=0.5, bidirectional=True)
    x = rand(T, N, I)
    ref.eval(), ext.eval()
    check_parity(ref, ext, [x], lambda x: (x,))  # eval: no dropout at all
    ext.train()
    torch.manual_seed(0)
    y_train, h_train = ext(x)
    assert not torch.allclose(y_train, ext.eval()(x)[0])
    assert not torch.equal(y_train, ext.train()(x)[0])  # a fresh mask per call
    torch.manual_seed(0)
    assert torch.equal(ext(x)[0], y_train)  # drawn from the global RNG
    # Layer 0 sees no dropout: its final states are those of eval mode.
    close(h_train[:2], ext.eval()(x)[1][:2], torch.float64, "layer 0")


@layer_kinds
def test_dropout_one_zeroes_the_first_layers_output_like_torch(kind):
    # p=1 is deterministic, so torch (whose masks are drawn differently) can be compared.
    ref, ext = make_pair(kind, num_layers=3, dropout=1.0)
    ref.train(), ext.train()
    check_parity(ref, ext, [rand(T, N, I), rand(3, N, H)], lambda x, h: (x, h))


@layer_kinds
def test_dropout_warning_for_one_layer_points_at_the_caller(kind):
    _, ext_type, extra = LAYERS[kind]
    with pytest.warns(UserWarning, match="num_layers greater than 1.*dropout=0.5") as record:
        ext_type(I, H, dropout=0.5, **extra)
    assert record[0].filename == __file__


# --------------------------------------------------------------------------- construction

LAYER_CONFIGS = [
    dict(),
    dict(num_layers=3, bidirectional=True),
    dict(bias=False, batch_first=True, dropout=0.25, num_layers=2),
]


@pytest.mark.parametrize("config", LAYER_CONFIGS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_same_init_params_and_repr_as_torch(kind, config):
    ref_type, ext_type, extra = KINDS[kind]
    if kind in CELLS:
        config = {k: v for k, v in config.items() if k == "bias"}
    config = {**extra, **config}
    torch.manual_seed(7)
    ref = ref_type(I, H, **config)
    after_ref = torch.rand(3)
    torch.manual_seed(7)
    ext = ext_type(I, H, **config)
    assert torch.equal(torch.rand(3), after_ref)  # same number of RNG draws
    ref_params, ext_params = dict(ref.named_parameters()), dict(ext.named_parameters())
    assert list(ref_params) == list(ext_params)
    for name in ref_params:
        assert ref_params[name].shape == ext_params[name].shape, name
        assert torch.equal(ref_params[name], ext_params[name]), name
    assert repr(ext) == repr(ref)
    assert not isinstance(ext, ref_type)  # documented: torch's classes make Dynamo graph-break
    for attr in ("input_size", "hidden_size", "bias", "nonlinearity", "mode", "num_layers",
                 "batch_first", "dropout", "bidirectional", "proj_size"):
        assert getattr(ext, attr, None) == getattr(ref, attr, None), attr
    if kind in LAYERS:
        # The very Parameter objects, grouped per layer and direction in torch's order.
        expected = [[getattr(ext, name) for name in group] for group in ref._all_weights]
        assert len(ext.all_weights) == len(expected)
        assert all(len(g) == len(e) and all(p is q for p, q in zip(g, e))
                   for g, e in zip(ext.all_weights, expected))


@pytest.mark.parametrize("direction", ["torch_to_ext", "ext_to_torch"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_state_dict_round_trip(kind, direction):
    ref_type, ext_type, extra = KINDS[kind]
    config = {**extra, "bias": False} if kind in CELLS else {**extra, "num_layers": 2, "bidirectional": True}
    src, dst = ref_type(I, H, **config), ext_type(I, H, **config)
    if direction == "ext_to_torch":
        src, dst = dst, src
    dst.load_state_dict(src.state_dict(), strict=True)
    assert list(dst.state_dict()) == list(src.state_dict())
    x = torch.randn(N, I) if kind in CELLS else torch.randn(T, N, I)
    out_src, out_dst = src(x), dst(x)
    for a, b in zip(out_src if kind in LAYERS else [out_src], out_dst if kind in LAYERS else [out_dst]):
        close(b, a, torch.float32)


def test_rnn_nonlinearity_positional_and_keyword_like_torch():
    x = torch.randn(T, N, I)
    for args, kwargs in [((I, H, 1, "relu"), {}), ((I, H), {"nonlinearity": "relu"}),
                         ((I, H, 2, "tanh", False, True, 0.0, True), {}), ((I, H, 1), {})]:
        ref, ext = nn.RNN(*args, **kwargs), RNN(*args, **kwargs)
        assert (ext.mode, ext.nonlinearity, repr(ext)) == (ref.mode, ref.nonlinearity, repr(ref))
        ext.load_state_dict(ref.state_dict())
        xb = x.transpose(0, 1) if ref.batch_first else x
        close(ext(xb)[0], ref(xb)[0], torch.float32, str(args))
    # The mode is fixed at construction, as in nn.RNN.
    ext = RNN(I, H, nonlinearity="relu")
    ext.nonlinearity = "tanh"
    assert ext.mode == "RNN_RELU" and (ext(x)[0] >= 0).all()


def outcome(call: Callable[[], object]) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        call()
    return info.type, str(info.value)


# (id, torch class, arguments, keywords, torch's message equals ours exactly). Where not
# exact, nn.RNN/GRU fails later, inside range() or a comparison, with a message about
# that call; ours names the argument (same exception type).
CONSTRUCTOR_ERRORS = [
    ("proj_size", nn.GRU, (I, H), dict(proj_size=2), True),
    ("proj_size_zero", nn.GRU, (I, H), dict(proj_size=0), True),
    ("proj_size_rnn", nn.RNN, (I, H), dict(proj_size=0), True),
    ("unknown_keyword", nn.GRU, (I, H), dict(foo=1), True),
    ("unknown_keyword_rnn", nn.RNN, (I, H), dict(foo=1), True),
    ("gru_nonlinearity", nn.GRU, (I, H), dict(nonlinearity="tanh"), True),
    ("gru_nonlinearity_positional", nn.GRU, (I, H, 1, "tanh"), {}, True),
    ("too_many_positional", nn.GRU, (I, H, 1, True, False, 0.0, False, 0, None, None, None), {}, True),
    ("bad_nonlinearity", nn.RNN, (I, H), dict(nonlinearity="sigmoid"), True),
    ("bad_nonlinearity_positional", nn.RNN, (I, H, 1, "sigmoid"), {}, True),
    ("bias_taken_as_nonlinearity", nn.RNN, (I, H, 1, True), {}, True),
    ("nonlinearity_before_dropout", nn.RNN, (I, H), dict(nonlinearity="x", dropout=3), True),
    ("nonlinearity_none", nn.RNN, (I, H), dict(nonlinearity=None), True),
    ("dropout", nn.GRU, (I, H), dict(dropout=1.5), True),
    ("dropout_bool", nn.RNN, (I, H), dict(dropout=True), True),
    ("bias", nn.GRU, (I, H), dict(bias=1), True),
    ("batch_first", nn.RNN, (I, H), dict(batch_first=None), True),
    ("input_size", nn.GRU, (0, H), {}, True),
    ("input_size_type", nn.RNN, (2.0, H), {}, True),
    ("hidden_size", nn.GRU, (I, -1), {}, True),
    ("hidden_size_type", nn.RNN, (I, "5"), {}, True),
    ("num_layers", nn.GRU, (I, H, 0), {}, True),
    ("num_layers_type", nn.RNN, (I, H), dict(num_layers=1.5), False),
    ("device_taken_as_proj_size", nn.GRU, (I, H, 1, True, False, 0.0, False, "cpu"), {}, False),
]


@pytest.mark.parametrize("ref_type,args,kwargs,exact", [e[1:] for e in CONSTRUCTOR_ERRORS],
                         ids=[e[0] for e in CONSTRUCTOR_ERRORS])
def test_constructor_errors(ref_type, args, kwargs, exact):
    ext_type = {nn.GRU: GRU, nn.RNN: RNN}[ref_type]
    expected, got = outcome(lambda: ref_type(*args, **kwargs)), outcome(lambda: ext_type(*args, **kwargs))
    assert got[0] is expected[0]
    if exact:
        assert got[1] == expected[1]


# --------------------------------------------------------------------------- forward errors


def _packed(feature: int = I, dtype: torch.dtype = torch.float32, enforce_sorted: bool = True):
    lengths = (6, 4, 2) if enforce_sorted else (6, 2, 4)
    return pack_padded_sequence(torch.randn(T, N, feature, dtype=dtype), lengths,
                                enforce_sorted=enforce_sorted)


def _h(*shape: int, **kw: Any) -> Tensor:
    return torch.zeros(*shape, **kw)


# (id, call on a 2-layer float32 module); torch's exception type and message, exactly.
FORWARD_ERRORS = [
    ("1d_input", lambda m: m(torch.randn(I))),
    ("4d_input", lambda m: m(torch.randn(1, T, N, I))),
    ("input_size", lambda m: m(torch.randn(T, N, I + 1))),
    ("input_size_unbatched", lambda m: m(torch.randn(T, I + 1))),
    ("input_dtype", lambda m: m(torch.randn(T, N, I).double())),
    ("h_size", lambda m: m(torch.randn(T, N, I), _h(2, N, H + 1))),
    ("h_layers", lambda m: m(torch.randn(T, N, I), _h(1, N, H))),
    ("h_batch", lambda m: m(torch.randn(T, N, I), _h(2, N + 1, H))),
    ("h_size_unbatched", lambda m: m(torch.randn(T, I), _h(2, H + 1))),
    ("2d_hx_3d_input", lambda m: m(torch.randn(T, N, I), _h(2, H))),
    ("3d_hx_2d_input", lambda m: m(torch.randn(T, I), _h(2, 1, H))),
    ("hx_tuple", lambda m: m(torch.randn(T, N, I), (_h(2, N, H),))),
    ("empty_sequence", lambda m: m(torch.randn(0, N, I))),
    ("empty_unbatched", lambda m: m(torch.randn(0, I))),
    ("hx_dtype", lambda m: m(torch.randn(T, N, I), _h(2, N, H, dtype=torch.float64))),
    ("hx_dtype_unbatched", lambda m: m(torch.randn(T, I), _h(2, H, dtype=torch.float64))),
    ("hx_dtype_checked_after_length", lambda m: m(torch.randn(0, N, I), _h(2, N, H, dtype=torch.float64))),
    ("hx_device", lambda m: m(torch.randn(T, N, I), _h(2, N, H, device="meta"))),
    ("input_device", lambda m: m(torch.randn(T, N, I, device="meta"))),
    ("input_device_before_length", lambda m: m(torch.randn(0, N, I, device="meta"))),
    ("hx_device_before_input_device", lambda m: m(torch.randn(T, N, I, device="meta"), _h(2, N, H))),
    ("packed_input_size", lambda m: m(_packed(I + 1))),
    ("packed_dtype", lambda m: m(_packed(dtype=torch.float64))),
    ("packed_h_batch", lambda m: m(_packed(), _h(2, N + 1, H))),
    ("packed_h_size", lambda m: m(_packed(enforce_sorted=False), _h(2, N, H + 1))),
    ("packed_h_2d", lambda m: m(_packed(), _h(2 * N, H))),
    ("packed_h_dtype", lambda m: m(_packed(enforce_sorted=False), _h(2, N, H, dtype=torch.float64))),
    ("packed_hx_tuple", lambda m: m(_packed(), (_h(2, N, H),))),
    ("packed_hx_tuple_unsorted", lambda m: m(_packed(enforce_sorted=False), (_h(2, N, H),))),
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("call", [e[1] for e in FORWARD_ERRORS], ids=[e[0] for e in FORWARD_ERRORS])
@layer_kinds
def test_forward_errors_like_torch(kind, call, bias):
    ref, ext = make_pair(kind, torch.float32, num_layers=2, bias=bias)
    assert outcome(lambda: call(ext)) == outcome(lambda: call(ref))


@layer_kinds
def test_float64_module_with_float32_hx_like_torch(kind):
    ref, ext = make_pair(kind, torch.float64)
    x, h = torch.randn(T, N, I, dtype=torch.float64), _h(1, N, H)
    assert outcome(lambda: ext(x, h)) == outcome(lambda: ref(x, h))


# (id, call on a float32 cell); torch's exception type and message, exactly.
CELL_ERRORS = [
    ("0d_input", lambda m: m(torch.tensor(1.0))),
    ("3d_input", lambda m: m(torch.randn(1, N, I))),
    ("3d_hx", lambda m: m(torch.randn(N, I), _h(1, N, H))),
    ("0d_hx", lambda m: m(torch.randn(N, I), torch.tensor(0.0))),
    ("input_size", lambda m: m(torch.randn(N, I + 1))),
    ("input_size_1d", lambda m: m(torch.randn(I + 1))),
    ("h_size", lambda m: m(torch.randn(N, I), _h(N, H + 1))),
    ("h_batch", lambda m: m(torch.randn(N, I), _h(N + 1, H))),
    ("2d_hx_1d_input", lambda m: m(torch.randn(I), _h(1, H))),
    ("1d_hx_2d_input", lambda m: m(torch.randn(1, I), _h(H))),
    ("1d_hx_2d_input_batch_h", lambda m: m(torch.randn(H, I), _h(H))),
    ("hx_tuple", lambda m: m(torch.randn(N, I), (_h(N, H),))),
    ("input_dtype", lambda m: m(torch.randn(N, I).double())),
    ("hx_dtype", lambda m: m(torch.randn(N, I), _h(N, H, dtype=torch.float64))),
    ("both_dtype", lambda m: m(torch.randn(N, I).double(), _h(N, H, dtype=torch.float64))),
    ("unbatched_hx_dtype", lambda m: m(torch.randn(I), _h(H, dtype=torch.float64))),
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("call", [e[1] for e in CELL_ERRORS], ids=[e[0] for e in CELL_ERRORS])
@cell_kinds
def test_cell_errors_like_torch(kind, call, bias):
    ref, ext = make_pair(kind, torch.float32, bias=bias)
    assert outcome(lambda: call(ext)) == outcome(lambda: call(ref))


@pytest.mark.parametrize("where", ["input", "hx"])
@cell_kinds
def test_cell_device_mismatch_is_a_runtime_error(kind, where):
    # torch's words here come from the meta kernels and differ between device pairs;
    # ours name both devices.
    ref, ext = make_pair(kind, torch.float32)
    x = torch.randn(N, I, device="meta" if where == "input" else "cpu")
    h = _h(N, H, device="meta" if where == "hx" else "cpu")
    assert outcome(lambda: ref(x, h))[0] is RuntimeError
    kind_, words = outcome(lambda: ext(x, h))
    assert kind_ is RuntimeError and "meta" in words and "cpu" in words


def test_rnncell_bad_nonlinearity_fails_when_run_like_torch():
    ref, ext = nn.RNNCell(I, H, nonlinearity="sigmoid"), RNNCell(I, H, nonlinearity="sigmoid")
    assert repr(ext) == repr(ref) == "RNNCell(4, 5, nonlinearity=sigmoid)"
    for x in (torch.randn(N, I), torch.randn(N, I + 1), torch.randn(1, N, I)):
        assert outcome(lambda x=x: ext(x)) == outcome(lambda x=x: ref(x))
    ext.nonlinearity = "relu"  # read at each call, as by nn.RNNCell
    assert (ext(torch.randn(N, I)) >= 0).all()


def test_cell_2d_hx_for_1d_input_refused_where_torch_crashes():
    # nn.GRUCell(4, 1) with a (1, 1) hx for 1-D input passes ATen's checks and crashes.
    with pytest.raises(RuntimeError, match="For unbatched 1-D input, hx should also be 1-D"):
        GRUCell(I, 1)(torch.randn(I), _h(1, 1))


# --------------------------------------------------------------------------- autocast

@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize(
    "kind", ["gru", "rnn_tanh", "rnn_relu"],
)
def test_autocast_cpu_dtypes_like_torch(kind, packed):
    ref, ext = make_pair(kind, torch.float32, num_layers=2)
    x = torch.randn(T, N, I)
    if packed:
        x = pack_padded_sequence(x, [6, 4, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (y_ref, h_ref), (y_ext, h_ext) = ref(x), ext(x)
    if packed:
        y_ref, y_ext = y_ref.data, y_ext.data
    assert (y_ext.dtype, h_ext.dtype) == (y_ref.dtype, h_ref.dtype)
    # The products inside run in bfloat16 (8 bits) either way, in a different order.
    torch.testing.assert_close(y_ext.float(), y_ref.float(), rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(h_ext.float(), h_ref.float(), rtol=2e-2, atol=1e-2)


# --------------------------------------------------------------------------- cells


@DTYPES
@pytest.mark.parametrize("given_hx", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("batch", [None, 0, N], ids=["unbatched", "empty", "batched"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@cell_kinds
def test_cell_parity(kind, bias, batch, given_hx, dtype):
    ref, ext = make_pair(kind, dtype, bias=bias)
    lead = () if batch is None else (batch,)
    leaves = [rand(*lead, I, dtype=dtype)] + ([rand(*lead, H, dtype=dtype)] if given_hx else [])
    got = check_parity(ref, ext, leaves, lambda x, h=None: (x, h), dtype)
    assert got["h"].shape == lead + (H,)


@cell_kinds
def test_cell_of_hidden_size_zero(kind):
    ref, ext = make_pair(kind, input_size=I, hidden_size=0)
    x = rand(N, I, dtype=torch.float64)
    assert ext(x).shape == ref(x).shape == (N, 0)


# --------------------------------------------------------------------------- autograd, compile, export


def _as_function(module: nn.Module) -> tuple[Callable, tuple[Tensor, ...]]:
    """``module`` as a function of (x, h0, *parameters), with copies of the parameters."""
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in module.parameters())

    def f(x, h0, *flat):
        return torch.func.functional_call(module, dict(zip(names, flat)), (x, h0))

    return f, params


@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck],
                         ids=["grad", "gradgrad"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_gradcheck(kind, check):
    _, ext_type, extra = KINDS[kind]
    if kind in CELLS:
        module = ext_type(2, 3, **extra, dtype=torch.float64)
        inputs = (rand(2, 2), rand(2, 3))
    else:
        module = ext_type(2, 3, num_layers=2, bidirectional=True, **extra, dtype=torch.float64)
        inputs = (rand(3, 2, 2), rand(4, 2, 3))
    f, params = _as_function(module)
    assert check(f, tuple(t.requires_grad_() for t in inputs) + params)


class _Tagger(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        _, ext_type, extra = LAYERS[kind]
        self.rnn = ext_type(I, H, num_layers=2, bidirectional=True, batch_first=True, **extra)
        self.head = nn.Linear(2 * H, 2)

    def forward(self, x: Tensor) -> Tensor:
        y, h = self.rnn(x)
        return self.head(y).sum() + h.square().sum()


@layer_kinds
def test_compile_fullgraph(kind):
    torch._dynamo.reset()
    model = _Tagger(kind)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fails on a graph break
    assert_compiled_step_matches(model, compiled, torch.randn(N, T, I), close)


@cell_kinds
def test_cell_compile_fullgraph(kind):
    torch._dynamo.reset()
    _, ext_type, extra = CELLS[kind]
    cell = ext_type(I, H, **extra, dtype=torch.float64)
    x, h = rand(N, I), rand(N, H)
    close(torch.compile(cell, backend="eager", fullgraph=True)(x, h), cell(x, h), torch.float64)


@pytest.mark.parametrize("kind", list(KINDS))
def test_export(kind):
    _, ext_type, extra = KINDS[kind]
    module = ext_type(I, H, **extra) if kind in CELLS else ext_type(I, H, num_layers=2, **extra)
    x = torch.randn(N, I) if kind in CELLS else torch.randn(T, N, I)
    program = torch.export.export(module, (x,))
    got, expected = program.module()(x), module(x)
    for g, e in zip(got if kind in LAYERS else [got], expected if kind in LAYERS else [expected]):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
