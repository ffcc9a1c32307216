"""Timing primitives of the benchmark: interleaved paired rounds, medians, the matmul reference, the machine.

Contenders run one after another within each round, the order rotating, so the machine's
noise hits all of them alike; a speed-up is the median over rounds of the paired time
ratio. On CUDA a call is timed with CUDA events recorded around it on the device's
current stream (after a synchronize, so nothing earlier is counted); elsewhere with
``time.perf_counter``.
"""
from __future__ import annotations

import contextlib
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from tqdm import tqdm


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_of(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes on ``device``, queued work included."""
    sync(device)
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    stream = torch.cuda.current_stream(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record(stream)
    fn()
    end.record(stream)
    end.synchronize()
    return begin.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds


def interleaved(
    fns: Sequence[Callable[[int], Any]], rounds: int, device: torch.device, desc: Optional[str] = None
) -> list[list[float]]:
    """Seconds of ``fns[k](r)`` as ``times[k][r]``, each round running every fn once, order rotating.

    With ``desc``, a transient progress bar so long phases show they are alive.
    """
    times = [[0.0] * rounds for _ in fns]
    for r in tqdm(range(rounds), desc=desc, disable=desc is None, leave=False, dynamic_ncols=True):
        for j in range(len(fns)):
            k = (j + r) % len(fns)
            times[k][r] = seconds_of(lambda: fns[k](r), device)
    return times


def median_rate(work: Sequence[float], seconds: Sequence[float], warmup: int) -> float:
    """Median over the rounds after ``warmup`` of work per second."""
    return statistics.median(w / t for w, t in zip(work[warmup:], seconds[warmup:]))


def median_ratio(slow: Sequence[float], fast: Sequence[float], warmup: int) -> float:
    """Median over the rounds after ``warmup`` of the paired time ratio ``slow[r] / fast[r]``."""
    return statistics.median(a / b for a, b in zip(slow[warmup:], fast[warmup:]))


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


def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo's "model name", else lscpu's "Model name", else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name" and value.strip():
                return value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def describe_machine(device: torch.device) -> dict[str, Any]:
    """What the timings ran on: CPU model, GPU name (CUDA only), software versions, threads, CPU GEMMs and kernels used."""
    cuda = device.type == "cuda"
    return {
        "cpu": cpu_model(),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "tf32": torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32,
        "python": platform.python_version(),
        # The CPU GEMM each role of lstm_ext's layer ran, per shape (empty on CUDA): called
        # after the runs, since the choices are made on first use.
        "gemm": torch.ops.lstm_ext.gemm_choices().splitlines(),
        # The instruction set of lstm_ext's CPU kernels, chosen when it loads: default or avx2.
        "cpu_kernels": torch.ops.lstm_ext.cpu_capability(),
    }

