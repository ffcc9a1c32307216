"""Prints the largest differences of the CUDA op from the CPU float64 op, per dtype.

Used by gpu_check.sh; ``--small`` runs one small case (for compute-sanitizer).
"""
from __future__ import annotations

import argparse

import torch

import lstm_ext  # noqa: F401
from lstm_ext.functional import lstm_layer


def layer_inputs(T, N, I, H, P, seed=0):
    g = torch.Generator().manual_seed(seed)
    # nn.LSTM's init scale keeps the recurrence stable, so differences are rounding, not chaos.
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) / H ** 0.5  # noqa: E731
    return [r(T, N, I), r(N, P or H), r(N, H), r(4 * H, I), r(4 * H, P or H), r(4 * H), r(4 * H),
            r(P, H) if P else None]


def outputs_and_grads(inputs, device, dtype, reverse, batch_sizes):
    ts = [t.to(device, dtype).requires_grad_() if t is not None else None for t in inputs]
    y, (h, c) = lstm_layer(ts[0], (ts[1], ts[2]), *ts[3:], reverse=reverse, batch_sizes=batch_sizes)
    outs = (y, h, c)
    loss = sum((o.double() * torch.cos(torch.arange(o.numel(), device=device).double()).view_as(o)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [t for t in ts if t is not None])
    return [t.detach().double().cpu() for t in (*outs, *grads)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--device", default="cuda", help="device compared with CPU float64")
    args = ap.parse_args()
    cases = [("T=5 N=3 H=8 packed rev proj", 5, 3, 4, 8, 4, True, torch.tensor([3, 3, 2, 1, 1]))]
    if not args.small:
        cases += [
            ("T=50 N=32 H=256", 50, 32, 64, 256, 0, False, None),
            ("T=100 N=1 H=512", 100, 1, 65, 512, 0, False, None),
            ("T=20 N=7 H=33 rev", 20, 7, 9, 33, 0, True, None),
        ]
    names = ["y", "h_n", "c_n", "dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh", "dw_hr"]
    print(f"{'case':32s} {'dtype':9s} " + " ".join(f"{n:>8s}" for n in names))
    for label, T, N, I, H, P, rev, bs in cases:
        inputs = layer_inputs(T, N, I, H, P)
        want = outputs_and_grads(inputs, "cpu", torch.float64, rev, bs)
        dtypes = [torch.float32] if args.small else [torch.float64, torch.float32, torch.float16, torch.bfloat16]
        if args.device == "cpu":
            dtypes = [torch.float32, torch.bfloat16]
        for dtype in dtypes:
            got = outputs_and_grads(inputs, args.device, dtype, rev, bs)
            diffs = [(a - b).abs().max().item() for a, b in zip(got, want)]
            print(f"{label:32s} {str(dtype)[6:]:9s} " + " ".join(f"{d:8.1e}" for d in diffs))


if __name__ == "__main__":
    main()
