"""Parity of the layer ops on a device, per cell and dtype, with the CPU float64 op: outputs
and gradients.

The cells (``--cells``, default all): ``lstm`` (lstm_ext.functional.lstm_layer, with a
projection where the case has one), ``gru``, ``rnn_tanh`` and ``rnn_relu``
(lstm_ext.functional.rnn_layer with mode GRU, RNN_TANH, RNN_RELU). Each case runs every
cell: one table row per cell, case and dtype. The single-state cells have no c_n, dc0 or
dw_hr, and nothing but the LSTM takes the cases' projection; those columns print "-".

For each output and gradient it prints the relative error max|got - want| / max|want|
(one number per tensor, well defined whatever the tensor's scale), and fails (exit 1)
where one exceeds its tolerance (``tolerance``), the same for every cell but one:
  float64 1e-12;
  float32 1e-5, 3e-5 for the weight and bias gradients (nn.RNN, tanh, run in float32 on
  CPU is 1.4e-5 off in db at T=100, N=1, H=512: an ungated recurrence, a sum over T);
  bfloat16 and float16, in units of their own rounding u = 2^-8 and 2^-11: 8u for the
  outputs and the gradients of x, h0 and c0, 32u for the weight and bias gradients, which
  sum rounded terms over all rows with cancellation (nn.LSTM run in bfloat16 on CPU is
  18u off in db at T=50, N=32, H=256; this op in float16 on CPU, 16u);
  except rnn_relu's gradients in bfloat16 and float16, 128u: relu' is a step, so each
  pre-activation within rounding of 0 switches a whole term on or off (nn.RNN, relu, run in
  bfloat16 on CPU is 51u off in dx on these cases; its outputs keep 8u).

``--device cuda`` (the default, gpu_check.sh) compares CUDA float64/float32/float16/
bfloat16, TF32 off; ``--device cpu`` compares CPU float32/bfloat16 through the same code,
so CI notices when an op's contract changes. ``--small`` runs one small case per cell (for
compute-sanitizer; gpu_check.sh gives it ``--cells lstm,gru``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NamedTuple

import torch

import lstm_ext  # noqa: F401
from lstm_ext.functional import lstm_layer, rnn_layer

# Table columns: the outputs, then the gradients of the inputs ("d" + input name).
INPUTS = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"]
NAMES = ["y", "h_n", "c_n", "dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh", "dw_hr"]
SUMS_OVER_ROWS = {"dw_ih", "dw_hh", "db_ih", "db_hh", "dw_hr"}
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


class Cell(NamedTuple):
    gates: int  # G: w_ih is (G*H, I), w_hh (G*H, P or H), the biases (G*H)
    has_c: bool  # a cell state c0 / c_n, and a projection w_hr where the case has one
    # layer(inputs by name, reverse=, batch_sizes=) -> [y, h_n] or [y, h_n, c_n]
    layer: Callable[..., list]


def _lstm(t, **kw):
    y, (h, c) = lstm_layer(t["x"], (t["h0"], t["c0"]), t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"],
                           t.get("w_hr"), **kw)
    return [y, h, c]


def _rnn(mode):
    return lambda t, **kw: list(rnn_layer(t["x"], t["h0"], t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"],
                                          mode=mode, **kw))


CELLS = {
    "lstm": Cell(4, True, _lstm),
    "gru": Cell(3, False, _rnn("GRU")),
    "rnn_tanh": Cell(1, False, _rnn("RNN_TANH")),
    "rnn_relu": Cell(1, False, _rnn("RNN_RELU")),
}


def tolerance(dtype: torch.dtype, name: str, cell: str = "lstm") -> float:
    """Largest relative error accepted for output or gradient `name` of `cell` computed in `dtype`."""
    if dtype == torch.float64:
        return 1e-12
    if dtype == torch.float32:
        return 3e-5 if name in SUMS_OVER_ROWS else 1e-5
    if cell == "rnn_relu" and name.startswith("d"):
        return UNIT_ROUNDOFF[dtype] * 128
    return UNIT_ROUNDOFF[dtype] * (32 if name in SUMS_OVER_ROWS else 8)


def names(cell: str, proj: bool) -> list[str]:
    """The table columns that `cell` has in a case with (`proj`) or without a projection."""
    skip = set() if CELLS[cell].has_c else {"c_n", "dc0", "dw_hr"}
    if not proj:
        skip.add("dw_hr")
    return [n for n in NAMES if n not in skip]


def layer_inputs(cell: str, T, N, I, H, P, batch_sizes, seed=0) -> dict:
    """The cell's inputs by name, float64; x is (T, N, I), or PackedSequence.data's
    (sum(batch_sizes), I) with batch_sizes. P is 0 (no projection) for the single-state cells."""
    G, has_c = CELLS[cell].gates, CELLS[cell].has_c
    g = torch.Generator().manual_seed(seed)
    # nn.LSTM's init scale keeps the recurrence stable, so differences are rounding, not chaos.
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) / H ** 0.5  # noqa: E731
    t = {"x": r(int(batch_sizes.sum()), I) if batch_sizes is not None else r(T, N, I), "h0": r(N, P or H)}
    if has_c:
        t["c0"] = r(N, H)
    t.update(w_ih=r(G * H, I), w_hh=r(G * H, P or H), b_ih=r(G * H), b_hh=r(G * H))
    if P:
        t["w_hr"] = r(P, H)
    return t


def outputs_and_grads(cell: str, inputs: dict, device, dtype, reverse, batch_sizes) -> dict:
    """{column name: tensor}: the cell's outputs and the gradients of all its inputs."""
    ts = {k: v.to(device, dtype).requires_grad_() for k, v in inputs.items()}
    outs = CELLS[cell].layer(ts, reverse=reverse, batch_sizes=batch_sizes)
    # A fixed, non-uniform weighting of every output element, so each gets its own gradient.
    loss = sum((o.double() * torch.cos(torch.arange(o.numel(), device=device).double()).view_as(o)).sum()
               for o in outs)
    grads = torch.autograd.grad(loss, list(ts.values()))
    got = dict(zip(["y", "h_n", "c_n"], outs))
    got.update(("d" + k, v) for k, v in zip(ts, grads))
    return {k: v.detach().double().cpu() for k, v in got.items()}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    return err / scale if scale > 0 else err


