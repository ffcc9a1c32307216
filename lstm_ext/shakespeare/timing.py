"""Paired timing, shared by the compare command and the benchmark (benchmarks/timing.py, protocol.py).

Contenders run one after another within each round, the order rotating, so the machine's
noise hits all of them alike; a speed-up is the median over rounds of the paired time
ratio. On CUDA a call is timed with CUDA events recorded around it on the device's
current stream (after a synchronize, so nothing earlier is counted); elsewhere with
``time.perf_counter``. ``Contender`` is one model under training, stepped by such rounds.
"""
from __future__ import annotations

import contextlib
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from tqdm import tqdm

from .model import State, detach_state
from .train import lm_loss


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
        "gemm": _lstm_ext_report("gemm_choices").splitlines(),
        # The instruction set of lstm_ext's CPU kernels, chosen when it loads: default, avx2 or avx512.
        "cpu_kernels": _lstm_ext_report("cpu_capability") or None,
    }


def _lstm_ext_report(op: str) -> str:
    """What ``torch.ops.lstm_ext.<op>()`` reports; empty where the extension is not loaded."""
    try:
        return getattr(torch.ops.lstm_ext, op)()
    except (AttributeError, RuntimeError):
        return ""


def autocast_region(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; no change for None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class Contender:
    """One model under test with its optimizer and carried training state."""

    def __init__(self, model: nn.Module, lr: float, autocast: Optional[torch.dtype] = None) -> None:
        self.model = model
        self.autocast = autocast  # the forward and loss run under torch.autocast to this dtype
        self.device = next(model.parameters()).device
        # Adam's usual eps of 1e-8 is 0 in float16, and a parameter with no gradient yet
        # would step by 0/0; the dtype's smallest normal number keeps it finite.
        eps = max(1e-8, torch.finfo(next(model.parameters()).dtype).tiny)
        self.opt = torch.optim.Adam(model.parameters(), lr=lr, eps=eps)
        self.state: Optional[State] = None
        self.losses: list[float] = []

    def train_step(self, x: Union[Tensor, PackedSequence], y: Tensor, carry: bool) -> None:
        with autocast_region(self.device, self.autocast):
            logits, state = self.model(x, self.state)
            loss = lm_loss(logits, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.opt.step()
        self.state = detach_state(state) if carry else None
        self.losses.append(loss.item())
