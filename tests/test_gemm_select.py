"""Each GEMM implementation the CPU backend can pick (csrc/cpu/gemm_select.h), forced through
LSTM_EXT_GEMM, against nn.LSTM; and the fallbacks when torch lacks MKL's packed GEMM or
oneDNN's matmul, or the user turned oneDNN off.

The choice is read once per process, so every case runs in a child python.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

from conftest import REPO

# Every cell, two layers, both directions, an LSTM projection, packed sequences whose batch shrinks (so
# the per-step GEMMs also see fewer rows than they were prepared for), and T = 10 >= 8
# steps so that the weights are packed; then calls of one to three rows and steps, whose
# GEMMs run on the weights unpacked (dot_gemm.h). Forward+backward, then a no_grad forward.
CHILD = r"""
import os

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
import lstm_ext

torch.manual_seed(0)
I, H, P, T = 12, 20, 9, 10
lengths = [10, 10, 9, 7, 4, 2, 1]
TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 5e-2, torch.float16: 1e-2}
DTYPES = [getattr(torch, name) for name in os.environ.get("CHILD_DTYPES", "float32,float64").split(",")]
torch.backends.mkldnn.enabled = os.environ.get("CHILD_MKLDNN", "1") == "1"


def close(got, expected, dtype, what):
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, rtol=TOL[dtype], atol=TOL[dtype] * scale, msg=lambda m: f"{what}: {m}")


# Every cell: the LSTM (with a projection) and the single-state cells, whose GEMMs differ
# (the GRU's recurrent GEMM writes apart from the input projection).
CELLS = [
    (nn.LSTM, lstm_ext.LSTM, dict(proj_size=P)),
    (nn.GRU, lstm_ext.GRU, {}),
    (nn.RNN, lstm_ext.RNN, dict(nonlinearity="tanh")),
    (nn.RNN, lstm_ext.RNN, dict(nonlinearity="relu")),
]
# (steps, batch, packed). The few-row calls come after all the others, which thus draw the
# same random numbers as before they were added: a bfloat16 relu's gradient can flip with a
# pre-activation that rounds across zero, and the draws of the others are known not to.
CALLS = [(T, len(lengths), False), (T, len(lengths), True)]
FEW_ROWS = [(1, 3, False), (3, 1, False)]


def check(ref_cls, ext_cls, extra, dtype, steps, batch, packed):
    ref = ref_cls(I, H, num_layers=2, bidirectional=True, dtype=dtype, **extra)
    ext = ext_cls(I, H, num_layers=2, bidirectional=True, dtype=dtype, **extra)
    ext.load_state_dict(ref.state_dict())
    x = torch.randn(steps, batch, I, dtype=dtype)
    results = {}
    for name, module in (("ref", ref), ("ext", ext)):
        leaf = x.clone().requires_grad_()
        inp = pack_padded_sequence(leaf, lengths) if packed else leaf
        y, state = module(inp)
        states = state if isinstance(state, tuple) else (state,)
        y = y.data if packed else y
        (y.square().sum() + sum((k + 1) * s.sum() for k, s in enumerate(states))).backward()
        with torch.no_grad():
            y_inf = module(inp)[0]
        results[name] = [y, *states, leaf.grad, y_inf.data if packed else y_inf] + [p.grad for p in module.parameters()]
    for i, (got, expected) in enumerate(zip(results["ext"], results["ref"])):
        close(got, expected, dtype, f"{ref_cls.__name__} {extra} {dtype} T={steps} N={batch} packed={packed} output {i}")


for calls in (CALLS, FEW_ROWS):
    for dtype in DTYPES:
        for ref_cls, ext_cls, extra in CELLS:
            for steps, batch, packed in calls:
                check(ref_cls, ext_cls, extra, dtype, steps, batch, packed)
# The LSTM without a projection, whose recurrent GEMM (k = H, even) the batch-reduce GEMM can
# serve with the cell run on each panel (H = 20: a group of 16 units, then 4). Last, so that
# the draws above stay as they were.
for dtype in DTYPES:
    for steps, batch, packed in CALLS:
        check(nn.LSTM, lstm_ext.LSTM, {}, dtype, steps, batch, packed)
print("cpu_capability:", torch.ops.lstm_ext.cpu_capability())
print(torch.ops.lstm_ext.gemm_choices(), end="")
"""


def run_child(env_update: dict[str, str], child_env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in child_env.items() if not k.startswith("LSTM_EXT_GEMM")}
    env.update(env_update, OMP_NUM_THREADS="2")  # two threads: the microkernel splits its panels
    return subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def float32_choices(out: str, role: str = "", dtype: str = "float32") -> list[str]:
    """The float32 (or `dtype`) lines of the choices report: of weight gradients with role
    "weight", of the other GEMMs (against a prepared weight) with role "prepared", of all by
    default."""
    lines = [line for line in out.splitlines() if f" {dtype} " in line]
    if role:
        lines = [line for line in lines if line.startswith("weight gradient ") == (role == "weight")]
    assert lines, out
    return lines


def _cpuinfo() -> tuple[str, set[str]]:
    """The CPU's vendor and flags as Linux reports them ("", {} elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.M)
    flags = re.search(r"^flags\s*:(.*)$", text, re.M)
    return (vendor.group(1) if vendor else ""), set(flags.group(1).split() if flags else ())


