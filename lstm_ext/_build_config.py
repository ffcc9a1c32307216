"""Build settings shared by setup.py (ahead-of-time build) and _loader.py (build on import).

Imports nothing from torch, so setup.py can read it where torch is absent.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# The CPU backend, csrc/cpu/lstm_cpu.cpp, is not a source of its own: kernels_default.cpp,
# kernels_avx2.cpp and kernels_avx512.cpp compile it once per instruction set, and
# dispatch.cpp picks one at run time (csrc/cpu/kernels_prologue.h).
CPU_SOURCES = [
    "lstm_ops.cpp", "cpu/dispatch.cpp", "cpu/kernels_default.cpp", "cpu/kernels_avx2.cpp", "cpu/kernels_avx512.cpp",
]
CUDA_SOURCES = ["cuda/lstm_cuda.cu"]
# No instruction-set flag (-mavx2, -march): the build runs on every CPU of its
# architecture, whichever machine built it; only kernels_avx2.cpp's and kernels_avx512.cpp's
# code is AVX2 or AVX-512.
# -fopenmp: without it at::parallel_for (inlined from ATen's headers) compiles to a serial
# loop. Only compiled with it, not linked: the GOMP symbols then resolve through
# libtorch_cpu to the OpenMP runtime torch itself uses, so there is one thread pool.
CXX_FLAGS = ["-O3", "-fopenmp"]
# No --use_fast_math: the gate math must match the CPU kernels.
NVCC_FLAGS = ["-O3"]
# Headers that ATen/cuda/CUDAContext.h includes (the CUDA backend calls cuBLAS): a CUDA
# toolkit without its math libraries lacks them, torch's pip "nvidia" packages have them.
_CUDA_LIBRARY_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")


def _pip_cuda_include_dirs() -> list[str]:
    """include/ folders of the installed nvidia-* pip packages that hold those headers:
    nvidia/cu13/include for CUDA 13 builds, nvidia/cublas/include and others for CUDA 12."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for root in spec.submodule_search_locations:
        for inc in sorted(Path(root).glob("*/include")):
            if any((inc / h).is_file() for h in _CUDA_LIBRARY_HEADERS):
                dirs.append(str(inc))
    return dirs


def nvcc_flags() -> list[str]:
    """NVCC_FLAGS, and the pip packages' CUDA headers as system includes: searched after
    every -I, so a full toolkit's own headers (CUDA_HOME/include) still come first."""
    flags = list(NVCC_FLAGS)
    for inc in _pip_cuda_include_dirs():
        flags += ["-isystem", inc]
    return flags


def source_dir() -> Path:
    """csrc/ of a source checkout, or the copy installed as lstm_ext/_csrc."""
    here = Path(__file__).resolve().parent
    installed = here / "_csrc"
    return installed if installed.is_dir() else here.parent / "csrc"


def cuda_wanted(torch_has_cuda: bool, nvcc_found: bool, gpu_visible: bool) -> bool:
    """LSTM_EXT_CUDA=1/0 forces the choice. By default CUDA is built when it can be and
    there is a target: a visible GPU, or architectures named in TORCH_CUDA_ARCH_LIST."""
    forced = os.environ.get("LSTM_EXT_CUDA")
    if forced is not None:
        if forced == "1" and not (torch_has_cuda and nvcc_found):
            raise RuntimeError(
                "LSTM_EXT_CUDA=1 but the CUDA kernels cannot be built: "
                f"torch has CUDA: {torch_has_cuda}, nvcc found (CUDA_HOME): {nvcc_found}"
            )
        if forced == "1" and not gpu_visible:
            # torch derives the target architectures from the GPU; name some instead.
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return forced == "1"
    target = gpu_visible or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    return torch_has_cuda and nvcc_found and target
