"""lstm_ext.convert.convert and to_torch on models holding LSTMs."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lstm_ext.convert import convert, to_torch
from lstm_ext.modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell


class Decoder(nn.Module):
    """A custom module with an LSTMCell, stepped in Python, next to other layers."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(6, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, y: Tensor) -> Tensor:
        state = None
        outputs = []
        for step in y:
            state = self.cell(step, state)
            outputs.append(self.out(state[0]))
        return torch.stack(outputs)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(3, 5),
            nn.LSTM(5, 3, num_layers=2, bidirectional=True, dropout=0.5),
        )
        self.decoder = Decoder()

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.encoder(x)
        return self.decoder(y)


def _run(model: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_run(a: nn.Module, b: nn.Module, x: Tensor) -> None:
    (out_a, grads_a), (out_b, grads_b) = _run(a, x), _run(b, x)
    torch.testing.assert_close(out_b, out_a, rtol=1e-10, atol=1e-12)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-10, atol=1e-12, msg=name)


def _types(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules()]


def test_convert_and_back_in_a_model():
    torch.manual_seed(0)
    model = Model().double().eval()
    model.decoder.train()  # mixed modes must survive
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    original = Model().double()
    original.load_state_dict(model.state_dict())
    original.eval()
    params = dict(model.named_parameters())
    modes = [m.training for m in model.modules()]

    assert convert(model) is model
    assert type(model.encoder[1]) is LSTM and type(model.decoder.cell) is LSTMCell
    assert nn.LSTM not in _types(model) and nn.LSTMCell not in _types(model)
    assert model.encoder[1].dropout == 0.5 and model.encoder[1].bidirectional
    # The very same Parameter objects, so optimizers and dtype are untouched.
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(dict(model.named_parameters())) == list(params)
    assert [m.training for m in model.modules()] == modes
    _assert_same_run(original, model, x)

    assert to_torch(model) is model
    assert type(model.encoder[1]) is nn.LSTM and type(model.decoder.cell) is nn.LSTMCell
    assert all(p is params[n] for n, p in model.named_parameters())
    assert [m.training for m in model.modules()] == modes
    _assert_same_run(original, model, x)


@pytest.mark.parametrize(
    "make,input_shape",
    [(lambda: nn.LSTM(3, 4, batch_first=True, proj_size=2), (2, 5, 3)),
     (lambda: nn.LSTMCell(3, 4, bias=False), (2, 3))],
    ids=["LSTM", "LSTMCell"],
)
def test_convert_a_bare_module_returns_the_replacement(make, input_shape):
    torch.manual_seed(0)
    module = make().double()
    x = torch.randn(input_shape, dtype=torch.float64)
    expected = module(x)
    converted = convert(module)
    assert type(converted) is {nn.LSTM: LSTM, nn.LSTMCell: LSTMCell}[type(module)]
    assert repr(converted) == repr(module)
    assert all(p.dtype == torch.float64 for p in converted.parameters())
    torch.testing.assert_close(converted(x), expected, rtol=1e-10, atol=1e-12)
    back = to_torch(converted)
    assert type(back) is type(module)
    torch.testing.assert_close(back(x), expected, rtol=1e-10, atol=1e-12)


def test_shared_module_stays_shared():
    lstm = nn.LSTM(3, 3)
    model = nn.ModuleDict({"a": lstm, "b": nn.Sequential(lstm)})
    convert(model)
    assert type(model["a"]) is LSTM and model["a"] is model["b"][0]


def test_already_converted_and_unrelated_modules_are_left_alone():
    # (nn.GRU used to stand for "unrelated" here; it is converted now, see test_modules_rnn.)
    model = nn.Sequential(LSTM(3, 3), GRU(3, 3), nn.Conv1d(3, 3, 1), nn.Linear(3, 3))
    before = list(model)
    convert(model)
    assert all(a is b for a, b in zip(before, model))


class MyLSTM(nn.LSTM):
    def forward(self, x, hx=None):
        return super().forward(2 * x, hx)


def test_subclass_is_refused_by_name():
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(MyLSTM(3, 3)))
    with pytest.raises(TypeError, match=r"'1\.0' is a MyLSTM, a subclass of torch.nn.*LSTM"):
        convert(model)
    assert type(model[1][0]) is MyLSTM  # nothing was changed


def test_hooks_are_refused_by_name():
    model = nn.Sequential(nn.LSTMCell(3, 3))
    model[0].register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match=r"'0' has hooks registered \(_forward_hooks"):
        convert(model)
    assert type(model[0]) is nn.LSTMCell


def test_extra_parameters_are_refused():
    lstm = LSTM(3, 3)
    lstm.register_parameter("scale", nn.Parameter(torch.ones(1)))
    with pytest.raises(ValueError, match="'model' has parameters .*scale"):
        to_torch(lstm)


def test_convert_does_not_touch_the_rng():
    model = nn.Sequential(nn.LSTM(3, 3, num_layers=2), nn.LSTMCell(3, 3))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    to_torch(convert(model))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.cuda
