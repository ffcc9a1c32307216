"""Parity of the op on a device, per dtype, with the CPU float64 op: outputs and gradients.

For each output and gradient it prints the relative error max|got - want| / max|want|
(one number per tensor, well defined whatever the tensor's scale), and fails (exit 1)
where one exceeds its tolerance (``tolerance``):
  float64 1e-12 and float32 1e-5;
  bfloat16 and float16, in units of their own rounding u = 2^-8 and 2^-11: 8u for the
  outputs and the gradients of x, h0 and c0, 32u for the weight and bias gradients, which
  sum rounded terms over all rows with cancellation (nn.LSTM run in bfloat16 on CPU is
  18u off in db at T=50, N=32, H=256; this op in float16 on CPU, 16u).

``--device cuda`` (the default, gpu_check.sh) compares CUDA float64/float32/float16/
bfloat16, TF32 off; ``--device cpu`` compares CPU float32/bfloat16 through the same code,
so CI notices when the op's contract changes. ``--small`` runs one small case (for
compute-sanitizer).
"""
from __future__ import annotations

import argparse
import sys

import torch

import lstm_ext  # noqa: F401
from lstm_ext.functional import lstm_layer

NAMES = ["y", "h_n", "c_n", "dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh", "dw_hr"]
SUMS_OVER_ROWS = {"dw_ih", "dw_hh", "db_ih", "db_hh", "dw_hr"}
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def tolerance(dtype: torch.dtype, name: str) -> float:
    """Largest relative error accepted for output or gradient `name` computed in `dtype`."""
    if dtype == torch.float64:
        return 1e-12
    if dtype == torch.float32:
        return 1e-5
    return UNIT_ROUNDOFF[dtype] * (32 if name in SUMS_OVER_ROWS else 8)


def layer_inputs(T, N, I, H, P, batch_sizes, seed=0):
    """x is (T, N, I), or PackedSequence.data's (sum(batch_sizes), I) with batch_sizes."""
    g = torch.Generator().manual_seed(seed)
    # nn.LSTM's init scale keeps the recurrence stable, so differences are rounding, not chaos.
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) / H ** 0.5  # noqa: E731
    x = r(int(batch_sizes.sum()), I) if batch_sizes is not None else r(T, N, I)
    return [x, r(N, P or H), r(N, H), r(4 * H, I), r(4 * H, P or H), r(4 * H), r(4 * H),
            r(P, H) if P else None]


def outputs_and_grads(inputs, device, dtype, reverse, batch_sizes):
    ts = [t.to(device, dtype).requires_grad_() if t is not None else None for t in inputs]
    y, (h, c) = lstm_layer(ts[0], (ts[1], ts[2]), *ts[3:], reverse=reverse, batch_sizes=batch_sizes)
    outs = (y, h, c)
    # A fixed, non-uniform weighting of every output element, so each gets its own gradient.
    loss = sum((o.double() * torch.cos(torch.arange(o.numel(), device=device).double()).view_as(o)).sum()
               for o in outs)
    grads = torch.autograd.grad(loss, [t for t in ts if t is not None])
    return [t.detach().double().cpu() for t in (*outs, *grads)]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    return err / scale if scale > 0 else err


def cases(small: bool):
    # label (no spaces: tests parse the table), T, N, I, H, P, reverse, batch_sizes
    packed_small = ("T=5,N=3,H=8,packed,rev,proj", 5, 3, 4, 8, 4, True, torch.tensor([3, 3, 2, 1, 1]))
    if small:
        return [packed_small]
    return [
        packed_small,
        ("T=50,N=32,H=256", 50, 32, 64, 256, 0, False, None),
        ("T=100,N=1,H=512", 100, 1, 65, 512, 0, False, None),
        ("T=20,N=7,H=33,rev", 20, 7, 9, 33, 0, True, None),
        ("T=30,N=16,H=64,packed,proj", 30, 16, 20, 64, 32, False,
         torch.tensor([16] * 10 + [12] * 10 + [5] * 5 + [1] * 5)),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="one small case (for compute-sanitizer)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="device compared with CPU float64")
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
    print("relative error max|got - want| / max|want| vs CPU float64; tolerances:")
    for dtype in dtypes:
        print(f"  {str(dtype)[6:]:9s} {tolerance(dtype, 'y'):.1e}, weight and bias gradients "
              f"{tolerance(dtype, 'db_ih'):.1e}")
    print(f"{'case':28s} {'dtype':9s} " + " ".join(f"{n:>8s}" for n in NAMES) + "  ok")
    failures = 0
    for label, T, N, I, H, P, rev, bs in cases(args.small):
        inputs = layer_inputs(T, N, I, H, P, bs)
        want = outputs_and_grads(inputs, "cpu", torch.float64, rev, bs)
        for dtype in dtypes:
            got = outputs_and_grads(inputs, args.device, dtype, rev, bs)
            errs = [relative_error(a, b) for a, b in zip(got, want)]
            over = [n for n, e in zip(NAMES, errs) if not e <= tolerance(dtype, n)]
            failures += bool(over)
            errs += [float("nan")] * (len(NAMES) - len(errs))  # no dw_hr without a projection
            print(f"{label:28s} {str(dtype)[6:]:9s} " + " ".join(f"{e:8.1e}" for e in errs)
                  + ("  ok" if not over else "  FAIL: " + ",".join(over)))
    print(f"parity: {'all within tolerance' if failures == 0 else f'{failures} row(s) over tolerance'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