def cases(small: bool):
    # label (no spaces: tests parse the table; ",proj" is appended where the cell takes the
    # projection), T, N, I, H, P, reverse, batch_sizes
    packed_small = ("T=5,N=3,H=8,packed,rev", 5, 3, 4, 8, 4, True, torch.tensor([3, 3, 2, 1, 1]))
    if small:
        return [packed_small]
    return [
        packed_small,
        ("T=50,N=32,H=256", 50, 32, 64, 256, 0, False, None),
        ("T=100,N=1,H=512", 100, 1, 65, 512, 0, False, None),
        ("T=20,N=7,H=33,rev", 20, 7, 9, 33, 0, True, None),
        ("T=30,N=16,H=64,packed", 30, 16, 20, 64, 32, False,
         torch.tensor([16] * 10 + [12] * 10 + [5] * 5 + [1] * 5)),
    ]


def parse_cells(text: str) -> list[str]:
    cells = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELLS]
    if unknown or not cells:
        raise argparse.ArgumentTypeError(f"cells are {','.join(CELLS)}; got {text!r}")
    return cells


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="one small case per cell (for compute-sanitizer)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="device compared with CPU float64")
    ap.add_argument("--cells", type=parse_cells, default=list(CELLS),
                    help=f"comma-separated cells to compare (default: {','.join(CELLS)})")
    args = ap.parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("gpu_parity: no CUDA device; use --device cpu for the CPU check")
            return 2
        # The float32 target is for full float32 GEMMs.
        torch.backends.cuda.matmul.allow_tf32 = False
        print(f"device: {torch.cuda.get_device_name()}, TF32 matmul: {torch.backends.cuda.matmul.allow_tf32}")
        dtypes = [torch.float32, torch.float16, torch.bfloat16]
        if not args.small:
            dtypes.insert(0, torch.float64)
    else:
        print("device: cpu")
        dtypes = [torch.float32, torch.bfloat16]
    print(f"cells: {','.join(args.cells)}")
    print("relative error max|got - want| / max|want| vs CPU float64; tolerances:")
    for dtype in dtypes:
        relu = f", rnn_relu's gradients {tolerance(dtype, 'dx', 'rnn_relu'):.1e}" if dtype in UNIT_ROUNDOFF else ""
        print(f"  {str(dtype)[6:]:9s} {tolerance(dtype, 'y'):.1e}, weight and bias gradients "
              f"{tolerance(dtype, 'db_ih'):.1e}{relu}")
    print(f"{'cell':8s} {'case':28s} {'dtype':9s} " + " ".join(f"{n:>8s}" for n in NAMES) + "  ok")
    failures = 0
    for label, T, N, I, H, P, rev, bs in cases(args.small):
        for cell in args.cells:
            p = P if CELLS[cell].has_c else 0
            inputs = layer_inputs(cell, T, N, I, H, p, bs)
            want = outputs_and_grads(cell, inputs, "cpu", torch.float64, rev, bs)
            assert sorted(want) == sorted(names(cell, bool(p)))
            for dtype in dtypes:
                got = outputs_and_grads(cell, inputs, args.device, dtype, rev, bs)
                errs = {n: relative_error(got[n], want[n]) for n in want}
                over = [n for n in NAMES if n in errs and not errs[n] <= tolerance(dtype, n, cell)]
                failures += bool(over)
                print(f"{cell:8s} {label + (',proj' if p else ''):28s} {str(dtype)[6:]:9s} "
                      + " ".join(f"{errs[n]:8.1e}" if n in errs else f"{'-':>8s}" for n in NAMES)
                      + ("  ok" if not over else "  FAIL: " + ",".join(over)))
    print(f"parity: {'all within tolerance' if failures == 0 else f'{failures} row(s) over tolerance'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
