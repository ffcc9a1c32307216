"""Build settings shared by setup.py (ahead-of-time build) and _loader.py (build on import).

Imports nothing from torch, so setup.py can read it where torch is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

CPU_SOURCES = ["lstm_ops.cpp", "cpu/lstm_cpu.cpp"]
CUDA_SOURCES = ["cuda/lstm_cuda.cu"]
CXX_FLAGS = ["-O3"]
# No --use_fast_math: the gate math must match the CPU kernels.
NVCC_FLAGS = ["-O3"]


def source_dir() -> Path:
    """csrc/ of a source checkout, or the copy installed as lstm_ext/_csrc."""
    here = Path(__file__).resolve().parent
    installed = here / "_csrc"
    return installed if installed.is_dir() else here.parent / "csrc"


def cuda_wanted(torch_has_cuda: bool, nvcc_found: bool) -> bool:
    """LSTM_EXT_CUDA=1/0 forces the choice; by default build CUDA when it can be built."""
    forced = os.environ.get("LSTM_EXT_CUDA")
    if forced is not None:
        if forced == "1" and not (torch_has_cuda and nvcc_found):
            raise RuntimeError(
                "LSTM_EXT_CUDA=1 but the CUDA kernels cannot be built: "
                f"torch has CUDA: {torch_has_cuda}, nvcc found (CUDA_HOME): {nvcc_found}"
            )
        return forced == "1"
    return torch_has_cuda and nvcc_found