VENDOR, FLAGS = _cpuinfo()
INTEL = VENDOR == "GenuineIntel"


PER_STEP_ROLES = ("recurrent ", "projection ", "recurrent backward (dh) ", "projection backward ")


def brgemm_serves(line: str) -> bool:
    """Whether a bfloat16 line's GEMM can run on oneDNN's batch-reduce GEMM (gemm_select.h):
    a per-step GEMM of even k, on a CPU with AMX-BF16."""
    k = int(re.search(r" k=(\d+)", line).group(1))
    return "amx_bf16" in FLAGS and line.startswith(PER_STEP_ROLES) and k % 2 == 0


def by_cpu(line: str, brgemm: bool = True) -> str:
    """What the default's rule (gemm_select.h) picks for a line of the choices report, and why
    (`brgemm`: whether torch has the batch-reduce GEMM)."""
    if line.startswith("weight gradient "):
        return "blas (default: Intel CPU)" if INTEL else "onednn (default: not an Intel CPU)"
    m, n, k = (int(re.search(rf" {d}=(\d+)", line).group(1)) for d in "mnk")
    large = m * n * k >= 1 << 22
    size = "m n k >= 2^22" if large else "m n k < 2^22"
    if " float64 " in line:
        if not INTEL:
            return "microkernel (default: not an Intel CPU)"
        if line.startswith(PER_STEP_ROLES):
            return "microkernel (default: Intel CPU, per-step GEMM)"
        return f"{'blas' if large else 'microkernel'} (default: Intel CPU, {size})"
    if " bfloat16 " in line:
        if "amx_bf16" not in FLAGS:
            return "microkernel (default: no AMX)"
        if brgemm and brgemm_serves(line):
            # The forward's recurrent GEMM runs with the cell on each panel, from a smaller size on.
            role, bits = ("recurrent", 18) if line.startswith("recurrent bfloat16") else ("per-step", 21)
            served = m * n * k >= 1 << bits
            return f"{'brgemm' if served else 'microkernel'} (default: AMX, {role} m n k {'>=' if served else '<'} 2^{bits})"
        return f"{'aten' if large else 'microkernel'} (default: AMX, {size})"
    if " float16 " in line:
        if line.startswith(PER_STEP_ROLES):
            return "microkernel (default: per-step GEMM)"
        if "avx512_fp16" not in FLAGS:
            return "microkernel (default: no AVX512-FP16)"
        return f"{'aten' if large else 'microkernel'} (default: AVX512-FP16, {size})"
    if not INTEL:
        return "microkernel (default: not an Intel CPU)"
    return f"{'mkl' if large else 'microkernel'} (default: Intel CPU, {size})"


# LSTM_EXT_GEMM -> (the prepared weights' implementation, the weight gradients').
FORCED = {"microkernel": ("microkernel", "onednn"), "mkl": ("mkl", "blas")}


def assert_prepared_choices(out: str, dtype: str, mode: Optional[str], library: str) -> None:
    """Every prepared weight's line of `dtype` in the choices report: timed with
    LSTM_EXT_GEMM=auto, the default's rule (by_cpu) without it, else the forced family
    (`library` with mkl)."""
    for line in float32_choices(out, "prepared", dtype=dtype):
        if mode == "auto":
            assert "(timed: " in line, out
        elif mode is None:
            assert line.endswith(f": {by_cpu(line)}"), out
        else:
            assert line.endswith(f": {library if mode == 'mkl' else 'microkernel'} (LSTM_EXT_GEMM)"), out


@pytest.mark.parametrize("mode", ["auto", "mkl", "microkernel", None])
def test_forced_gemm_matches_nn_lstm(mode, child_env):
    proc = run_child({} if mode is None else {"LSTM_EXT_GEMM": mode}, child_env)
    assert proc.returncode == 0, proc.stderr
    # float64's prepared weights: the microkernel or the BLAS (no oneDNN matmul for its weight gradients).
    assert_prepared_choices(proc.stdout, "float64", mode, "blas")
    if mode == "auto":
        assert all("(timed: " in line or "unavailable)" in line for line in float32_choices(proc.stdout)), proc.stdout
        return
    for role, unavailable in (("prepared", "MKL packed GEMM unavailable"), ("weight", "oneDNN matmul unavailable")):
        lines = float32_choices(proc.stdout, role)
        if any(unavailable in line for line in lines):
            continue
        if mode is None:
            assert all(line.endswith(f": {by_cpu(line)}") for line in lines), proc.stdout
        else:
            expected = FORCED[mode][role == "weight"]
            assert all(line.endswith(f": {expected} (LSTM_EXT_GEMM)") for line in lines), proc.stdout


