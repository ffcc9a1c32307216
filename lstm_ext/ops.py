"""Registers fake (meta) kernels and autograd for the compiled ``torch.ops.lstm_ext`` ops.

``lstm_forward`` runs a whole LSTM layer and ``rnn_forward`` a GRU or RNN layer (by
torch's mode string); their backwards are the ``lstm_backward`` and ``rnn_backward`` ops.
When a backward is itself recorded for differentiation (``create_graph=True``),
gradients are instead taken through the plain-PyTorch reference layer, so second
derivatives are exact. ``lstm_inference`` and ``rnn_inference`` are the same layers
without autograd, for calls that need no gradient; ``stack_inference`` runs a whole stack
of single-direction layers that way. ``stack_forward`` and ``stack_backward`` run such a
stack for training: :class:`StackFunction` is their autograd.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import _loader
from .reference import lstm_layer_reference, rnn_layer_reference

_loader.load()


# H-wide blocks that rnn_forward saves per row, by mode (csrc/cells.h: kSaved).
_RNN_SAVED = {"GRU": 4, "RNN_TANH": 1, "RNN_RELU": 1}


def _check_devices(
    x: Tensor, others: dict[str, Optional[Tensor]], batch_sizes: Optional[Tensor],
    op: str = "lstm_ext.lstm_layer",
) -> None:
    """The compiled kernels' device checks, for the fake kernels.

    A tensor on ``meta`` among real ones sends the call to the fake kernel, which must
    then refuse it as the real kernel would instead of returning uninitialised memory.
    """
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{op}: expected {name} on {x.device} like x, but got {t.device}")
    if batch_sizes is not None and batch_sizes.device.type != "cpu":
        raise RuntimeError(
            f"{op}: expected batch_sizes as a 1-D int64 CPU tensor, "
            f"but got a tensor on {batch_sizes.device}"
        )


def _check_layer_devices(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes) -> None:
    """``_check_devices`` for the inputs of lstm_forward and lstm_inference."""
    _check_devices(x, dict(h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=w_hr), batch_sizes)


@torch.library.register_fake("lstm_ext::lstm_forward")
def _lstm_forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse):
    _check_layer_devices(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes)
    rows = x.shape[:-1]  # (T, N), or (R,) for packed data
    H, P = c0.shape[1], h0.shape[1]
    hidden = x.new_empty(*rows, H) if w_hr is not None else x.new_empty(0)
    return (
        x.new_empty(*rows, P),
        x.new_empty(c0.shape[0], P),
        x.new_empty(c0.shape),
        x.new_empty(*rows, 4 * H),
        x.new_empty(*rows, H),
        hidden,
    )


@torch.library.register_fake("lstm_ext::lstm_inference")
def _lstm_inference_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse):
    _check_layer_devices(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes)
    P = h0.shape[1]
    return x.new_empty(*x.shape[:-1], P), x.new_empty(c0.shape[0], P), x.new_empty(c0.shape)


@torch.library.register_fake("lstm_ext::lstm_backward")
def _lstm_backward_fake(
    grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, reverse,
    y, gates, cells, hidden, output_mask,
):
    _check_devices(
        x,
        dict(grad_y=grad_y, grad_h_n=grad_h_n, grad_c_n=grad_c_n, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh,
             w_hr=w_hr, y=y, gates=gates, cells=cells, hidden=hidden),
        batch_sizes,
    )

    def maybe(mask: bool, like: Tensor) -> Tensor:
        return torch.empty_like(like) if mask else x.new_empty(0)

    want_dx, want_dw, want_db = output_mask
    return (
        maybe(want_dx, x),
        torch.empty_like(h0),
        torch.empty_like(c0),
        maybe(want_dw, w_ih),
        maybe(want_dw, w_hh),
        x.new_empty(w_hh.shape[0]) if want_db else x.new_empty(0),
        maybe(want_dw and w_hr is not None, w_hr if w_hr is not None else x),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse = inputs
    y, _, _, gates, cells, hidden = output
    # Unused outputs' gradients stay None: the backward op takes them optional, and
    # zero-filling T x N x 4H gates cost 5% of a training step.
    ctx.set_materialize_grads(False)
    ctx.reverse = reverse
    ctx.has_b_ih, ctx.has_b_hh = b_ih is not None, b_hh is not None
    ctx.save_for_backward(
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, y, gates, cells, hidden
    )


def _backward(ctx, grad_y, grad_h_n, grad_c_n, *_saved_grads):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, y, gates, cells, hidden = (
        ctx.saved_tensors
    )
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():
        def layer(*inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return lstm_layer_reference(*inputs, reverse=ctx.reverse, batch_sizes=batch_sizes)

        grads = _differentiable_backward(
            layer, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), need, (grad_y, grad_h_n, grad_c_n)
        )
        return (*grads, None, None)
    want_dw = need[3] or need[4] or need[7]
    want_db = need[5] or need[6]
    dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = torch.ops.lstm_ext.lstm_backward(
        grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, ctx.reverse,
        y, gates, cells, hidden, [need[0], want_dw, want_db],
    )
    grads = (dx, dh0, dc0, dw_ih, dw_hh, db, db, dw_hr)
    return (*(g if n else None for g, n in zip(grads, need)), None, None)


def _differentiable_backward(
    layer: Callable[..., Sequence[Tensor]], inputs: tuple, need: Sequence[bool], grad_outputs: tuple
) -> list[Optional[Tensor]]:
    """Gradients of ``layer(*inputs)`` (a reference layer) for the inputs in ``need``,
    recorded so that they can be differentiated again."""
    with torch.enable_grad():
        outputs = layer(*inputs)
    wrt = [t for t, n in zip(inputs, need) if n]
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
    grads = iter(
        torch.autograd.grad(
            [o for o, _ in pairs], wrt, [g for _, g in pairs],
            create_graph=True, allow_unused=True,
        )
    )
    result = [next(grads) if n else None for n in need[: len(inputs)]]
    # Inputs the recomputed graph does not reach (e.g. h0 with batch_sizes of zero) get zeros.
    return [torch.zeros_like(t) if n and r is None else r for t, n, r in zip(inputs, need, result)]


torch.library.register_autograd(
    "lstm_ext::lstm_forward", _backward, setup_context=_setup_context
)


@torch.library.register_fake("lstm_ext::rnn_forward")
def _rnn_forward_fake(x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, mode):
    y, h_n = _rnn_inference_fake(x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, mode)
    return y, h_n, x.new_empty(*x.shape[:-1], _RNN_SAVED[mode] * h0.shape[1])


@torch.library.register_fake("lstm_ext::rnn_inference")
def _rnn_inference_fake(x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, mode):
    if mode not in _RNN_SAVED:
        raise RuntimeError(f"lstm_ext.rnn_layer: mode must be GRU, RNN_TANH or RNN_RELU, but got '{mode}'")
    _check_devices(
        x, dict(h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh), batch_sizes, "lstm_ext.rnn_layer"
    )
    return x.new_empty(*x.shape[:-1], h0.shape[1]), x.new_empty(h0.shape)


@torch.library.register_fake("lstm_ext::rnn_backward")
def _rnn_backward_fake(grad_y, grad_h_n, x, h0, w_ih, w_hh, batch_sizes, reverse, mode, y, saved, output_mask):
    _check_devices(
        x, dict(grad_y=grad_y, grad_h_n=grad_h_n, h0=h0, w_ih=w_ih, w_hh=w_hh, y=y, saved=saved),
        batch_sizes, "lstm_ext.rnn_layer",
    )
    want_dx, want_dw, want_db = output_mask

    def maybe(mask: bool, like: Tensor) -> Tensor:
        return torch.empty_like(like) if mask else x.new_empty(0)

    gates = w_hh.shape[0]
    return (
        maybe(want_dx, x), torch.empty_like(h0), maybe(want_dw, w_ih), maybe(want_dw, w_hh),
        x.new_empty(gates) if want_db else x.new_empty(0), x.new_empty(gates) if want_db else x.new_empty(0),
    )


def _rnn_setup_context(ctx, inputs, output) -> None:
    x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, mode = inputs
    y, _, saved = output
    ctx.set_materialize_grads(False)
    ctx.reverse, ctx.mode = reverse, mode
    ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, y, saved)


def _rnn_backward(ctx, grad_y, grad_h_n, *_saved_grad):
    x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, y, saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():
        def layer(*inputs: Tensor) -> tuple[Tensor, Tensor]:
            return rnn_layer_reference(*inputs, mode=ctx.mode, reverse=ctx.reverse, batch_sizes=batch_sizes)

        grads = _differentiable_backward(layer, (x, h0, w_ih, w_hh, b_ih, b_hh), need, (grad_y, grad_h_n))
        return (*grads, None, None, None)
    grads = torch.ops.lstm_ext.rnn_backward(
        grad_y, grad_h_n, x, h0, w_ih, w_hh, batch_sizes, ctx.reverse, ctx.mode, y, saved,
        [need[0], need[2] or need[3], need[4] or need[5]],
    )
    return (*(g if n else None for g, n in zip(grads, need)), None, None, None)


torch.library.register_autograd(
    "lstm_ext::rnn_forward", _rnn_backward, setup_context=_rnn_setup_context
)


def _check_stack(op: str, x, h0, c0, weights, batch_sizes, mode) -> None:
    """The checks of the stack ops that their fake kernels repeat."""
    if mode != "LSTM" and mode not in _RNN_SAVED:
        raise RuntimeError(f"{op}: mode must be LSTM, GRU, RNN_TANH or RNN_RELU, but got '{mode}'")
    _check_devices(
        x, {**dict(h0=h0, c0=c0), **{f"weights[{i}]": w for i, w in enumerate(weights)}}, batch_sizes, op
    )


@torch.library.register_fake("lstm_ext::stack_inference")
def _stack_inference_fake(x, h0, c0, weights, has_biases, has_projections, batch_sizes, mode):
    _check_stack("lstm_ext.stack_inference", x, h0, c0, weights, batch_sizes, mode)
    c_n = x.new_empty(c0.shape) if c0 is not None else x.new_empty(0)
    return x.new_empty(*x.shape[:-1], h0.shape[-1]), x.new_empty(h0.shape), c_n


@torch.library.register_fake("lstm_ext::stack_forward")
def _stack_forward_fake(x, h0, c0, weights, has_biases, has_projections, batch_sizes, mode):
    _check_stack("lstm_ext.stack_forward", x, h0, c0, weights, batch_sizes, mode)
    layers, rows = h0.shape[0], x.shape[:-1]
    H = weights[1].shape[0] // (4 if mode == "LSTM" else 3 if mode == "GRU" else 1)
    width = 4 * H if mode == "LSTM" else _RNN_SAVED[mode] * H
    c_n = x.new_empty(c0.shape) if c0 is not None else x.new_empty(0)
    return (
        [x.new_empty(*rows, h0.shape[-1]) for _ in range(layers)],
        x.new_empty(h0.shape),
        c_n,
        [x.new_empty(*rows, width) for _ in range(layers)],
        [x.new_empty(*rows, H) if c0 is not None else x.new_empty(0) for _ in range(layers)],
        [x.new_empty(*rows, H) if has_projections else x.new_empty(0) for _ in range(layers)],
    )


@torch.library.register_fake("lstm_ext::stack_backward")
def _stack_backward_fake(
    grad_y, grad_h_n, grad_c_n, x, h0, c0, weights, has_biases, has_projections, batch_sizes, mode,
    ys, saved, cells, hidden, output_mask,
):
    _check_stack("lstm_ext.stack_backward", x, h0, c0, weights, batch_sizes, mode)
    want_dx, want_dw, want_db = output_mask
    dweights = [
        torch.empty_like(w) if (want_db if bias else want_dw) else x.new_empty(0)
        for w, bias in zip(weights, _are_biases(len(weights), has_biases, has_projections))
    ]
    return (
        torch.empty_like(x) if want_dx else x.new_empty(0),
        torch.empty_like(h0),
        torch.empty_like(c0) if c0 is not None else x.new_empty(0),
        dweights,
    )


def _are_biases(n_weights: int, has_biases: bool, has_projections: bool) -> list[bool]:
    """Which entries of a stack's flat weight list are biases."""
    per_layer = 2 + 2 * has_biases + has_projections
    return [has_biases and k % per_layer in (2, 3) for k in range(n_weights)]


