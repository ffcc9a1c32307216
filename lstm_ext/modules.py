"""Drop-in replacements for ``torch.nn.LSTM`` and ``torch.nn.LSTMCell`` on the fused kernels."""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Optional, Union, overload

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import functional

_HiddenState = tuple[Tensor, Tensor]


def _autocasting(x: Tensor) -> bool:
    # Under autocast nn.LSTM lets dtypes differ: autocast casts the op's arguments.
    return torch.is_autocast_enabled(x.device.type)


def _check_type(name: str, value: object, kind: type) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{name} should be of type {kind.__name__}, got: {type(value).__name__}")


def _check_two_states(hx: _HiddenState, op: str) -> None:
    # ATen's check in lstm/lstm_cell, with its words.
    if len(hx) != 2:
        raise RuntimeError(f"{op} expects two hidden states")


class LSTM(nn.Module):
    r"""Multi-layer LSTM with the interface of :class:`torch.nn.LSTM`, run by fused kernels.

    Constructor, parameters (names, order, shapes, initialisation), ``state_dict``,
    inputs (batched, unbatched, :class:`~torch.nn.utils.rnn.PackedSequence`), outputs
    and errors are those of :class:`torch.nn.LSTM`; see its documentation. Each layer
    and direction is one call of :func:`lstm_ext.functional.lstm_layer`, which runs
    the whole sequence (forward and backward) in one fused op.

    This class derives from :class:`torch.nn.Module`, not from :class:`torch.nn.LSTM`:
    TorchDynamo graph-breaks on every instance of ``nn.RNN``/``nn.GRU``/``nn.LSTM``
    (``torch._dynamo.config.allow_rnn``), which would defeat ``torch.compile``. As a
    consequence ``isinstance(m, torch.nn.LSTM)`` is ``False``; use
    :func:`lstm_ext.to_torch` where a real ``nn.LSTM`` is required. There are no
    cuDNN flat weights, so :meth:`flatten_parameters` is a no-op kept for compatibility.

    Example::

        >>> rnn = lstm_ext.LSTM(10, 20, num_layers=2)
        >>> output, (h_n, c_n) = rnn(torch.randn(5, 3, 10))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if (
            not isinstance(dropout, numbers.Number)
            or isinstance(dropout, bool)
            or not 0 <= dropout <= 1
        ):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the "
                "probability of an element being zeroed"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so "
                "non-zero dropout expects num_layers greater than 1, but got "
                f"dropout={dropout} and num_layers={num_layers}",
                stacklevel=2,
            )
        _check_type("bias", bias, bool)
        _check_type("batch_first", batch_first, bool)
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            _check_type(name, value, int)
            if value <= 0:
                raise ValueError(f"{name} must be greater than zero")
        _check_type("num_layers", num_layers, int)
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        _check_type("proj_size", proj_size, int)
        if proj_size < 0:
            raise ValueError(
                "proj_size should be a positive integer or zero to disable projections"
            )
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")

        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

        # Registration order is nn.LSTM's: it fixes state_dict order and, since
        # reset_parameters draws in that order, gives identical weights for one seed.
        for group in self._param_layout():
            for name, shape in group:
                param = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
                self.register_parameter(name, param)
        self.reset_parameters()
        # [layer][direction] -> names of (w_ih, w_hh, b_ih, b_hh, w_hr), None where absent.
        self._weight_names = [
            [
                tuple(
                    f"{kind}_l{layer}{suffix}" if present else None
                    for kind, present in (
                        ("weight_ih", True), ("weight_hh", True), ("bias_ih", bias),
                        ("bias_hh", bias), ("weight_hr", proj_size > 0),
                    )
                )
                for suffix in ("", "_reverse")
            ]
            for layer in range(num_layers)
        ]

    def _param_layout(self) -> list[list[tuple[str, tuple[int, ...]]]]:
        """(name, shape) of each parameter, one list per layer and direction, in nn.LSTM's order."""
        gates, out = 4 * self.hidden_size, self.proj_size or self.hidden_size
        suffixes = ["", "_reverse"] if self.bidirectional else [""]
        layout = []
        for layer in range(self.num_layers):
            layer_in = self.input_size if layer == 0 else out * len(suffixes)
            shapes = [("weight_ih", (gates, layer_in)), ("weight_hh", (gates, out))]
            if self.bias:
                shapes += [("bias_ih", (gates,)), ("bias_hh", (gates,))]
            if self.proj_size > 0:
                shapes.append(("weight_hr", (self.proj_size, self.hidden_size)))
            layout += [
                [(f"{kind}_l{layer}{suffix}", shape) for kind, shape in shapes]
                for suffix in suffixes
            ]
        return layout

    def _layer_weights(self, layer: int, reverse: bool) -> tuple[Optional[Tensor], ...]:
        """(w_ih, w_hh, b_ih, b_hh, w_hr) of one layer and direction, None where absent."""
        # Looked up on each call, so functional_call, DataParallel replicas and
        # reassigned weights are always the ones used; the names are built once.
        return tuple(
            None if name is None else getattr(self, name)
            for name in self._weight_names[layer][int(reverse)]
        )

    def reset_parameters(self) -> None:
        """Draw every parameter from U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)), as nn.LSTM."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self) -> None:
        """No-op: the fused kernels need no flat weight buffer. Kept for nn.LSTM compatibility."""

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Parameters grouped per layer and direction, as ``nn.LSTM.all_weights``."""
        return [[getattr(self, name) for name, _ in group] for group in self._param_layout()]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        return s

    def _check_input(self, x: Tensor, dtype_error: type[Exception]) -> None:
        for param in self.parameters():
            if param.device != x.device:
                raise RuntimeError(
                    "Input and parameter tensors are not at the same device, found input "
                    f"tensor at {x.device} and parameter tensor at {param.device}"
                )
        weight_dtype = self.weight_ih_l0.dtype
        if x.dtype != weight_dtype and not _autocasting(x):
            raise dtype_error(
                f"RNN input dtype ({x.dtype}) does not match weight dtype ({weight_dtype}). "
                f"Convert input: input.to({weight_dtype}), or convert model: model.to({x.dtype})"
            )
        if x.size(-1) != self.input_size:
            raise RuntimeError(
                "input.size(-1) must be equal to input_size. "
                f"Expected {self.input_size}, got {x.size(-1)}"
            )

    def _check_hidden(self, hx: _HiddenState, x: Tensor, batch: int) -> None:
        rows = self.num_layers * (2 if self.bidirectional else 1)
        expected = (
            (rows, batch, self.proj_size or self.hidden_size),
            (rows, batch, self.hidden_size),
        )
        for i in range(2):
            if tuple(hx[i].shape) != expected[i]:
                raise RuntimeError(
                    f"Expected hidden[{i}] size {expected[i]}, got {list(hx[i].shape)}"
                )
            if (hx[i].dtype != x.dtype and not _autocasting(x)) or hx[i].device != x.device:
                raise RuntimeError(
                    f"Expected hidden[{i}] to have the input's dtype and device "
                    f"({x.dtype}, {x.device}), got ({hx[i].dtype}, {hx[i].device})"
                )

    def _zero_state(self, x: Tensor, batch: int) -> _HiddenState:
        rows = self.num_layers * (2 if self.bidirectional else 1)
        h0 = x.new_zeros(rows, batch, self.proj_size or self.hidden_size)
        c0 = x.new_zeros(rows, batch, self.hidden_size)
        return h0, c0

    def _run_layers(
        self, x: Tensor, hx: _HiddenState, batch_sizes: Optional[Tensor]
    ) -> tuple[Tensor, _HiddenState]:
        """Stack all layers over time-first ``x`` (T, N, I), or packed data (R, I) with
        ``batch_sizes``; hx is (L*D, N, *)."""
        directions = (False, True) if self.bidirectional else (False,)
        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = nn.functional.dropout(x, self.dropout, training=True)
            outputs = []
            for reverse in directions:
                row = layer * len(directions) + int(reverse)
                y, (h, c) = functional.lstm_layer(
                    x,
                    (hx[0][row], hx[1][row]),
                    *self._layer_weights(layer, reverse),
                    reverse=reverse,
                    batch_sizes=batch_sizes,
                )
                outputs.append(y)
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
        return x, (torch.stack(h_n), torch.stack(c_n))

    @overload
    def forward(
        self, input: Tensor, hx: Optional[_HiddenState] = None
    ) -> tuple[Tensor, _HiddenState]: ...

    @overload
    def forward(
        self, input: PackedSequence, hx: Optional[_HiddenState] = None
    ) -> tuple[PackedSequence, _HiddenState]: ...

    def forward(
        self, input: Union[Tensor, PackedSequence], hx: Optional[_HiddenState] = None
    ) -> tuple[Union[Tensor, PackedSequence], _HiddenState]:
        """Run the LSTM; arguments and results exactly as :meth:`torch.nn.LSTM.forward`."""
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        if hx is not None:
            want = 3 if batched else 2
            if hx[0].dim() != want or hx[1].dim() != want:
                kind = "batched 3-D" if batched else "unbatched 2-D"
                raise RuntimeError(
                    f"For {kind} input, hx and cx should also be {want}-D but got "
                    f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                )
            _check_two_states(hx, "lstm")
        self._check_input(input, ValueError)
        # The kernels are time-first; batch_first and unbatched are views of that.
        if not batched:
            x = input.unsqueeze(1)
        elif self.batch_first:
            x = input.transpose(0, 1)
        else:
            x = input
        if hx is None:
            hx = self._zero_state(x, x.size(1))
        elif not batched:
            hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        self._check_hidden(hx, x, x.size(1))
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        y, (h_n, c_n) = self._run_layers(x, hx, None)
        if not batched:
            return y.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            y = y.transpose(0, 1)
        return y, (h_n, c_n)

    def _forward_packed(
        self, packed: PackedSequence, hx: Optional[_HiddenState]
    ) -> tuple[PackedSequence, _HiddenState]:
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        # nn.LSTM reports these as RuntimeError for packed input.
        self._check_input(data, RuntimeError)
        batch = int(batch_sizes[0])
        if hx is None:
            hx = self._zero_state(data, batch)
        else:
            _check_two_states(hx, "lstm")
            self._check_hidden(hx, data, batch)
            if sorted_indices is not None:
                hx = (hx[0].index_select(1, sorted_indices), hx[1].index_select(1, sorted_indices))

        # The kernels take PackedSequence.data as it is: no padding to (T, N, I) and back.
        # CPU autocast has no rule for nn.LSTM's packed form (aten::lstm.data), which
        # therefore runs in the parameters' dtype; so does this.
        cpu_autocast = data.device.type == "cpu" and _autocasting(data)
        with torch.autocast("cpu", enabled=False) if cpu_autocast else contextlib.nullcontext():
            y, (h_n, c_n) = self._run_layers(data, hx, batch_sizes)
        out = PackedSequence(y, batch_sizes, sorted_indices, unsorted_indices)
        if unsorted_indices is not None:
            h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices)
        return out, (h_n, c_n)


