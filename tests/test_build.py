"""The build and the project's promises about it: the kernels that were asked for are
registered, and CI runs the README's test command as written."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

import lstm_ext  # noqa: F401  (loads the operators)

ROOT = Path(__file__).resolve().parents[1]
OPS = ("lstm_forward", "lstm_inference", "lstm_backward", "rnn_forward", "rnn_inference", "rnn_backward")
CPU_ONLY_OPS = ("stack_inference", "stack_forward", "stack_backward")  # the modules call them on CPU only


@pytest.mark.parametrize("op", OPS + CPU_ONLY_OPS)
def test_kernels_registered(op):
    table = torch._C._dispatch_dump(f"lstm_ext::{op}")
    assert "CPU: registered" in table
    # CI forces the CUDA kernels into the build (LSTM_EXT_CUDA=1): they must be there.
    if os.environ.get("LSTM_EXT_CUDA") == "1":
        assert ("CUDA: registered" in table) == (op not in CPU_ONLY_OPS)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    test_lines = [line for line in block.splitlines() if "pytest" in line]
    assert len(test_lines) == 1, test_lines
    assert "pip install" in test_lines[0], "the test command must install what the tests need"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_lines[0] in ci


def test_no_instruction_set_flag_for_the_whole_extension():
    # The build must run on any CPU of its architecture: only kernels_avx2.cpp's code is
    # AVX2 (csrc/cpu/kernels_prologue.h), whichever machine built it.
    from lstm_ext import _build_config as cfg

    flags = " ".join(cfg.CXX_FLAGS + cfg.nvcc_flags())
    assert not re.search(r"-m(avx|fma|f16c|sse[34]|arch=|tune=)|-march|CPU_CAPABILITY", flags), flags


def _loaded_extension() -> Path:
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "/lstm_ext" in line and ".so" in line}
    assert len(paths) == 1, paths
    return Path(paths.pop())


@pytest.mark.skipif(not Path("/proc/self/maps").exists() or os.uname().machine != "x86_64", reason="x86-64 Linux")
def test_vector_code_only_in_the_vector_kernels():
    """Every function of the library with a VEX- or EVEX-encoded (AVX, AVX-512) instruction
    is of the AVX2 or AVX-512 compilation (lstm_ext_avx2::, lstm_ext_avx512::, ATen's
    at::vec::AVX2:: and ::AVX512::), and their microkernels use ymm and zmm registers: no
    vector copy of a shared inline function can reach the portable path."""
    import shutil
    import subprocess

    if shutil.which("objdump") is None:
        pytest.skip("needs objdump (binutils)")
    asm = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(_loaded_extension())],
                         capture_output=True, text=True, check=True).stdout
    vex, ymm, zmm, name = set(), set(), set(), None
    for line in asm.splitlines():
        if m := re.match(r"^[0-9a-f]+ <(.*)>:$", line):
            name = m.group(1)
        elif name is not None and "\t" in line:
            instruction = line.split("\t")[-1]
            if re.match(r"\s*v[a-z]", instruction):
                vex.add(name)
            if "%ymm" in instruction:
                ymm.add(name)
            if "%zmm" in instruction:
                zmm.add(name)
    vector_namespaces = ("lstm_ext_avx2::", "::AVX2::", "lstm_ext_avx512::", "::AVX512::")
    outside = sorted(n for n in vex if not any(ns in n for ns in vector_namespaces))
    assert not outside, outside[:10]
    assert any("lstm_ext_avx2::lstm_ext::packed_gemm_detail::microkernel<float" in n for n in ymm)
    assert any("lstm_ext_avx512::lstm_ext::packed_gemm_detail::microkernel<float" in n for n in zmm)
    assert not any("lstm_ext_avx2::" in n for n in zmm)
