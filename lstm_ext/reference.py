"""Plain-PyTorch LSTM layer: the specification the fused kernels are tested against.

It also serves as the differentiable path for double backward (see ``ops.py``):
every operation here is an ordinary autograd op, so second derivatives are exact.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


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
    if batch_sizes is None:
        sizes = [x.shape[1]] * x.shape[0]
        inputs = list(x.unbind(0))
    else:
        sizes = batch_sizes.tolist()
        inputs = list(x.split(sizes))
    h, c = h0, c0
    outputs: list[Tensor] = [x.new_zeros(())] * len(sizes)
    steps = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    for t in steps:
        n = sizes[t]
        gates = inputs[t] @ w_ih.t() + h[:n] @ w_hh.t()
        if b_ih is not None:
            gates = gates + b_ih
        if b_hh is not None:
            gates = gates + b_hh
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c[:n] + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        h = torch.cat([h_new, h[n:]]) if n < h.shape[0] else h_new
        c = torch.cat([c_new, c[n:]]) if n < c.shape[0] else c_new
        outputs[t] = h_new
    if batch_sizes is not None:
        y = torch.cat(outputs) if outputs else x.new_zeros(0, h0.shape[1])
    else:
        y = torch.stack(outputs) if outputs else x.new_zeros(0, x.shape[1], h0.shape[1])
    return y, h, c
