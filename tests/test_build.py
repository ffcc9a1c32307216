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


@pytest.mark.parametrize("op", OPS)
def test_kernels_registered(op):
    table = torch._C._dispatch_dump(f"lstm_ext::{op}")
    assert "CPU: registered" in table
    # CI forces the CUDA kernels into the build (LSTM_EXT_CUDA=1): they must be there.
    if os.environ.get("LSTM_EXT_CUDA") == "1":
        assert "CUDA: registered" in table


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    test_lines = [line for line in block.splitlines() if "pytest" in line]
    assert len(test_lines) == 1, test_lines
    assert "pip install" in test_lines[0], "the test command must install what the tests need"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_lines[0] in ci
