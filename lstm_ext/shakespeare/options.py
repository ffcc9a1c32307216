"""Command-line helpers shared by the train, sample and bench commands."""
from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any, Optional

import torch

from .model import IMPLS


def given(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The dataclass fields of ``cls`` that were given on the command line.

    Options are declared with ``default=argparse.SUPPRESS``, so only given ones are in
    ``args``; the rest come from a base config (defaults, --quick, or a checkpoint).
    """
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def add_common(p: argparse.ArgumentParser, impl_help: str) -> None:
    """Options every command has: implementation, device and thread count."""
    p.add_argument("--impl", choices=IMPLS, default=argparse.SUPPRESS, help=impl_help)
    p.add_argument("--device", default=argparse.SUPPRESS, help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default: torch's choice)")


def set_threads(threads: Optional[int]) -> None:
    """Use ``threads`` intra-op threads when given; otherwise keep torch's default."""
    if threads:
        torch.set_num_threads(threads)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