def test_convert_keeps_device():
    model = nn.Sequential(nn.LSTM(3, 3)).double().cuda()
    x = torch.randn(4, 2, 3, device="cuda", dtype=torch.float64)
    y, (h, c) = model(x)
    convert(model)
    assert type(model[0]) is LSTM and all(p.is_cuda for p in model.parameters())
    y_ext, (h_ext, c_ext) = model(x)
    assert y_ext.is_cuda
    for got, want in ((y_ext, y), (h_ext, h), (c_ext, c)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- GRU, RNN and cells

_NEW_KINDS = {
    "GRU": (lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True, dropout=0.5), (5, 2, 3), GRU),
    "GRU_batch_first_nobias": (lambda: nn.GRU(3, 4, bias=False, batch_first=True), (2, 5, 3), GRU),
    "RNN_relu": (lambda: nn.RNN(3, 4, 2, "relu", batch_first=True), (2, 5, 3), RNN),
    "RNN_tanh": (lambda: nn.RNN(3, 4, bidirectional=True), (5, 2, 3), RNN),
    "GRUCell": (lambda: nn.GRUCell(3, 4), (2, 3), GRUCell),
    "RNNCell_relu": (lambda: nn.RNNCell(3, 4, bias=False, nonlinearity="relu"), (2, 3), RNNCell),
}


@pytest.mark.parametrize("make,input_shape,ext_type", list(_NEW_KINDS.values()), ids=list(_NEW_KINDS))
def test_convert_gru_rnn_and_cells_and_back(make, input_shape, ext_type):
    torch.manual_seed(0)
    module = make().double().eval()
    params = dict(module.named_parameters())
    x = torch.randn(input_shape, dtype=torch.float64)
    expected = module(x)
    converted = convert(module)
    assert type(converted) is ext_type
    assert repr(converted) == repr(module) and not converted.training
    assert getattr(converted, "nonlinearity", None) == getattr(module, "nonlinearity", None)
    assert all(p is params[n] for n, p in converted.named_parameters())
    assert list(dict(converted.named_parameters())) == list(params)
    for got, want in zip(converted(x), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    back = to_torch(converted)
    assert type(back) is type(module) and repr(back) == repr(module)
    assert getattr(back, "mode", None) == getattr(module, "mode", None)
    assert all(p is params[n] for n, p in back.named_parameters())
    for got, want in zip(back(x), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_convert_all_kinds_in_one_model():
    model = nn.ModuleDict({
        "lstm": nn.LSTM(3, 3), "gru": nn.GRU(3, 3), "rnn": nn.RNN(3, 3, nonlinearity="relu"),
        "cells": nn.ModuleList([nn.LSTMCell(3, 3), nn.GRUCell(3, 3), nn.RNNCell(3, 3)]),
        "other": nn.Linear(3, 3),
    })
    other = model["other"]
    convert(model)
    assert [type(model[k]) for k in ("lstm", "gru", "rnn")] == [LSTM, GRU, RNN]
    assert [type(m) for m in model["cells"]] == [LSTMCell, GRUCell, RNNCell]
    assert model["other"] is other and model["rnn"].mode == "RNN_RELU"
    to_torch(model)
    assert [type(model[k]) for k in ("lstm", "gru", "rnn")] == [nn.LSTM, nn.GRU, nn.RNN]
    assert [type(m) for m in model["cells"]] == [nn.LSTMCell, nn.GRUCell, nn.RNNCell]
    assert model["rnn"].mode == "RNN_RELU" and model["rnn"].nonlinearity == "relu"


def test_convert_keeps_the_mode_nn_rnn_runs():
    # nn.RNN runs the mode it was built with, whatever its nonlinearity says later.
    rnn = nn.RNN(3, 4, nonlinearity="relu").double()
    rnn.nonlinearity = "tanh"
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    converted = convert(rnn)
    assert converted.mode == "RNN_RELU"
    torch.testing.assert_close(converted(x)[0], rnn(x)[0], rtol=1e-10, atol=1e-12)


class MyGRU(nn.GRU):
    pass


class MyRNNCell(RNNCell):
    pass


def test_subclasses_of_the_new_kinds_are_refused():
    with pytest.raises(TypeError, match=r"'0' is a MyGRU, a subclass of torch.nn.*GRU"):
        convert(nn.Sequential(MyGRU(3, 3)))
    with pytest.raises(TypeError, match=r"'0' is a MyRNNCell, a subclass of lstm_ext.modules.RNNCell"):
        to_torch(nn.Sequential(MyRNNCell(3, 3)))


@pytest.mark.parametrize("make", [lambda: nn.GRUCell(3, 3), lambda: nn.RNN(3, 3)], ids=["GRUCell", "RNN"])
def test_hooks_on_the_new_kinds_are_refused(make):
    model = nn.Sequential(make())
    model[0].register_forward_pre_hook(lambda *args: None)
    with pytest.raises(ValueError, match=r"'0' has hooks registered \(_forward_pre_hooks"):
        convert(model)
    assert type(model[0]) is type(make())