def _layer_weights(weights: Sequence[Tensor], layer: int, has_biases: bool, has_projections: bool):
    """Layer ``layer``'s (w_ih, w_hh, b_ih, b_hh, w_hr) from a stack's flat weight list, None where absent."""
    per_layer = 2 + 2 * has_biases + has_projections
    w = list(weights[layer * per_layer:(layer + 1) * per_layer])
    biases = (w[2], w[3]) if has_biases else (None, None)
    return w[0], w[1], *biases, w[-1] if has_projections else None


def stack_reference(x, h0, c0, weights, has_biases, has_projections, batch_sizes, mode):
    """``stack_forward``'s y, h_n and c_n (None without a cell state) through the
    plain-PyTorch layers: the stack's double backward differentiates this."""
    finals_h, finals_c = [], []
    for layer in range(h0.shape[0]):
        w_ih, w_hh, b_ih, b_hh, w_hr = _layer_weights(weights, layer, has_biases, has_projections)
        if mode == "LSTM":
            x, h, c = lstm_layer_reference(x, h0[layer], c0[layer], w_ih, w_hh, b_ih, b_hh, w_hr,
                                           batch_sizes=batch_sizes)
            finals_c.append(c)
        else:
            x, h = rnn_layer_reference(x, h0[layer], w_ih, w_hh, b_ih, b_hh, mode=mode, batch_sizes=batch_sizes)
        finals_h.append(h)
    return x, torch.stack(finals_h), torch.stack(finals_c) if finals_c else None