class LSTMCell(nn.Module):
    r"""One LSTM step with the interface of :class:`torch.nn.LSTMCell`, run by the fused kernel.

    Constructor, parameters (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``),
    initialisation, inputs (1-D unbatched or 2-D batched), outputs and errors are those
    of :class:`torch.nn.LSTMCell`. Calls :func:`lstm_ext.functional.lstm_cell`.

    Derives from :class:`torch.nn.Module` (not ``nn.LSTMCell``) like :class:`LSTM`, so
    ``isinstance(m, torch.nn.LSTMCell)`` is ``False``; see :func:`lstm_ext.to_torch`.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        # nn.LSTMCell validates nothing here beyond what torch.empty rejects; neither do we.
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        factory = {"device": device, "dtype": dtype}
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every parameter from U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)), as nn.LSTMCell."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        return s

    def forward(self, input: Tensor, hx: Optional[_HiddenState] = None) -> _HiddenState:
        """One step: input (N, I) or (I), hx (h, c) of (N, H) or (H); returns (h', c')."""
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for i, state in enumerate(hx):
                if state.dim() not in (1, 2):
                    raise ValueError(
                        f"LSTMCell: Expected hx[{i}] to be 1D or 2D, got {state.dim()}D instead"
                    )
        batched = input.dim() == 2
        if hx is not None:
            if batched:
                # nn.LSTMCell hands a batched hx to ATen's lstm_cell as it is, which checks this.
                if not isinstance(hx, (tuple, list)):
                    raise TypeError(
                        "lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, "
                        f"not {type(hx).__name__}"
                    )
                _check_two_states(hx, "lstm_cell")
            if hx[0].dim() != input.dim() or hx[1].dim() != input.dim():
                kind = "batched 2-D" if batched else "unbatched 1-D"
                raise RuntimeError(
                    f"For {kind} input, hx and cx should also be {input.dim()}-D but got "
                    f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                )
        x = input if batched else input.unsqueeze(0)
        if hx is None:
            zeros = x.new_zeros(x.size(0), self.hidden_size)
            hx = (zeros, zeros)
        elif not batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        self._check_args(x, hx)
        h, c = functional.lstm_cell(x, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))

    def _check_args(self, x: Tensor, hx: _HiddenState) -> None:
        # Same checks and messages as ATen's LSTMCell (check_rnn_cell_forward_*).
        if x.size(1) != self.input_size:
            raise RuntimeError(
                f"input has inconsistent input_size: got {x.size(1)} expected {self.input_size}"
            )
        for i, state in enumerate(hx):
            if state.size(0) != x.size(0):
                raise RuntimeError(
                    f"Input batch size {x.size(0)} doesn't match hidden{i} batch size "
                    f"{state.size(0)}"
                )
            if state.size(1) != self.hidden_size:
                raise RuntimeError(
                    f"hidden{i} has inconsistent hidden_size: got {state.size(1)}, "
                    f"expected {self.hidden_size}"
                )
        for t in (x, *hx):
            if t.dtype != self.weight_ih.dtype and not _autocasting(x):
                raise RuntimeError(
                    "LSTMCell input and hidden state must have the weight dtype "
                    f"{self.weight_ih.dtype}, got {t.dtype}"
                )
