"""Every way of differentiating lstm_ext against torch: torch.func transforms, forward-mode
AD, and the ops' refusal of derivatives they do not have (never a silently wrong result)."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vjp, vmap
from torch.nn.utils.rnn import pack_sequence

from lstm_ext.modules import LSTM, LSTMCell

I, H, T, N = 3, 4, 5, 2


def pair(ref_type: type[nn.Module] = nn.LSTM, **config) -> tuple[nn.Module, nn.Module]:
    """A float64 torch module and its lstm_ext twin with the same weights."""
    ext_type = {nn.LSTM: LSTM, nn.LSTMCell: LSTMCell}[ref_type]
    ref = ref_type(**config, dtype=torch.float64)
    ext = ext_type(**config, dtype=torch.float64)
    ext.load_state_dict(ref.state_dict())
    return ref, ext


def close(got: Tensor, expected: Tensor) -> None:
    assert expected.abs().max() > 0, "a zero reference would hide a dropped derivative"
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def seq(*shape: int) -> Tensor:
    return torch.randn(*shape, dtype=torch.float64)


CONFIGS = [
    dict(input_size=I, hidden_size=H),
    dict(input_size=I, hidden_size=H, num_layers=2, bidirectional=True),
    dict(input_size=I, hidden_size=H, proj_size=2, batch_first=True),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_func_grad_of_input_and_parameters(config):
    ref, ext = pair(**config)
    x = seq(T, N, I)

    def loss(module, params, x):
        y, (h, c) = functional_call(module, params, (x,))
        return (y.sin().sum() + h.cos().sum() + (c * c).sum())

    for argnums in (1, 2):
        got = grad(lambda p, x: loss(ext, p, x), argnums=argnums - 1)(dict(ext.named_parameters()), x)
        want = grad(lambda p, x: loss(ref, p, x), argnums=argnums - 1)(dict(ref.named_parameters()), x)
        if isinstance(want, dict):
            assert got.keys() == want.keys()
            for name in want:
                close(got[name], want[name])
        else:
            close(got, want)


@pytest.mark.parametrize("config", CONFIGS)
def test_func_vjp_and_jacobians(config):
    ref, ext = pair(**config)
    x = seq(T, N, I) if not config.get("batch_first") else seq(N, T, I)
    out_ext, pull_ext = vjp(lambda x: ext(x)[0], x)
    out_ref, pull_ref = vjp(lambda x: ref(x)[0], x)
    close(out_ext, out_ref)
    v = torch.randn_like(out_ref)
    close(pull_ext(v)[0], pull_ref(v)[0])
    for jac in (jacrev, jacfwd):
        close(jac(lambda x: ext(x)[0])(x), jac(lambda x: ref(x)[0])(x))


def test_func_jvp_of_all_outputs():
    ref, ext = pair(input_size=I, hidden_size=H, num_layers=2)
    x, h0, c0 = seq(T, N, I), seq(2, N, H), seq(2, N, H)
    tangents = (torch.randn_like(x), torch.randn_like(h0), torch.randn_like(c0))

    def flat(module):
        return lambda x, h, c: torch.cat([t.flatten() for t in (lambda y, hc: (y, *hc))(*module(x, (h, c)))])

    got = jvp(flat(ext), (x, h0, c0), tangents)
    want = jvp(flat(ref), (x, h0, c0), tangents)
    close(got[0], want[0])
    close(got[1], want[1])


def test_func_hessian():
    ref, ext = pair(input_size=2, hidden_size=2)
    x = seq(3, 1, 2)
    f = lambda module: lambda x: module(x)[0].tanh().sum()  # noqa: E731
    close(jacfwd(jacrev(f(ext)))(x), jacfwd(jacrev(f(ref)))(x))


def test_func_vmap_matches_a_loop():
    # nn.LSTM has no batching rule (aten::lstm), so the reference is a loop over the batch.
    _, ext = pair(input_size=I, hidden_size=H, bidirectional=True)
    xs = seq(3, T, N, I)
    got_y, (got_h, got_c) = vmap(ext)(xs)
    for k in range(xs.shape[0]):
        y, (h, c) = ext(xs[k])
        close(got_y[k], y)
        close(got_h[k], h)
        close(got_c[k], c)
    per_sample = vmap(grad(lambda x: ext(x)[0].square().sum()))(xs)
    for k in range(xs.shape[0]):
        x = xs[k].clone().requires_grad_()
        ext(x)[0].square().sum().backward()
        close(per_sample[k], x.grad)


def test_cell_under_transforms():
    ref, ext = pair(nn.LSTMCell, input_size=I, hidden_size=H)
    x, h, c = seq(N, I), seq(N, H), seq(N, H)
    f = lambda m: lambda x, h, c: torch.cat([t.flatten() for t in m(x, (h, c))])  # noqa: E731
    for jac in (jacrev, jacfwd):
        got, want = jac(f(ext), argnums=(0, 1, 2))(x, h, c), jac(f(ref), argnums=(0, 1, 2))(x, h, c)
        for g, w in zip(got, want):
            close(g, w)


@pytest.mark.parametrize("module_type", [nn.LSTM, nn.LSTMCell])
def test_forward_ad(module_type):
    ref, ext = pair(module_type, input_size=I, hidden_size=H)
    x = seq(T, N, I) if module_type is nn.LSTM else seq(N, I)
    tangent = torch.randn_like(x)
    results = []
    for module in (ext, ref):
        with fwAD.dual_level():
            out = module(fwAD.make_dual(x, tangent))
            flat = out[0] if module_type is nn.LSTM else out
            tensors = (flat, *out[1]) if module_type is nn.LSTM else flat
            results.append([fwAD.unpack_dual(t) for t in tensors])
    for (primal, tan), (ref_primal, ref_tan) in zip(*results):
        close(primal, ref_primal)
        close(tan, ref_tan)


def test_forward_ad_packed_and_no_grad():
    # No input requires grad here, which used to pick the inference op (no derivative).
    ref, ext = pair(input_size=I, hidden_size=H)
    packed = pack_sequence([seq(4, I), seq(2, I)])
    tangent = torch.randn_like(packed.data)
    tangents = []
    with torch.no_grad():
        for module in (ext, ref):
            with fwAD.dual_level():
                dual = packed._replace(data=fwAD.make_dual(packed.data, tangent))
                tangents.append(fwAD.unpack_dual(module(dual)[0].data).tangent)
    close(tangents[0], tangents[1])


def op_args(requires_grad: bool = False) -> list:
    x = torch.randn(T, N, I, requires_grad=requires_grad)
    h = torch.zeros(N, H)
    return [x, h, h, torch.randn(4 * H, I), torch.randn(4 * H, H), None, None, None, None, False]


def test_inference_op_refuses_inputs_that_require_grad():
    with pytest.raises(RuntimeError, match="lstm_inference has no derivative"):
        torch.ops.lstm_ext.lstm_inference(*op_args(requires_grad=True))
    with torch.no_grad():  # nothing to differentiate: fine
        torch.ops.lstm_ext.lstm_inference(*op_args(requires_grad=True))


@pytest.mark.parametrize("op", ["lstm_forward", "lstm_inference"])
def test_ops_refuse_forward_mode_tangents(op):
    args = op_args()
    with fwAD.dual_level():
        args[0] = fwAD.make_dual(args[0], torch.ones_like(args[0]))
        with pytest.raises(RuntimeError, match="has no (forward-mode )?derivative"):
            getattr(torch.ops.lstm_ext, op)(*args)


def test_backward_op_refuses_to_be_differentiated():
    args = op_args(requires_grad=True)
    y, h_n, c_n, gates, cells, hidden = torch.ops.lstm_ext.lstm_forward(*args)
    x, h0, c0, w_ih, w_hh = args[:5]
    with pytest.raises(RuntimeError, match="lstm_backward has no derivative"):
        torch.ops.lstm_ext.lstm_backward(
            torch.ones_like(y), None, None, x, h0, c0, w_ih, w_hh, None, None, False,
            y, gates, cells, hidden, [True, True, True],
        )


def test_trace_made_under_no_grad_fails_loudly_when_trained():
    module = LSTM(I, H)
    with torch.no_grad(), pytest.warns(Warning):  # TorchScript's deprecation and tracer warnings
        traced = torch.jit.trace(module, (torch.randn(T, N, I),))
    with pytest.raises(RuntimeError, match="stack_inference has no derivative"):
        traced(torch.randn(T, N, I))[0].sum().backward()


@pytest.mark.parametrize("strict", [False, True])
def test_export_keeps_the_fused_op(strict):
    # Export traces through functorch machinery: the transform routing must not send it
    # to the step-by-step reference layer.
    module = LSTM(I, H, num_layers=2)
    x = torch.randn(T, N, I)
    program = torch.export.export(module, (x,), strict=strict)
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count("lstm_ext.lstm_forward.default") == 2
    torch.testing.assert_close(program.module()(x)[0], module(x)[0], rtol=0, atol=0)
