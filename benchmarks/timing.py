"""Timing primitives of the benchmark: interleaved paired rounds, medians, the matmul reference, the machine.

The paired rounds, medians and the machine's description live in the application
(``lstm_ext/shakespeare/timing.py``, which its compare command uses too) and are
re-exported here; see there for how rounds are timed.
"""
from __future__ import annotations

import contextlib
import statistics
from typing import Iterator

import torch

from lstm_ext.shakespeare.timing import cpu_model, describe_machine, interleaved, median_rate, median_ratio, seconds_of, sync

__all__ = ["cpu_model", "describe_machine", "interleaved", "matmul_gflops", "median_rate", "median_ratio",
           "seconds_of", "sync", "tf32_disabled"]


def matmul_gflops(n: int, dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """Median GFLOP/s of an n x n x n matmul in ``dtype`` (one untimed call first)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = interleaved([lambda r: a @ b], repeats + 1, device)[0]
    return 2 * n**3 / statistics.median(times[1:]) / 1e9


@contextlib.contextmanager
def tf32_disabled() -> Iterator[None]:
    """float32 matmuls and cuDNN RNNs in full float32 precision while inside (cuDNN allows TF32 by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
