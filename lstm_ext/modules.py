"""Drop-in replacements for ``torch.nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells on
the fused kernels."""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Any, Optional, Union, overload

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import functional, ops

_HiddenState = tuple[Tensor, Tensor]
_Device = Optional[Union[torch.device, str]]
# Gate blocks stacked in each mode's weights.
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_NONLINEARITY_MODES = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}


def _autocasting(x: Tensor) -> bool:
    # Under autocast nn.LSTM lets dtypes differ: autocast casts the op's arguments.
    return torch.is_autocast_enabled(x.device.type)


def _autocast(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` in CPU autocast's dtype, as autocast casts an op's arguments (floating tensors
    other than float64), by an ordinary op that autograd records."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(torch.get_autocast_dtype("cpu"))


def _check_type(name: str, value: object, kind: type) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{name} should be of type {kind.__name__}, got: {type(value).__name__}")


def _check_two_states(hx: _HiddenState, op: str) -> None:
    # ATen's check in lstm/lstm_cell, with its words.
    if len(hx) != 2:
        raise RuntimeError(f"{op} expects two hidden states")


def _refuse_proj_size(kwargs: dict[str, Any]) -> None:
    if "proj_size" in kwargs:
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")


def _dtype_mismatch(a: torch.dtype, b: torch.dtype, bias: bool) -> RuntimeError:
    """ATen's words when a matrix product meets two dtypes: addmm (with a bias) or mm."""
    names = [torch.empty(0, dtype=d).type().split(".")[-1][: -len("Tensor")] for d in (a, b)]
    if bias:
        return RuntimeError(f"mat1 and mat2 must have the same dtype, but got {names[0]} and {names[1]}")
    return RuntimeError(
        "expected m1 and m2 to have the same dtype, but got: "
        f"{names[0].lower()} != {names[1].lower()}"
    )


class RNNBase(nn.Module):
    r"""What :class:`LSTM`, :class:`GRU` and :class:`RNN` share, as ``torch.nn.RNNBase``:
    constructor checks, parameters, ``all_weights``, ``extra_repr`` and the forward pass
    over batched, unbatched, batch-first and packed input.

    It derives from :class:`torch.nn.Module`, not from :class:`torch.nn.RNNBase`:
    TorchDynamo graph-breaks on every instance of ``nn.RNN``/``nn.GRU``/``nn.LSTM``
    (``torch._dynamo.config.allow_rnn``), which would defeat ``torch.compile``.

    Subclasses say how a layer runs (:meth:`_layer`, one functional call per layer and
    direction, where a stack does not run as one op: :meth:`_stack`) and what the hidden state looks like (a tensor, or LSTM's ``(h, c)``);
    internally the state is always a tuple of (num_layers * num_directions, N, *) tensors.
    """

    # Message of a forward input that is neither 2-D nor 3-D (torch's, per class).
    _input_dims_message = "RNN: Expected input to be 2D or 3D, got {dim}D instead"
    # Exception for an input of the wrong dtype in a PackedSequence.
    _packed_dtype_error: type[Exception] = ValueError
    # Whether torch's packed form runs under CPU autocast (nn.RNN's matmuls do; aten::lstm.data
    # and aten::gru.data keep the parameters' dtype).
    _packed_cpu_autocast = False

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: _Device = None,
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
                stacklevel=3,  # the caller of the subclass's constructor
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
        if mode not in _GATES:
            raise ValueError("Unrecognized RNN mode: " + str(mode))
        if proj_size and mode != "LSTM":
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")

        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

        # Registration order is torch's: it fixes state_dict order and, since
        # reset_parameters draws in that order, gives identical weights for one seed.
        for group in self._param_layout():
            for name, shape in group:
                param = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
                self.register_parameter(name, param)
        self.reset_parameters()
        # [layer][direction] -> names of (w_ih, w_hh, b_ih, b_hh[, w_hr]), None where
        # absent; w_hr only for the LSTM.
        kinds = [("weight_ih", True), ("weight_hh", True), ("bias_ih", bias), ("bias_hh", bias)]
        if mode == "LSTM":
            kinds.append(("weight_hr", proj_size > 0))
        self._weight_names = [
            [
                tuple(f"{kind}_l{layer}{suffix}" if present else None for kind, present in kinds)
                for suffix in ("", "_reverse")
            ]
            for layer in range(num_layers)
        ]

    def _param_layout(self) -> list[list[tuple[str, tuple[int, ...]]]]:
        """(name, shape) of each parameter, one list per layer and direction, in torch's order."""
        gates, out = _GATES[self.mode] * self.hidden_size, self.proj_size or self.hidden_size
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

    def _weight(self, name: str) -> Tensor:
        """The parameter called ``name`` as it is now: looked up on each call, so that
        functional_call, DataParallel replicas and reassigned weights are the ones used."""
        # The parameter dict holds it (functional_call swaps entries there) unless
        # something took the name out (a parametrization's property, a plain tensor
        # attribute), and attribute lookup finds those. The dict is ten times faster, and
        # generation makes a call per character.
        params = self._parameters
        return params[name] if name in params else getattr(self, name)

    def _layer_weights(self, layer: int, reverse: bool) -> tuple[Optional[Tensor], ...]:
        """(w_ih, w_hh, b_ih, b_hh[, w_hr]) of one layer and direction, None where absent."""
        params = self._parameters  # _weight's first look, inlined: 8 calls per generated character
        return tuple(
            [
                params[name] if name in params else None if name is None else self._weight(name)
                for name in self._weight_names[layer][int(reverse)]
            ]
        )

    def reset_parameters(self) -> None:
        """Draw every parameter from U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)), as torch."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self) -> None:
        """No-op: the fused kernels need no flat weight buffer. Kept for torch compatibility."""

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Parameters grouped per layer and direction, as ``torch.nn.RNNBase.all_weights``."""
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

    # ---------------------------------------------------------------- what subclasses define

    def _layer(
        self,
        x: Tensor,
        state: tuple[Tensor, ...],
        weights: tuple[Optional[Tensor], ...],
        reverse: bool,
        batch_sizes: Optional[Tensor],
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """One layer and direction over the whole sequence: one functional call."""
        raise NotImplementedError

    def _zero_state(self, x: Tensor, batch: int) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def _check_hx_dims(self, hx: Any, batched: bool) -> None:
        """Refuse an ``hx`` whose number of dimensions does not suit the (un)batched input."""
        raise NotImplementedError

    def _state_of(self, hx: Any) -> tuple[Tensor, ...]:
        """The user's ``hx`` as the internal tuple of states."""
        raise NotImplementedError

    def _hx_of(self, state: tuple[Tensor, ...]) -> Any:
        """The internal tuple of states as the user's ``h_n`` (inverse of :meth:`_state_of`)."""
        raise NotImplementedError

    def _packed_state(
        self, hx: Any, data: Tensor, batch: int, sorted_indices: Optional[Tensor]
    ) -> tuple[Tensor, ...]:
        """A given ``hx`` for packed input: checked, and permuted to the sorted batch."""
        raise NotImplementedError

    def _check_hidden(self, state: tuple[Tensor, ...], x: Tensor, batch: int) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------- shared forward

    def _check_param_device(self, x: Tensor) -> None:
        # Runs on every call (generation makes one per character): the module's own
        # parameter dict where it has no submodules, without parameters()'s generators;
        # with some (a parametrization moves a weight into one), all of them.
        params = self._parameters.values() if not self._modules else self.parameters()
        device = x.device
        for param in params:
            if param is not None and param.device != device:
                raise RuntimeError(
                    "Input and parameter tensors are not at the same device, found input "
                    f"tensor at {device} and parameter tensor at {param.device}"
                )

    def _check_features(self, x: Tensor, dtype_error: type[Exception]) -> None:
        weight_dtype = self._weight("weight_ih_l0").dtype
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

    def _check_input(self, x: Tensor, dtype_error: type[Exception]) -> None:
        self._check_param_device(x)
        self._check_features(x, dtype_error)

    def _state_rows(self) -> int:
        return self.num_layers * (2 if self.bidirectional else 1)

    def _run_layers(
        self, x: Tensor, hx: tuple[Tensor, ...], batch_sizes: Optional[Tensor]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Stack all layers over time-first ``x`` (T, N, I), or packed data (R, I) with
        ``batch_sizes``; each state in hx is (L*D, N, *)."""
        stacked = self._stack(x, hx, batch_sizes)
        if stacked is not None:
            return stacked
        directions = (False, True) if self.bidirectional else (False,)
        finals: list[tuple[Tensor, ...]] = []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = nn.functional.dropout(x, self.dropout, training=True)
            outputs = []
            for reverse in directions:
                row = layer * len(directions) + int(reverse)
                y, state = self._layer(
                    x,
                    tuple(s[row] for s in hx),
                    self._layer_weights(layer, reverse),
                    reverse,
                    batch_sizes,
                )
                outputs.append(y)
                finals.append(state)
            x = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
        return x, tuple(torch.stack(parts) for parts in zip(*finals))

    def _stack(
        self, x: Tensor, hx: tuple[Tensor, ...], batch_sizes: Optional[Tensor]
    ) -> Optional[tuple[Tensor, tuple[Tensor, ...]]]:
        """All layers in one op, where it serves: a CPU stack of single-direction layers
        without dropout in effect. There two or more layers overlap in time on the threads
        (a wavefront), and even one layer costs less Python than a call per layer
        (generation makes a call per character). Needing no gradient, ``stack_inference``
        (under autocast too: the op casts as the layer ops do); needing one, from two
        layers, ``stack_forward`` through :class:`ops.StackFunction`, its inputs cast here
        under autocast (the GRU's not at all, as the layer ops do), where autograd sees the
        casts; not while torch.compile traces, which takes the layer ops and their
        registered autograd. Elsewhere None, and the layers run one call each."""
        if (
            self.bidirectional
            or (self.dropout > 0 and self.training)
            or not x.is_cpu
            or x.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
            or self.hidden_size == 0
        ):
            return None
        weights = [w for layer in range(self.num_layers) for w in self._layer_weights(layer, False) if w is not None]
        tensors = (x, *hx, *weights)
        if functional._needs_reference(tensors):
            return None
        c0 = hx[1] if len(hx) > 1 else None
        args = (x, hx[0], c0, self.bias, self.proj_size > 0, batch_sizes, self.mode)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            y, h_n, c_n = torch.ops.lstm_ext.stack_inference(*args[:3], weights, *args[3:])
        elif self.num_layers > 1 and not torch.compiler.is_compiling():
            if _autocasting(x) and self.mode != "GRU":
                x, h0, c0, *weights = (_autocast(t) for t in (x, hx[0], c0, *weights))
                args = (x, h0, c0, *args[3:])
            y, h_n, c_n = ops.StackFunction.apply(*args, *weights)
        else:
            return None
        return y, (h_n, c_n) if c0 is not None else (h_n,)

    def _forward(self, input: Union[Tensor, PackedSequence], hx: Any) -> tuple[Any, Any]:
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)
        if input.dim() not in (2, 3):
            raise ValueError(self._input_dims_message.format(dim=input.dim()))
        batched = input.dim() == 3
        if hx is not None:
            self._check_hx_dims(hx, batched)
        self._check_input(input, ValueError)
        # The kernels are time-first; batch_first and unbatched are views of that.
        if not batched:
            x = input.unsqueeze(1)
        elif self.batch_first:
            x = input.transpose(0, 1)
        else:
            x = input
        if hx is None:
            state = self._zero_state(x, x.size(1))
        else:
            state = self._state_of(hx)
            if not batched:
                state = tuple(s.unsqueeze(1) for s in state)
        self._check_hidden(state, x, x.size(1))
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        y, state = self._run_layers(x, state, None)
        if not batched:
            return y.squeeze(1), self._hx_of(tuple(s.squeeze(1) for s in state))
        if self.batch_first:
            y = y.transpose(0, 1)
        return y, self._hx_of(state)

    def _forward_packed(self, packed: PackedSequence, hx: Any) -> tuple[PackedSequence, Any]:
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        self._check_input(data, self._packed_dtype_error)
        batch = int(batch_sizes[0])
        if hx is None:
            state = self._zero_state(data, batch)
        else:
            state = self._packed_state(hx, data, batch, sorted_indices)

        # The kernels take PackedSequence.data as it is: no padding to (T, N, I) and back.
        no_autocast = data.device.type == "cpu" and _autocasting(data) and not self._packed_cpu_autocast
        with torch.autocast("cpu", enabled=False) if no_autocast else contextlib.nullcontext():
            y, state = self._run_layers(data, state, batch_sizes)
        out = PackedSequence(y, batch_sizes, sorted_indices, unsorted_indices)
        if unsorted_indices is not None:
            state = tuple(s.index_select(1, unsorted_indices) for s in state)
        return out, self._hx_of(state)


class LSTM(RNNBase):
    r"""Multi-layer LSTM with the interface of :class:`torch.nn.LSTM`, run by fused kernels.

    Constructor, parameters (names, order, shapes, initialisation), ``state_dict``,
    inputs (batched, unbatched, :class:`~torch.nn.utils.rnn.PackedSequence`), outputs
    and errors are those of :class:`torch.nn.LSTM`; see its documentation. Each layer
    and direction is one call of :func:`lstm_ext.functional.lstm_layer`, which runs
    the whole sequence (forward and backward) in one fused op; on CPU a stack of
    single-direction layers runs as one op for all layers instead.

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

    _input_dims_message = "LSTM: Expected input to be 2D or 3D, got {dim}D instead"
    # nn.LSTM reports a wrong dtype as RuntimeError for packed input.
    _packed_dtype_error = RuntimeError

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
        device: _Device = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(
            "LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
            bidirectional, proj_size, device, dtype,
        )

    def _layer(self, x, state, weights, reverse, batch_sizes):  # type: ignore[no-untyped-def]
        y, (h, c) = functional.lstm_layer(
            x, state, *weights, reverse=reverse, batch_sizes=batch_sizes
        )
        return y, (h, c)

    def _zero_state(self, x: Tensor, batch: int) -> _HiddenState:
        rows = self._state_rows()
        h0 = x.new_zeros(rows, batch, self.proj_size or self.hidden_size)
        c0 = x.new_zeros(rows, batch, self.hidden_size)
        return h0, c0

    def _check_hx_dims(self, hx: _HiddenState, batched: bool) -> None:
        want = 3 if batched else 2
        if hx[0].dim() != want or hx[1].dim() != want:
            kind = "batched 3-D" if batched else "unbatched 2-D"
            raise RuntimeError(
                f"For {kind} input, hx and cx should also be {want}-D but got "
                f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
            )
        _check_two_states(hx, "lstm")

    def _state_of(self, hx: _HiddenState) -> _HiddenState:
        return hx[0], hx[1]

    def _hx_of(self, state: tuple[Tensor, ...]) -> _HiddenState:
        return state[0], state[1]

    def _packed_state(self, hx, data, batch, sorted_indices):  # type: ignore[no-untyped-def]
        _check_two_states(hx, "lstm")
        self._check_hidden(hx, data, batch)
        if sorted_indices is not None:
            return hx[0].index_select(1, sorted_indices), hx[1].index_select(1, sorted_indices)
        return hx[0], hx[1]

    def _check_hidden(self, hx: tuple[Tensor, ...], x: Tensor, batch: int) -> None:
        rows = self._state_rows()
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
        return self._forward(input, hx)


class _SingleStateRNN(RNNBase):
    """GRU and Elman RNN: the hidden state is one tensor, run by :func:`functional.rnn_layer`.

    The checks follow nn.GRU/nn.RNN: a given hx is permuted before it is checked for
    packed input, and ATen's words for devices and dtypes.
    """

    def _layer(self, x, state, weights, reverse, batch_sizes):  # type: ignore[no-untyped-def]
        y, h = functional.rnn_layer(
            x, state[0], *weights, mode=self.mode, reverse=reverse, batch_sizes=batch_sizes
        )
        return y, (h,)

    def _zero_state(self, x: Tensor, batch: int) -> tuple[Tensor]:
        return (x.new_zeros(self._state_rows(), batch, self.hidden_size),)

    def _check_hx_dims(self, hx: Tensor, batched: bool) -> None:
        want = 3 if batched else 2
        if hx.dim() != want:
            kind = "batched 3-D" if batched else "unbatched 2-D"
            raise RuntimeError(
                f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor"
            )

    def _state_of(self, hx: Tensor) -> tuple[Tensor]:
        return (hx,)

    def _hx_of(self, state: tuple[Tensor, ...]) -> Tensor:
        return state[0]

    def _packed_state(self, hx, data, batch, sorted_indices):  # type: ignore[no-untyped-def]
        if sorted_indices is not None:
            hx = hx.index_select(1, sorted_indices)
        self._check_hidden((hx,), data, batch)
        return (hx,)

    def _check_input(self, x: Tensor, dtype_error: type[Exception]) -> None:
        # Devices are ATen's concern in nn.GRU/nn.RNN, after the hidden size: see below.
        self._check_features(x, dtype_error)

    def _check_hidden(self, state: tuple[Tensor, ...], x: Tensor, batch: int) -> None:
        (hx,) = state
        expected = (self._state_rows(), batch, self.hidden_size)
        if hx.size() != expected:
            raise RuntimeError(f"Expected hidden size {expected}, got {list(hx.size())}")
        if hx.device != x.device:
            raise RuntimeError(
                "Input and hidden tensors are not at the same device, found input tensor "
                f"at {x.device} and hidden tensor at {hx.device}"
            )
        self._check_param_device(x)
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        weight_dtype = self.weight_hh_l0.dtype
        if hx.dtype != weight_dtype and not _autocasting(x):
            raise _dtype_mismatch(hx.dtype, weight_dtype, self.bias)

    @overload
    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> tuple[Tensor, Tensor]: ...

    @overload
    def forward(
        self, input: PackedSequence, hx: Optional[Tensor] = None
    ) -> tuple[PackedSequence, Tensor]: ...

    def forward(
        self, input: Union[Tensor, PackedSequence], hx: Optional[Tensor] = None
    ) -> tuple[Union[Tensor, PackedSequence], Tensor]:
        """Run all layers; arguments and results exactly as :meth:`torch.nn.GRU.forward`
        and :meth:`torch.nn.RNN.forward`: ``(output, h_n)``."""
        return self._forward(input, hx)


class GRU(_SingleStateRNN):
    r"""Multi-layer GRU with the interface of :class:`torch.nn.GRU`.

    Constructor, parameters (names, order, shapes, initialisation; gates r, z, n),
    ``state_dict``, inputs (batched, unbatched, :class:`~torch.nn.utils.rnn.PackedSequence`),
    ``hx`` (one tensor), outputs ``(output, h_n)`` and errors are those of
    :class:`torch.nn.GRU`. Each layer and direction is one call of
    :func:`lstm_ext.functional.rnn_layer` with ``mode="GRU"`` (on CPU a single-direction
    stack is one op, as for :class:`LSTM`).

    Derives from :class:`torch.nn.Module`, not ``nn.GRU``, for the reason given in
    :class:`LSTM`; see :func:`lstm_ext.to_torch` where a real ``nn.GRU`` is required.

    Example::

        >>> gru = lstm_ext.GRU(10, 20, num_layers=2)
        >>> output, h_n = gru(torch.randn(5, 3, 10))
    """

    _input_dims_message = "GRU: Expected input to be 2D or 3D, got {dim}D instead"

    @overload
    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: _Device = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None: ...

    @overload
    def __init__(self, *args: Any, **kwargs: Any) -> None: ...

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Arguments are taken as nn.GRU takes them (also its errors for unknown ones).
        _refuse_proj_size(kwargs)
        super().__init__("GRU", *args, **kwargs)


class RNN(_SingleStateRNN):
    r"""Multi-layer Elman RNN (tanh or ReLU) with the interface of :class:`torch.nn.RNN`.

    Constructor (``nonlinearity`` fourth positionally or by keyword, 'tanh' or 'relu'),
    parameters, ``state_dict``, inputs, ``hx`` (one tensor), outputs ``(output, h_n)``
    and errors are those of :class:`torch.nn.RNN`. Each layer and direction is one call
    of :func:`lstm_ext.functional.rnn_layer` with ``mode`` "RNN_TANH" or "RNN_RELU" (on
    CPU a single-direction stack is one op, as for :class:`LSTM`).

    Derives from :class:`torch.nn.Module`, not ``nn.RNN``, for the reason given in
    :class:`LSTM`; see :func:`lstm_ext.to_torch` where a real ``nn.RNN`` is required.

    Example::

        >>> rnn = lstm_ext.RNN(10, 20, num_layers=2, nonlinearity="relu")
        >>> output, h_n = rnn(torch.randn(5, 3, 10))
    """

    _input_dims_message = "RNN: Expected input to be 2D or 3D, got {dim}D tensor instead"
    _packed_cpu_autocast = True

    @overload
    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: _Device = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None: ...

    @overload
    def __init__(self, *args: Any, **kwargs: Any) -> None: ...

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Arguments are taken as nn.RNN takes them (also its errors for unknown ones).
        _refuse_proj_size(kwargs)
        if len(args) > 3:
            nonlinearity, args = args[3], args[:3] + args[4:]
        else:
            nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if nonlinearity not in _NONLINEARITY_MODES:
            raise ValueError(
                f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        super().__init__(_NONLINEARITY_MODES[nonlinearity], *args, **kwargs)
        self.nonlinearity = nonlinearity


class RNNCellBase(nn.Module):
    """What :class:`LSTMCell`, :class:`GRUCell` and :class:`RNNCell` share, as
    ``torch.nn.RNNCellBase``: parameters ``weight_ih`` (G*H, I), ``weight_hh`` (G*H, H),
    ``bias_ih``/``bias_hh`` (G*H) or None, their initialisation, ``extra_repr`` and
    ATen's size checks. Derives from :class:`torch.nn.Module` like :class:`RNNBase`."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool,
        num_chunks: int,
        device: _Device = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        # torch's cells validate nothing here beyond what torch.empty rejects; neither do we.
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        factory = {"device": device, "dtype": dtype}
        gates = num_chunks * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(gates, **factory))
            self.bias_hh = nn.Parameter(torch.empty(gates, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every parameter from U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)), as torch."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if "nonlinearity" in self.__dict__ and self.nonlinearity != "tanh":
            s += f", nonlinearity={self.nonlinearity}"
        return s

    def _check_sizes(self, x: Tensor, hx: tuple[Tensor, ...]) -> None:
        # Same checks and messages as ATen's cells (check_rnn_cell_forward_*).
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


class LSTMCell(RNNCellBase):
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
        device: _Device = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, 4, device, dtype)

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
        self._check_sizes(x, hx)
        for t in (x, *hx):
            if t.dtype != self.weight_ih.dtype and not _autocasting(x):
                raise RuntimeError(
                    "LSTMCell input and hidden state must have the weight dtype "
                    f"{self.weight_ih.dtype}, got {t.dtype}"
                )


class _SingleStateCell(RNNCellBase):
    """GRUCell and RNNCell: hx is one tensor, the step is :func:`functional.rnn_cell`."""

    def _mode(self) -> str:
        """The functional ``mode`` of this cell."""
        raise NotImplementedError

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        """One step: input (N, I) or (I), hx (N, H) or (H); returns h' of hx's shape,
        exactly as :meth:`torch.nn.GRUCell.forward` / :meth:`torch.nn.RNNCell.forward`."""
        name = self._torch_name
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if hx is None:
            h = x.new_zeros(x.size(0), self.hidden_size)
        else:
            h = hx if batched else hx.unsqueeze(0)
        mode = self._mode()
        self._check_sizes(x, (h,))
        if h.dim() != 2:  # a 2-D hx for 1-D input that passed ATen's checks (torch crashes)
            raise RuntimeError(
                f"For unbatched 1-D input, hx should also be 1-D but got {h.dim() - 1}-D tensor"
            )
        for t in (h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh):
            if t is not None and t.device != x.device:
                raise RuntimeError(
                    "Expected all tensors to be on the same device, but found at least two "
                    f"devices, {x.device} and {t.device}!"
                )
        if not _autocasting(x):
            for t in (x, h):
                if t.dtype != self.weight_ih.dtype:
                    raise _dtype_mismatch(t.dtype, self.weight_ih.dtype, self.bias)
        h = functional.rnn_cell(
            x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, mode=mode
        )
        return h if batched else h.squeeze(0)


class GRUCell(_SingleStateCell):
    r"""One GRU step with the interface of :class:`torch.nn.GRUCell`.

    Constructor, parameters (gates r, z, n), initialisation, inputs (1-D unbatched or
    2-D batched), ``hx`` (one tensor), output and errors are those of
    :class:`torch.nn.GRUCell`. Calls :func:`lstm_ext.functional.rnn_cell` with
    ``mode="GRU"``. Derives from :class:`torch.nn.Module`, not ``nn.GRUCell``.
    """

    _torch_name = "GRUCell"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: _Device = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, 3, device, dtype)

    def _mode(self) -> str:
        return "GRU"


class RNNCell(_SingleStateCell):
    r"""One Elman RNN step (tanh or ReLU) with the interface of :class:`torch.nn.RNNCell`.

    Constructor, parameters, initialisation, inputs, ``hx`` (one tensor), output and
    errors are those of :class:`torch.nn.RNNCell`; as there, ``nonlinearity`` is only
    checked when the cell runs. Calls :func:`lstm_ext.functional.rnn_cell` with ``mode``
    "RNN_TANH" or "RNN_RELU". Derives from :class:`torch.nn.Module`, not ``nn.RNNCell``.
    """

    _torch_name = "RNNCell"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        device: _Device = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, 1, device, dtype)
        self.nonlinearity = nonlinearity

    def _mode(self) -> str:
        if self.nonlinearity not in _NONLINEARITY_MODES:
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        return _NONLINEARITY_MODES[self.nonlinearity]
