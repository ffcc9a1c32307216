"""What the benchmark measures: shapes, sweep presets, dtypes, per-phase round counts, run options."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# --cell: the recurrent cell measured; "all" runs the benchmark once per cell.
CELL_CHOICES = ("lstm", "gru", "rnn", "all")

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Names that keep float32 parameters and run every forward under torch.autocast to a dtype.
AUTOCAST = {"autocast-bfloat16": torch.bfloat16}


def dtype_setup(name: str) -> tuple[torch.dtype, Optional[torch.dtype]]:
    """The parameters' dtype that a --dtype/--dtypes name stands for, and its autocast dtype (or None)."""
    return (torch.float32, AUTOCAST[name]) if name in AUTOCAST else (DTYPES[name], None)


@dataclass(frozen=True)
class Shape:
    """One benchmark configuration: batch (streams), sequence length, hidden size, layers."""

    batch: int
    seq: int
    hidden: int
    layers: int

    def __str__(self) -> str:
        return f"B={self.batch} T={self.seq} H={self.hidden} L={self.layers}"


SWEEPS: dict[str, list[Shape]] = {
    # Karpathy's char-rnn protocol: batch 50, seq 50, 1-3 layers of 128/256/512.
    "charrnn": [Shape(50, 50, h, n) for n in (1, 2, 3) for h in (128, 256, 512)],
    # The shapes issue 5 asks ratios for.
    "issue5": [Shape(32, 100, 512, 2), Shape(64, 100, 256, 2), Shape(32, 100, 128, 1), Shape(8, 50, 64, 2)],
    # Against cuDNN (issue 12): batch 1 (latency) to 256 (throughput), small to large hidden sizes.
    "gpu": [Shape(b, 100, h, 2) for h in (128, 256, 512, 1024) for b in (1, 8, 64, 256)],
}
SWEEPS["all"] = SWEEPS["charrnn"] + SWEEPS["issue5"]  # the CPU sweep; "gpu" is too big for a CPU run


def parse_sweep(spec: str) -> list[Shape]:
    """Comma-separated preset names (see ``SWEEPS``) and ``BxTxHxL`` shapes."""
    shapes: list[Shape] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item in SWEEPS:
            shapes += SWEEPS[item]
            continue
        try:
            b, t, h, n = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"bad sweep item {item!r}: use {', '.join(SWEEPS)} or BxTxHxL such as 32x100x512x2") from None
        shapes.append(Shape(b, t, h, n))
    if not shapes:
        raise ValueError("empty --sweep")
    return shapes


def parse_dtypes(spec: str) -> list[str]:
    """A comma-separated list of distinct ``DTYPES`` (or ``AUTOCAST``) names, in the given order."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in DTYPES and n not in AUTOCAST]
    if unknown or not names:
        raise ValueError(f"bad dtype list {spec!r}: use comma-separated names from {', '.join([*DTYPES, *AUTOCAST])}")
    if len(set(names)) != len(names):
        raise ValueError(f"dtype list {spec!r} names a dtype twice")
    return names


@dataclass
class Plan:
    """How long each phase of one shape's measurement runs."""

    steps: int  # training steps of each model (the loss curves)
    warmup: int  # leading rounds of every phase left out of the timings
    rounds: int  # timed rounds of forward-only and LSTM-only forward+backward
    gen_rounds: int  # paired generation rounds: short ones, so more of them than of the others
    gen_chars: int  # characters generated per generation round
    eval_batches: int


@dataclass
class BenchConfig:
    """Options of one benchmark run (see ``bench.add_arguments`` for their meaning)."""

    impl: str = "lstm_ext"
    cell: str = "lstm"  # lstm, gru or rnn (tanh); bench.py runs "all" as one BenchConfig per cell
    device: str = "cpu"
    dtype: str = "float32"
    dtypes: Optional[str] = None  # the sweep's dtypes, comma-separated; None: just ``dtype``
    batch: int = 50
    seq: int = 50
    hidden: int = 256
    layers: int = 2
    proj_size: int = 0
    packed: bool = False
    steps: int = 400
    lr: float = 4e-3  # a short run: a brisk rate gets the sample further
    seed: int = 0
    data: Optional[str] = None
    out: str = "bench_out"
    sweep: Optional[str] = None
    sweep_steps: int = 8
    sample_chars: int = 400
    quick: bool = False

    def main_shape(self) -> Shape:
        """The shape of the main measurement (loss curves, sample)."""
        return Shape(self.batch, self.seq, self.hidden, self.layers)

    def sweep_dtypes(self) -> list[str]:
        """The dtypes every sweep shape runs in."""
        return parse_dtypes(self.dtypes) if self.dtypes else [self.dtype]

    def sweep_shapes(self) -> list[Shape]:
        """--sweep's shapes; without --sweep, the main shape when several dtypes are asked for, else none."""
        if self.sweep:
            return parse_sweep(self.sweep)
        return [self.main_shape()] if len(self.sweep_dtypes()) > 1 else []

    def main_plan(self) -> Plan:
        return self._quick_plan(self.steps) if self.quick else Plan(self.steps, 3, 10, 15, 200, 20)

    def sweep_plan(self) -> Plan:
        """Few rounds per shape: the gpu sweep runs 48 shape-dtype pairs within minutes."""
        return self._quick_plan(self.sweep_steps) if self.quick else Plan(self.sweep_steps, 2, 5, 3, 50, 2)

    @staticmethod
    def _quick_plan(steps: int) -> Plan:
        return Plan(steps, 1, 3, 3, 20, 2)


QUICK = dict(batch=8, seq=16, hidden=32, layers=2, steps=12, sweep_steps=3, sample_chars=80)