class StackFunction(torch.autograd.Function):
    """A stack of single-direction layers as one ``stack_forward`` call, differentiated by
    one ``stack_backward`` call (on CPU both overlap the layers in time, a wavefront);
    through :func:`stack_reference` when the backward is itself differentiated.
    Arguments: stack_forward's, the weights last and spread out."""

    @staticmethod
    def forward(ctx, x, h0, c0, has_biases, has_projections, batch_sizes, mode, *weights):
        ys, h_n, c_n, saved, cells, hidden = torch.ops.lstm_ext.stack_forward(
            x, h0, c0, list(weights), has_biases, has_projections, batch_sizes, mode
        )
        ctx.set_materialize_grads(False)
        ctx.config = (has_biases, has_projections, mode, len(ys), len(weights))
        ctx.save_for_backward(x, h0, c0, batch_sizes, *weights, *ys, *saved, *cells, *hidden)
        if c0 is None:
            ctx.mark_non_differentiable(c_n)
        return ys[-1], h_n, c_n

    @staticmethod
    def backward(ctx, grad_y, grad_h_n, grad_c_n):
        has_biases, has_projections, mode, layers, n_weights = ctx.config
        x, h0, c0, batch_sizes, *rest = ctx.saved_tensors
        weights, rest = rest[:n_weights], rest[n_weights:]
        ys, saved, cells, hidden = (rest[i * layers:(i + 1) * layers] for i in range(4))
        need_state, need_weights = ctx.needs_input_grad[:3], ctx.needs_input_grad[7:]
        if torch.is_grad_enabled():
            def stack(x, h0, c0, *weights):
                return stack_reference(x, h0, c0, weights, has_biases, has_projections, batch_sizes, mode)

            dx, dh0, dc0, *dws = _differentiable_backward(
                stack, (x, h0, c0, *weights), (*need_state, *need_weights), (grad_y, grad_h_n, grad_c_n)
            )
            return (dx, dh0, dc0, None, None, None, None, *dws)
        is_bias = _are_biases(n_weights, has_biases, has_projections)
        want_dw = any(n and not b for n, b in zip(need_weights, is_bias))
        want_db = any(n and b for n, b in zip(need_weights, is_bias))
        dx, dh0, dc0, dws = torch.ops.lstm_ext.stack_backward(
            grad_y, grad_h_n, grad_c_n, x, h0, c0, list(weights), has_biases, has_projections, batch_sizes, mode,
            list(ys), list(saved), list(cells), list(hidden), [need_state[0], want_dw, want_db],
        )
        grads = (dx, dh0, dc0, None, None, None, None, *dws)
        return tuple(g if n else None for g, n in zip(grads, ctx.needs_input_grad))
