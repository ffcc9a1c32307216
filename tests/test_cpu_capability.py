"""The CPU kernels' instruction set, chosen at run time (csrc/cpu/dispatch.cpp): the
portable ones forced through LSTM_EXT_CPU_CAPABILITY match nn.LSTM, and the op reports
what runs. The choice is made when the extension loads, so each case runs in a child."""
from __future__ import annotations

import pytest
import torch

import lstm_ext  # noqa: F401  (loads the operators)
from test_gemm_select import run_child


def capability(out: str) -> str:
    line = next(line for line in out.splitlines() if line.startswith("cpu_capability:"))
    return line.partition(":")[2].strip()


def test_default_kernels_match_nn_lstm(child_env):
    # The test_gemm_select child (packed and padded, two bidirectional layers with a
    # projection, forward+backward and no_grad) on the portable kernels, bfloat16 too.
    proc = run_child({"LSTM_EXT_CPU_CAPABILITY": "default", "CHILD_DTYPES": "float32,float64,bfloat16"}, child_env)
    assert proc.returncode == 0, proc.stderr
    assert capability(proc.stdout) == "default"


def avx2_cpu() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"LSTM_EXT_CPU_CAPABILITY": "avx2"}, "avx2"),
        ({"ATEN_CPU_CAPABILITY": "default"}, "default"),  # lstm_ext follows ATen's choice
        ({"LSTM_EXT_CPU_CAPABILITY": "fastest"}, "avx2"),  # ignored with a warning, like ATen
    ],
)
def test_capability_choice(env, expected, child_env):
    if expected == "avx2" and not avx2_cpu():
        expected = "default"  # no AVX2 here: never chosen, even when asked for
    proc = run_child(dict(env, CHILD_DTYPES="float32"), child_env)
    assert proc.returncode == 0, proc.stderr
    assert capability(proc.stdout) == expected
    if "fastest" in env.values():
        assert "ignoring invalid value for LSTM_EXT_CPU_CAPABILITY: 'fastest'" in proc.stderr


def test_capability_by_default_follows_aten():
    expected = "avx2" if avx2_cpu() else "default"
    assert torch.ops.lstm_ext.cpu_capability() == expected