# An LSTM whose input projection and dx have m n k >= 2^22 (320 x 512 x 128), its per-step
# GEMMs fewer (32 x 512 x 128): on an Intel CPU (float32, float64) or one with AMX (bfloat16)
# or AVX512-FP16 (half) the default runs both a library and the microkernel.
LARGE_CHILD = r"""
import os

import torch
import lstm_ext

dtype = getattr(torch, os.environ["CHILD_DTYPE"])
tol = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
torch.manual_seed(0)
ref = torch.nn.LSTM(128, 128, batch_first=True, dtype=dtype)
ext = lstm_ext.LSTM(128, 128, batch_first=True, dtype=dtype)
ext.load_state_dict(ref.state_dict())
x = torch.randn(32, 10, 128, dtype=dtype)
grads = []
for module in (ref, ext):
    leaf = x.clone().requires_grad_()
    y, (h, c) = module(leaf)
    (y.square().sum() + h.sum() + 2 * c.sum()).backward()
    grads.append([y, h, c, leaf.grad] + [p.grad for p in module.parameters()])
for i, (got, expected) in enumerate(zip(*reversed(grads))):
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * max(1.0, expected.abs().max().item()), msg=lambda m: f"output {i}: {m}")
print("cpu_capability:", torch.ops.lstm_ext.cpu_capability())
print(torch.ops.lstm_ext.gemm_choices(), end="")
"""


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
def test_default_rule_on_a_larger_lstm(dtype, child_env):
    env = {k: v for k, v in child_env.items() if not k.startswith("LSTM_EXT_GEMM")}
    proc = subprocess.run([sys.executable, "-c", LARGE_CHILD], cwd=REPO,
                          env=dict(env, OMP_NUM_THREADS="2", CHILD_DTYPE=dtype), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = float32_choices(proc.stdout, "prepared", dtype=dtype)
    assert any(" m=320 n=512 k=128 " in line for line in lines), proc.stdout  # the rule's two sides are both here
    assert any(" m=32 n=512 k=128 " in line for line in lines), proc.stdout
    if dtype == "float32":
        lines += float32_choices(proc.stdout, "weight")
        if any("unavailable" in line for line in lines):
            return
    assert all(line.endswith(f": {by_cpu(line)}") for line in lines), proc.stdout


@pytest.mark.parametrize("mode", ["auto", "mkl"])
def test_without_mkl_falls_back_to_microkernel(mode, child_env):
    proc = run_child({"LSTM_EXT_GEMM": mode, "LSTM_EXT_GEMM_DISABLE_MKL": "1"}, child_env)
    assert proc.returncode == 0, proc.stderr
    assert all(line.endswith("microkernel (MKL packed GEMM unavailable)")
               for line in float32_choices(proc.stdout, "prepared")), proc.stdout


@pytest.mark.parametrize("mode", ["auto", "microkernel"])
@pytest.mark.parametrize("how", ["missing", "turned_off"])
def test_without_onednn_weight_gradients_run_on_blas(how, mode, child_env):
    off = {"LSTM_EXT_GEMM_DISABLE_ONEDNN": "1"} if how == "missing" else {"CHILD_MKLDNN": "0"}
    proc = run_child({"LSTM_EXT_GEMM": mode, **off}, child_env)
    assert proc.returncode == 0, proc.stderr
    assert all(line.endswith("blas (oneDNN matmul unavailable)")
               for line in float32_choices(proc.stdout, "weight")), proc.stdout


def test_unknown_gemm_mode_is_an_error(child_env):
    proc = run_child({"LSTM_EXT_GEMM": "fastest"}, child_env)
    assert proc.returncode != 0
    assert "LSTM_EXT_GEMM must be auto, mkl or microkernel, but got 'fastest'" in proc.stderr


def test_unknown_bf16_dot_value_is_an_error(child_env):
    # Read where a bfloat16 weight is first packed for the microkernel (the CHILD's small GEMMs).
    proc = run_child({"LSTM_EXT_GEMM_BF16_DOT": "yes", "CHILD_DTYPES": "bfloat16"}, child_env)
    assert proc.returncode != 0
    assert "LSTM_EXT_GEMM_BF16_DOT must be 0 or 1, but got 'yes'" in proc.stderr


@pytest.mark.parametrize("mode", ["auto", "mkl", "microkernel", None])
@pytest.mark.parametrize("brgemm", ["present", "missing"])
def test_bfloat16_gemms_match_nn_lstm(mode, brgemm, child_env):
    # bfloat16's prepared weights: the microkernel (the default without AMX, and
    # LSTM_EXT_GEMM=microkernel); with LSTM_EXT_GEMM=mkl, oneDNN's
    # batch-reduce GEMM for the per-step GEMMs where the CPU has AMX, ATen's GEMM for the
    # others; by default with AMX the rule of by_cpu; the faster of two with auto. "missing"
    # acts as a torch without the batch-reduce GEMM: ATen's GEMM in its place.
    # float32 and float64 first, for the random draws known to keep bfloat16's relu gradients
    # off zero (see CALLS).
    env = {"CHILD_DTYPES": "float32,float64,bfloat16", **({} if mode is None else {"LSTM_EXT_GEMM": mode})}
    if brgemm == "missing":
        env["LSTM_EXT_GEMM_DISABLE_BRGEMM"] = "1"
    proc = run_child(env, child_env)
    assert proc.returncode == 0, proc.stderr
    lines = float32_choices(proc.stdout, "prepared", dtype="bfloat16")
    if brgemm == "missing":
        assert not any("brgemm" in line for line in lines), proc.stdout
    with_brgemm = brgemm == "present" and "amx_bf16" in FLAGS
    if mode == "auto":
        assert all("(timed: " in line for line in lines), proc.stdout
    elif mode is None:
        assert all(line.endswith(f": {by_cpu(line, brgemm == 'present')}") for line in lines), proc.stdout
        # The microkernel's bfloat16 kernel: vdpbf16ps by default only where the AVX-512
        # kernels run on a CPU with AVX-512 BF16 that is not Intel's (packed_gemm.h).
        if any(line.endswith("microkernel", 0, line.index(" (")) for line in lines):
            avx512_bf16 = torch.backends.cpu.get_cpu_capability() == "AVX512" and "avx512_bf16" in FLAGS
            kernel = "float32, converted" if INTEL or not avx512_bf16 else "vdpbf16ps (default: not an Intel CPU)"
            assert f"bfloat16 microkernel: {kernel}" in proc.stdout, proc.stdout
    else:
        # The CHILD has per-step GEMMs of even k (and of odd k), which LSTM_EXT_GEMM=mkl runs on brgemm with AMX.
        assert mode == "microkernel" or not with_brgemm or any(brgemm_serves(line) for line in lines), proc.stdout
        for line in lines:
            expected = "microkernel" if mode == "microkernel" else "brgemm" if with_brgemm and brgemm_serves(line) else "aten"
            assert line.endswith(f": {expected} (LSTM_EXT_GEMM)"), proc.stdout


@pytest.mark.parametrize("mode", ["auto", "mkl", "microkernel", None])
def test_half_gemms_match_nn_lstm(mode, child_env):
    # Half's prepared weights: the microkernel (half on the float32 kernel, every instruction
    # set), or ATen's GEMM: LSTM_EXT_GEMM=mkl for all, by default the rule of by_cpu, the
    # faster of two with auto. Half first: after float32 and float64's draws a relu
    # pre-activation of a packed call rounds across zero in half (nn.RNN and lstm_ext each
    # have one such flip against float64), which moves a gradient (see CALLS).
    env = {"CHILD_DTYPES": "float16,float32,float64", **({} if mode is None else {"LSTM_EXT_GEMM": mode})}
    proc = run_child(env, child_env)
    assert proc.returncode == 0, proc.stderr
    assert_prepared_choices(proc.stdout, "float16", mode, "aten")


@pytest.mark.parametrize("capability", ["avx2", "avx512"])
def test_reduced_precision_without_onednn_matches_nn_lstm(capability, child_env):
    # As a torch without oneDNN (on a CPU without AVX-512, ATen's bfloat16 GEMM has no oneDNN
    # kernels either): the bfloat16 and half GEMMs left to ATen (LSTM_EXT_GEMM=mkl, no
    # batch-reduce GEMM) and their weight gradients run as float32 GEMMs of converted copies.
    env = {"LSTM_EXT_GEMM": "mkl", "LSTM_EXT_GEMM_DISABLE_ONEDNN": "1", "LSTM_EXT_GEMM_DISABLE_BRGEMM": "1",
           "LSTM_EXT_CPU_CAPABILITY": capability, "CHILD_DTYPES": "float16,float32,float64,bfloat16"}
    proc = run_child(env, child_env)
    assert proc.returncode == 0, proc.stderr
    for dtype in ("float16", "bfloat16"):
        lines = float32_choices(proc.stdout, "prepared", dtype=dtype)
        assert all(line.endswith(": aten (LSTM_EXT_GEMM)") for line in lines), proc.stdout
