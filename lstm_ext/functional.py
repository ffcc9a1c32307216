"""Functional interface to the fused recurrent kernels (LSTM, GRU, Elman RNN)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import ops  # noqa: F401  (registers fakes and autograd for torch.ops.lstm_ext)
from .reference import RNN_MODES, lstm_layer_reference, rnn_layer_reference


def _needs_reference(tensors: tuple[Optional[Tensor], ...]) -> bool:
    """Whether this call must take the plain-PyTorch layer instead of the fused op.

    The op's autograd is reverse mode only: torch.func transforms (grad, vjp, jacrev,
    jacfwd, jvp, vmap, hessian) and forward-mode AD would otherwise get no or wrong
    derivatives. The reference layer is made of ordinary ops, so every transform
    composes with it exactly. Under torch.compile the op (with its fake kernel and
    registered autograd) is what gets traced.
    """
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.maybe_current_level() is not None:
        return True
    return fwAD._current_level >= 0 and any(
        t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors
    )


def _run_op(forward, inference, args: tuple, n_inputs: int, n_outputs: int) -> tuple[Tensor, ...]:
    """A fused layer op's outputs: through ``forward`` (which records for autograd) when
    one of the first ``n_inputs`` arguments needs a gradient, else through ``inference``,
    which skips saving every step's state for a backward."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:n_inputs]):
        return forward(*args)[:n_outputs]
    return inference(*args)[:n_outputs]


def lstm_layer(
    x: Tensor,
    hx: tuple[Tensor, Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    w_hr: Optional[Tensor] = None,
    *,
    reverse: bool = False,
    batch_sizes: Optional[Tensor] = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Run one single-direction LSTM layer over a whole sequence in one fused call.

    Args:
        x: input of shape (T, N, I), time first; with ``batch_sizes``, PackedSequence.data
            of shape (sum(batch_sizes), I).
        hx: (h0, c0) of shapes (N, P) and (N, H); P == H unless ``w_hr`` is given.
        w_ih, w_hh: (4H, I) and (4H, P), gates stacked in nn.LSTM's order i, f, g, o.
        b_ih, b_hh: optional biases of shape (4H).
        w_hr: optional projection (P, H): h_t = w_hr @ (o_t * tanh(c_t)), as ``proj_size``.
        reverse: process the sequence from t = T-1 down to 0.
        batch_sizes: optional int64 CPU tensor (T,), non-increasing, as in
            ``PackedSequence``: step t takes the next ``batch_sizes[t]`` rows of x, which
            update the first ``batch_sizes[t]`` of the N = batch_sizes[0] batch entries;
            the others keep their state.

    Returns:
        ``y`` (T, N, P), or (sum(batch_sizes), P) laid out as x, and ``(h_n, c_n)``, each
        batch entry's state after its last step.
    """
    h0, c0 = hx
    args = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)
    # hidden_size 0 (legal for nn.LSTMCell) has nothing for the kernels to compute.
    if w_hh.shape[0] == 0 or _needs_reference(args[:8]):
        y, h_n, c_n = lstm_layer_reference(*args[:8], reverse=reverse, batch_sizes=batch_sizes)
        return y, (h_n, c_n)
    y, h_n, c_n = _run_op(torch.ops.lstm_ext.lstm_forward, torch.ops.lstm_ext.lstm_inference, args, 8, 3)
    return y, (h_n, c_n)


def lstm_cell(
    x: Tensor,
    hx: tuple[Tensor, Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step for a batch: x (N, I), h and c (N, H). Returns (h', c')."""
    _, (h_n, c_n) = lstm_layer(x.unsqueeze(0), hx, w_ih, w_hh, b_ih, b_hh)
    return h_n, c_n


def rnn_layer(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    *,
    mode: str,
    reverse: bool = False,
    batch_sizes: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Run one single-direction Elman RNN or GRU layer over a whole sequence in one fused call.

    Args:
        x: input of shape (T, N, I), time first; with ``batch_sizes``, PackedSequence.data
            of shape (sum(batch_sizes), I).
        h0: initial state (N, H).
        w_ih, w_hh: (G*H, I) and (G*H, H); G = 3 for "GRU" (gates stacked in nn.GRU's
            order r, z, n), G = 1 for "RNN_TANH"/"RNN_RELU".
        b_ih, b_hh: optional biases of shape (G*H).
        mode: "RNN_TANH", "RNN_RELU" or "GRU", with nn.RNN's/nn.GRU's equations.
        reverse: process the sequence from t = T-1 down to 0.
        batch_sizes: optional int64 CPU tensor (T,), non-increasing, as in
            ``PackedSequence``: step t takes the next ``batch_sizes[t]`` rows of x, which
            update the first ``batch_sizes[t]`` of the N = batch_sizes[0] batch entries;
            the others keep their state.

    Returns:
        ``y`` (T, N, H), or (sum(batch_sizes), H) laid out as x, and ``h_n`` (N, H), each
        batch entry's state after its last step.

    Raises:
        ValueError: ``mode`` is not one of the three above.
    """
    if mode not in RNN_MODES:
        raise ValueError(f"Unknown RNN mode {mode!r}: expected one of {', '.join(RNN_MODES)}")
    args = (x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, mode)
    # hidden_size 0 (legal for nn.RNNCell, nn.GRUCell) has nothing for the kernels to compute.
    if w_hh.shape[0] == 0 or _needs_reference(args[:6]):
        return rnn_layer_reference(*args[:6], mode=mode, reverse=reverse, batch_sizes=batch_sizes)
    y, h_n = _run_op(torch.ops.lstm_ext.rnn_forward, torch.ops.lstm_ext.rnn_inference, args, 6, 2)
    return y, h_n


def rnn_cell(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    *,
    mode: str,
) -> Tensor:
    """One Elman RNN or GRU step for a batch: x (N, I), h (N, H). Returns h' (N, H).

    ``mode`` and the weights as in :func:`rnn_layer`.
    """
    _, h_n = rnn_layer(x.unsqueeze(0), h, w_ih, w_hh, b_ih, b_hh, mode=mode)
    return h_n
