"""Shared fixtures: a private corpus cache, a small training text, and a python runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

# Two threads at most: the tests are sized for a 2-core machine and must not oversubscribe it.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep the rendered corpus out of the user's cache (children inherit the variable)."""
    from lstm_ext.shakespeare.data import CACHE_ENV

    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(path)
    yield path
    if old is None:
        del os.environ[CACHE_ENV]
    else:
        os.environ[CACHE_ENV] = old


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory, corpus_cache: Path) -> Path:
    """The first 30,000 characters of the rendered corpus, enough for tiny models."""
    from lstm_ext.shakespeare.data import shakespeare_text

    path = tmp_path_factory.mktemp("data") / "plays.txt"
    path.write_text(shakespeare_text()[:30_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def child_env() -> dict[str, str]:
    """Environment for child pythons: the checkout importable, one thread, unbuffered output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


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
