"""Benchmark tests: benchmarks/ importable, a private corpus cache, a small text, a runner of benchmarks/bench.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from lstm_ext.shakespeare.data import CACHE_ENV

REPO = Path(__file__).resolve().parents[2]

# benchmarks/ is not a package: its modules import each other by name, as they do when
# bench.py runs as a script (which puts its own directory first on sys.path).
sys.path.insert(0, str(REPO / "benchmarks"))

# Two threads at most: the tests are sized for a 2-core machine and must not oversubscribe it.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def private_corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the rendered corpus out of the user's cache (child processes inherit the variable)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory, private_corpus_cache: None) -> Path:
    """The first 30,000 characters of the corpus: enough for tiny models, and quick to load."""
    from lstm_ext.shakespeare.data import shakespeare_text

    path = tmp_path_factory.mktemp("data") / "plays.txt"
    path.write_text(shakespeare_text()[:30_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def run_bench_script(private_corpus_cache: None) -> Callable[..., subprocess.CompletedProcess]:
    """``run_bench_script(*args)`` runs ``python benchmarks/bench.py *args`` in the repository root.

    As from a checkout that is not installed: the checkout is on PYTHONPATH, nothing else.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

    def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "benchmarks/bench.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )

    return run
