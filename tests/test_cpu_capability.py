"""The CPU kernels' instruction set, chosen at run time (csrc/cpu/dispatch.cpp): the
portable ones forced through LSTM_EXT_CPU_CAPABILITY match nn.LSTM, and the op reports
what runs. The choice is made when the extension loads, so each case runs in a child."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lstm_ext  # noqa: F401  (loads the operators)
from test_gemm_select import FLAGS, by_cpu, float32_choices, run_child


def capability(out: str) -> str:
    line = next(line for line in out.splitlines() if line.startswith("cpu_capability:"))
    return line.partition(":")[2].strip()


def test_default_kernels_match_nn_lstm(child_env):
    # The test_gemm_select child (packed and padded, two bidirectional layers with a
    # projection, forward+backward and no_grad) on the portable kernels, bfloat16 and half too.
    proc = run_child({"LSTM_EXT_CPU_CAPABILITY": "default", "CHILD_DTYPES": "float32,float64,bfloat16,float16"},
                     child_env)
    assert proc.returncode == 0, proc.stderr
    assert capability(proc.stdout) == "default"
    # bfloat16 and half run on the float32 microkernel there, converted.
    for dtype in ("bfloat16", "float16"):
        lines = float32_choices(proc.stdout, "prepared", dtype=dtype)
        assert all(line.endswith(f": {by_cpu(line)}") for line in lines), proc.stdout


ORDER = ["default", "avx2", "avx512"]


def best_capability(at_most: str = "avx512") -> str:
    """The kernels lstm_ext runs here when allowed up to ``at_most``: ATen's choice."""
    aten = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "default")
    return ORDER[min(ORDER.index(aten), ORDER.index(at_most))]


@pytest.mark.parametrize("capability_name", ["avx2", "avx512"])
def test_vector_kernels_match_nn_lstm(capability_name, child_env):
    # As above, on each vector instruction set (where the CPU has it: else the best it has).
    proc = run_child({"LSTM_EXT_CPU_CAPABILITY": capability_name, "CHILD_DTYPES": "float32,float64,bfloat16,float16"},
                     child_env)
    assert proc.returncode == 0, proc.stderr
    assert capability(proc.stdout) == best_capability(capability_name)
    # bfloat16 on vdpbf16ps or, as half, on the float32 microkernel, converted: the
    # default's rule either way.
    for dtype in ("bfloat16", "float16"):
        lines = float32_choices(proc.stdout, "prepared", dtype=dtype)
        assert all(line.endswith(f": {by_cpu(line)}") for line in lines), proc.stdout


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"LSTM_EXT_CPU_CAPABILITY": "avx2"}, "avx2"),
        ({"ATEN_CPU_CAPABILITY": "default"}, "default"),  # lstm_ext follows ATen's choice
        ({"ATEN_CPU_CAPABILITY": "avx2"}, "avx2"),
        ({"LSTM_EXT_CPU_CAPABILITY": "fastest"}, "avx512"),  # ignored with a warning, like ATen
    ],
)
def test_capability_choice(env, expected, child_env):
    expected = best_capability(expected)  # never one the CPU lacks, even when asked for
    proc = run_child(dict(env, CHILD_DTYPES="float32"), child_env)
    assert proc.returncode == 0, proc.stderr
    assert capability(proc.stdout) == expected
    if "fastest" in env.values():
        assert "ignoring invalid value for LSTM_EXT_CPU_CAPABILITY: 'fastest'" in proc.stderr


def test_capability_by_default_follows_aten():
    assert torch.ops.lstm_ext.cpu_capability() == best_capability()


@pytest.mark.parametrize("capability_name", ["default", "avx2", "avx512"])
def test_activations_within_a_few_ulp_on_each_capability(capability_name, child_env):
    # Each instruction set has its own exp, reciprocal and tanh (cpu/vec_math.h): test_ops's
    # ulp tests of sigmoid and tanh (float32 and float64) on each, where the CPU has it.
    env = dict(child_env, LSTM_EXT_CPU_CAPABILITY=capability_name)
    tests = Path(__file__).with_name("test_ops.py")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests), "-k", "ulp"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 passed" in proc.stdout, proc.stdout


# Batches of 1 to 25 rows, on one thread (a step's rows in one GEMM) and on two (rows split
# between them), run the microkernel on row tiles of every height it has (up to 6 rows with
# AVX2, 12 with AVX-512) and on a partial last panel (4 H = 80 columns); T = 8 steps, so the
# weights are packed. Forward+backward against nn.LSTM; half and converted bfloat16 turn A
# into float32 64 columns at a time (the backward's step GEMM has k = 4 H = 80: a full
# chunk and a part).
TILES_CHILD = r"""
import torch
from torch import nn
import lstm_ext

torch.manual_seed(0)
I, H, T = 5, 20, 8
TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 5e-2, torch.float16: 1e-2}
for threads in (1, 2):
    torch.set_num_threads(threads)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        ref = nn.LSTM(I, H, dtype=dtype)
        ext = lstm_ext.LSTM(I, H, dtype=dtype)
        ext.load_state_dict(ref.state_dict())
        for batch in range(1, 26):
            x = torch.randn(T, batch, I, dtype=dtype)
            g = torch.randn(T, batch, H, dtype=dtype)
            results = []
            for m in (ref, ext):
                m.zero_grad()
                xi = x.clone().requires_grad_()
                y, _ = m(xi)
                y.backward(g)
                results.append([y, xi.grad] + [p.grad for p in m.parameters()])
            for got, expected in zip(results[1], results[0]):
                tol = TOL[dtype] * max(1.0, expected.abs().max().item())
                torch.testing.assert_close(got, expected, rtol=TOL[dtype], atol=tol,
                                           msg=lambda s: f"{threads} threads, {dtype}, batch {batch}: {s}")
print("cpu_capability:", torch.ops.lstm_ext.cpu_capability())
print(torch.ops.lstm_ext.gemm_choices())
"""


@pytest.mark.parametrize("bf16_dot", ["1", "0"])
@pytest.mark.parametrize("capability_name", ["avx2", "avx512"])
def test_every_microkernel_tile_height_matches_nn_lstm(capability_name, bf16_dot, child_env):
    # LSTM_EXT_GEMM_BF16_DOT=1: the AVX-512 kernels run bfloat16 on vdpbf16ps wherever the
    # CPU has AVX-512 BF16 (the default on AMD's CPUs only); =0: on the float32 kernel,
    # converted, as they do without it and the AVX2 ones always do.
    env = {k: v for k, v in child_env.items() if not k.startswith("LSTM_EXT_GEMM")}
    env.update(LSTM_EXT_CPU_CAPABILITY=capability_name, LSTM_EXT_GEMM="microkernel", OMP_NUM_THREADS="2",
               LSTM_EXT_GEMM_BF16_DOT=bf16_dot)
    proc = subprocess.run([sys.executable, "-c", TILES_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert capability(proc.stdout) == best_capability(capability_name)
    dot = bf16_dot == "1" and best_capability(capability_name) == "avx512" and "avx512_bf16" in FLAGS
    kernel = "vdpbf16ps" if dot else "float32, converted"
    assert f"bfloat16 microkernel: {kernel} (" in proc.stdout, proc.stdout
