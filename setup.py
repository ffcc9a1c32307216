"""Builds lstm_ext._C ahead of time when torch is importable (pip --no-build-isolation).

Under pip's default build isolation torch is absent here: the package then installs
its C++/CUDA sources as lstm_ext/_csrc and compiles them on first import.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_build_config", ROOT / "lstm_ext" / "_build_config.py")
cfg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cfg)


def extensions_and_commands():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("lstm_ext: torch is not importable here; the extension will compile on first import")
        return [], {}
    nvcc = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    )
    with_cuda = cfg.cuda_wanted(torch.version.cuda is not None, nvcc, torch.cuda.is_available())
    sources = [f"csrc/{s}" for s in cfg.CPU_SOURCES]
    if with_cuda:
        sources += [f"csrc/{s}" for s in cfg.CUDA_SOURCES]
        ext = cpp_extension.CUDAExtension(
            "lstm_ext._C",
            sources,
            extra_compile_args={"cxx": cfg.CXX_FLAGS, "nvcc": cfg.nvcc_flags()},
        )
    else:
        ext = cpp_extension.CppExtension(
            "lstm_ext._C", sources, extra_compile_args={"cxx": cfg.CXX_FLAGS}
        )
    print(f"lstm_ext: building the {'CPU+CUDA' if with_cuda else 'CPU'} extension")
    build = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build}


ext_modules, cmdclass = extensions_and_commands()

setup(
    package_dir={"lstm_ext._csrc": "csrc"},
    package_data={
        "lstm_ext._csrc": ["*.h", "*.cpp"],
        "lstm_ext._csrc.cpu": ["*.h", "*.cpp"],
        "lstm_ext._csrc.cuda": ["*.cu"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
