"""Plain-PyTorch recurrent layers: the specification the fused kernels are tested against.

It also serves as the differentiable path for double backward (see ``ops.py``):
every operation here is an ordinary autograd op, so second derivatives are exact.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

# One step of a cell: (input rows (n, I), state rows (n, *) each) -> (output (n, P), new state).
_Step = Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, tuple[Tensor, ...]]]

RNN_MODES = ("RNN_TANH", "RNN_RELU", "GRU")


def _run_steps(
    x: Tensor,
    state: tuple[Tensor, ...],
    step: _Step,
    out_size: int,
    reverse: bool,
    batch_sizes: Optional[Tensor],
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Drive ``step`` over a time-first sequence x (T, N, I), or over packed data
    (R, I) with ``batch_sizes``; each state tensor has the batch in dim 0.

    Packed, step t takes the next ``batch_sizes[t]`` rows of x, which update the first
    ``batch_sizes[t]`` batch entries; the others keep their state. Returns y (T, N,
    out_size) or (R, out_size), and the final state.
    """
    if batch_sizes is None:
        sizes = [x.shape[1]] * x.shape[0]
        inputs = list(x.unbind(0))
    else:
        sizes = batch_sizes.tolist()
        inputs = list(x.split(sizes))
    outputs: list[Tensor] = [x.new_zeros(())] * len(sizes)
    steps = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    for t in steps:
        n = sizes[t]
        out, new = step(inputs[t], tuple(s[:n] for s in state))
        state = tuple(
            torch.cat([s_new, s[n:]]) if n < s.shape[0] else s_new
            for s_new, s in zip(new, state)
        )
        outputs[t] = out
    if batch_sizes is not None:
        y = torch.cat(outputs) if outputs else x.new_zeros(0, out_size)
    else:
        y = torch.stack(outputs) if outputs else x.new_zeros(0, x.shape[1], out_size)
    return y, state


def _affine(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    return x @ w.t() if b is None else x @ w.t() + b


def lstm_layer_reference(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    w_hr: Optional[Tensor] = None,
    reverse: bool = False,
    batch_sizes: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer over a whole sequence, step by step, with nn.LSTM's semantics.

    Shapes: x (T, N, I), h0 (N, P), c0 (N, H), w_ih (4H, I), w_hh (4H, P),
    b_ih/b_hh (4H), w_hr (P, H) or None (then P == H). Gate order i, f, g, o.
    With ``batch_sizes`` (non-increasing, length T), x is PackedSequence.data (R, I):
    step t takes the next ``batch_sizes[t]`` rows, which update the first
    ``batch_sizes[t]`` batch entries; the others keep their state.
    Returns y (T, N, P) or, packed, (R, P); h_n (N, P), c_n (N, H).
    """

    def step(x_t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        h, c = state
        gates = x_t @ w_ih.t() + h @ w_hh.t()
        if b_ih is not None:
            gates = gates + b_ih
        if b_hh is not None:
            gates = gates + b_hh
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        return h_new, (h_new, c_new)

    y, (h, c) = _run_steps(x, (h0, c0), step, h0.shape[1], reverse, batch_sizes)
    return y, h, c


def rnn_layer_reference(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    mode: str = "RNN_TANH",
    reverse: bool = False,
    batch_sizes: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """One Elman RNN or GRU layer over a whole sequence, step by step, with nn.RNN's
    and nn.GRU's semantics.

    ``mode`` is "RNN_TANH" (h' = tanh(W_ih x + b_ih + W_hh h + b_hh)), "RNN_RELU"
    (the same with relu) or "GRU" (gates r, z, n stacked in that order;
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h).
    Shapes: x (T, N, I), h0 (N, H), w_ih (G*H, I), w_hh (G*H, H), b_ih/b_hh (G*H),
    with G = 3 for GRU and 1 otherwise. ``batch_sizes`` and ``reverse`` as in
    :func:`lstm_layer_reference`. Returns y (T, N, H) or, packed, (R, H); h_n (N, H).
    """
    if mode not in RNN_MODES:
        raise ValueError(f"Unknown RNN mode {mode!r}: expected one of {', '.join(RNN_MODES)}")
    activation = torch.relu if mode == "RNN_RELU" else torch.tanh

    def step(x_t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        (h,) = state
        gi, gh = _affine(x_t, w_ih, b_ih), _affine(h, w_hh, b_hh)
        if mode == "GRU":
            i_r, i_z, i_n = gi.chunk(3, dim=1)
            h_r, h_z, h_n = gh.chunk(3, dim=1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h_new = (1 - z) * n + z * h
        else:
            h_new = activation(gi + gh)
        return h_new, (h_new,)

    y, (h,) = _run_steps(x, (h0,), step, h0.shape[1], reverse, batch_sizes)
    return y, h
