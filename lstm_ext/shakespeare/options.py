"""Command-line helpers shared by the train and sample commands and the benchmark, and the value checks behind them."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional, Union

import torch

from .model import IMPLS


@dataclass(frozen=True)
class Number:
    """A finite ``int`` or ``float`` within bounds (an open bound is excluded).

    ``check`` tests a value (from a config or a checkpoint); calling the rule parses
    command-line text, so a rule is also an argparse ``type``.
    """

    kind: type  # int or float
    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        """What is allowed, e.g. ``an integer >= 1`` or ``a finite number in [0, 1)``."""
        noun, bound = ("an integer", str) if self.kind is int else ("a finite number", "{:g}".format)
        if self.high == math.inf:
            return f"{noun} {'>' if self.low_open else '>='} {bound(self.low)}"
        opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{noun} in {opening}{bound(self.low)}, {bound(self.high)}{closing}"

    def check(self, value: Any, name: str) -> Union[int, float]:
        """``value`` as ``kind`` when allowed; otherwise ValueError ``"{name} must be ..."``."""
        kinds = (int,) if self.kind is int else (int, float)
        if isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value) and self._within(value):
            return self.kind(value)
        raise ValueError(f"{name} must be {self}, got {value!r}")

    def _within(self, value: Union[int, float]) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __call__(self, text: str) -> Union[int, float]:
        try:
            return self.check(self.kind(text), "value")
        except ValueError:  # not a number of this kind, or out of range
            raise argparse.ArgumentTypeError(f"must be {self}, got {text!r}") from None


positive_int = Number(int, 1)
positive_float = Number(float, 0, low_open=True)
non_negative_float = Number(float, 0)
open_fraction = Number(float, 0, 1, low_open=True, high_open=True)
dropout_probability = Number(float, 0, 1, high_open=True)  # 1 would drop everything
learning_rate = Number(float, 0, 1, low_open=True)  # far above 1, Adam's float32 update overflows
random_seed = Number(int, 0, 2**63, high_open=True)  # torch.manual_seed's range, with room for a rank added


class DeviceError(ValueError):
    """A device that is not a torch device, or not present on this machine."""


def available_device(name: str) -> torch.device:
    """``torch.device(name)`` when this machine has it (cpu, or an existing CUDA device); else DeviceError."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(f"{name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from err
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"device {name!r}: this app runs on cpu or cuda")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (device.index or 0) >= count:
        raise DeviceError(f"device {name!r} is not available: this machine has {count} CUDA device(s)")
    return device


def checked_text(parse: Callable[[str], object]) -> Callable[[str], str]:
    """argparse type that validates with ``parse`` (a ValueError becomes a usage error) and keeps the text."""

    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text

    return check


def given(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The dataclass fields of ``cls`` that were given on the command line.

    Options are declared with ``default=argparse.SUPPRESS``, so only given ones are in
    ``args``; the rest come from a base config (defaults, --quick, or a checkpoint).
    """
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def add_common(p: argparse.ArgumentParser, impl_help: str) -> None:
    """Options every command has: implementation, device and thread count."""
    p.add_argument("--impl", choices=IMPLS, default=argparse.SUPPRESS, help=impl_help)
    p.add_argument("--device", type=checked_text(available_device), default=argparse.SUPPRESS,
                   help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="intra-op CPU threads (default: torch's choice)")


def set_threads(threads: Optional[int]) -> None:
    """Use ``threads`` intra-op threads when given; otherwise keep torch's default."""
    if threads:
        torch.set_num_threads(threads)
