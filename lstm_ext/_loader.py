"""Loads the compiled operators: the ahead-of-time build, or else a build on first import."""
from __future__ import annotations

import os
import sys

import torch

from . import _build_config as cfg


def _build_on_import() -> None:
    from torch.utils import cpp_extension

    nvcc = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    )
    with_cuda = cfg.cuda_wanted(torch.version.cuda is not None, nvcc, torch.cuda.is_available())
    src = cfg.source_dir()
    sources = [str(src / s) for s in cfg.CPU_SOURCES]
    if with_cuda:
        sources += [str(src / s) for s in cfg.CUDA_SOURCES]
    print(
        f"lstm_ext: no prebuilt extension; loading the {'CPU+CUDA' if with_cuda else 'CPU'} "
        "build cached by torch, compiling it first if needed (about a minute)",
        file=sys.stderr,
    )
    cpp_extension.load(
        name="lstm_ext_cuda" if with_cuda else "lstm_ext_cpu",
        sources=sources,
        extra_cflags=cfg.CXX_FLAGS,
        extra_cuda_cflags=cfg.nvcc_flags(),
        is_python_module=False,
        verbose=os.environ.get("LSTM_EXT_VERBOSE") == "1",
    )


def _registered() -> bool:
    try:
        torch.ops.lstm_ext.lstm_forward
    except (AttributeError, RuntimeError):
        return False
    return True


def load() -> None:
    """Make torch.ops.lstm_ext available (once per process: a second copy cannot register)."""
    if _registered():
        return
    try:
        from . import _C  # noqa: F401
    except ImportError:
        _build_on_import()
