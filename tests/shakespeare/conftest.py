"""Fixtures of the application's tests: a private corpus cache for each, a python runner
(the corpus cache, the small text and the child environment are in tests/conftest.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

# Two threads at most: the tests are sized for a 2-core machine and must not oversubscribe it.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def _private_corpus_cache(corpus_cache: Path) -> None:
    """Every test here renders the corpus into a private cache (tests/conftest.py)."""


@pytest.fixture(scope="session")
def run_python(child_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess]:
    """``run_python(*args)`` runs ``python *args`` in the repository root, output captured."""

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=REPO, env=child_env, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def lstm_ext_impl() -> str:
    """'lstm_ext' when lstm_ext.LSTM imports, else the test is skipped."""
    try:
        from lstm_ext import LSTM  # noqa: F401
    except Exception as err:  # any failure to build or import the extension
        pytest.skip(f"lstm_ext.LSTM unavailable: {err}")
    return "lstm_ext"


@pytest.fixture(params=["torch", "lstm_ext"])
def impl(request: pytest.FixtureRequest) -> str:
    """Each LSTM implementation in turn (lstm_ext skipped when unavailable)."""
    if request.param == "lstm_ext":
        request.getfixturevalue("lstm_ext_impl")
    return request.param
