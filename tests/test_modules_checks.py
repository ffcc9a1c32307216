"""Bad input, devices and edge cases of lstm_ext.LSTM / LSTMCell and the ops, side by
side with torch.nn: the same exception type and words, or the same result."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import lstm_ext
from lstm_ext.modules import LSTM, LSTMCell


def outcome(call: Callable[[], object]) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        call()
    return info.type, str(info.value)


def same_error(make: Callable[[type[nn.Module]], Callable[[], object]], ref_type, ext_type) -> None:
    """``make(module_type)`` builds a call; both must raise the same type and message."""
    assert outcome(make(ext_type)) == outcome(make(ref_type))


class _Identity(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w


@pytest.mark.parametrize("parametrized", [False, True], ids=["plain", "parametrized"])
@pytest.mark.parametrize("name", ["weight_ih_l0", "bias_hh_l1"])  # the first parameter and the last
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_parameter_on_another_device_is_refused_like_torch(kind, name, parametrized):
    # A meta parameter used to send the call to the fake kernel: uninitialised output. A
    # parametrization keeps the parameter in a submodule.
    def make(module_type):
        module = module_type(4, 5, num_layers=2)
        meta = nn.Parameter(torch.empty_like(getattr(module, name), device="meta"))
        if parametrized:
            nn.utils.parametrize.register_parametrization(module, name, _Identity())
            getattr(module.parametrizations, name).original = meta
        else:
            setattr(module, name, meta)
        return lambda: module(torch.randn(3, 2, 4))

    same_error(make, getattr(nn, kind), getattr(lstm_ext, kind))
    error, words = outcome(make(getattr(lstm_ext, kind)))
    assert error is RuntimeError and "parameter tensor at meta" in words


@pytest.mark.parametrize("where", ["w_ih", "b_hh", "h0", "batch_sizes"])
@pytest.mark.parametrize("op", ["lstm_forward", "lstm_inference"])
def test_op_refuses_a_meta_tensor_among_cpu_ones(op, where):
    H, I = 5, 4
    args = dict(
        x=torch.randn(5, I), h0=torch.zeros(2, H), c0=torch.zeros(2, H), w_ih=torch.randn(4 * H, I),
        w_hh=torch.randn(4 * H, H), b_ih=torch.randn(4 * H), b_hh=torch.randn(4 * H), w_hr=None,
        batch_sizes=torch.tensor([2, 2, 1]), reverse=False,
    )
    args[where] = args[where].to("meta")
    with pytest.raises(RuntimeError, match=f"expected {where}.* CPU tensor|expected {where} on cpu"):
        getattr(torch.ops.lstm_ext, op)(*args.values())


@pytest.mark.parametrize("packed", [False, True])
def test_lstm_three_hidden_states_refused(packed):
    def make(module_type):
        module = module_type(4, 5)
        x = pack_sequence([torch.randn(3, 4), torch.randn(2, 4)]) if packed else torch.randn(3, 2, 4)
        h = torch.zeros(1, 2, 5)
        return lambda: module(x, (h, h, h))

    same_error(make, nn.LSTM, LSTM)


def test_cell_hidden_state_arguments_like_nn_lstmcell():
    h = torch.zeros(3, 5)
    for hx in (h, (h, h, h), (h,)):
        same_error(lambda t: (lambda m: lambda: m(torch.randn(3, 4), hx))(t(4, 5)), nn.LSTMCell, LSTMCell)
    assert outcome(lambda: LSTMCell(4, 5)(torch.randn(3, 4), h))[0] is TypeError
    # Unbatched, nn.LSTMCell takes the first two rows of a tensor hx as (h, c); so do we.
    ref, ext = nn.LSTMCell(4, 5), LSTMCell(4, 5)
    ext.load_state_dict(ref.state_dict())
    x, hx = torch.randn(4), torch.randn(2, 5)
    for got, want in zip(ext(x, hx), ref(x, hx)):
        torch.testing.assert_close(got, want)


def test_cell_of_hidden_size_zero():
    ref, ext = nn.LSTMCell(4, 0), LSTMCell(4, 0)
    x = torch.randn(3, 4, requires_grad=True)
    got, want = ext(x), ref(x)
    assert [t.shape for t in got] == [t.shape for t in want] == [(3, 0), (3, 0)]
    (got[0].sum() + got[1].sum()).backward()
    torch.testing.assert_close(x.grad, torch.zeros_like(x))


def test_autocast_cpu_packed_input_runs_in_float32_like_nn_lstm():
    ref, ext = nn.LSTM(4, 5, num_layers=2), LSTM(4, 5, num_layers=2)
    ext.load_state_dict(ref.state_dict())
    packed = pack_sequence([torch.randn(3, 4), torch.randn(2, 4)])
    with torch.autocast("cpu", torch.bfloat16):
        (got, (gh, gc)), (want, (wh, wc)) = ext(packed), ref(packed)
    exact_y, (exact_h, exact_c) = ref(packed)  # no autocast: float32 throughout
    for g, w, exact in ((got.data, want.data, exact_y.data), (gh, wh, exact_h), (gc, wc, exact_c)):
        assert g.dtype == w.dtype == torch.float32
        # nn.LSTM's per-step matmuls inside are still autocast to bfloat16; lstm_ext's not.
        torch.testing.assert_close(g, w, rtol=0.05, atol=0.01)
        torch.testing.assert_close(g, exact, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", torch.bfloat16):  # padded input is cast, as by nn.LSTM
        assert ext(torch.randn(3, 2, 4))[0].dtype == ref(torch.randn(3, 2, 4))[0].dtype == torch.bfloat16


@pytest.mark.parametrize("direction", ["convert", "to_torch"])
def test_convert_replaces_every_slot_of_a_shared_module(direction):
    source = nn.LSTM(4, 6) if direction == "convert" else LSTM(4, 6)
    other = nn.LSTMCell(4, 6) if direction == "convert" else LSTMCell(4, 6)
    model = nn.ModuleList([source, source, other, nn.Sequential(source)])
    getattr(lstm_ext, direction)(model)
    want = LSTM if direction == "convert" else nn.LSTM
    assert all(type(model[k]) is want for k in (0, 1)) and type(model[3][0]) is want
    assert model[0] is model[1] is model[3][0]
    assert type(model[2]) is (LSTMCell if direction == "convert" else nn.LSTMCell)
    assert model[0].weight_ih_l0 is source.weight_ih_l0
