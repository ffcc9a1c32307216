"""Benchmark tests: benchmarks/ importable, a private corpus cache for each, a runner of
benchmarks/bench.py (the corpus cache, the small text and the child environment are in
tests/conftest.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch


REPO = Path(__file__).resolve().parents[2]

# benchmarks/ is not a package: its modules import each other by name, as they do when
# bench.py runs as a script (which puts its own directory first on sys.path).
sys.path.insert(0, str(REPO / "benchmarks"))

# Two threads at most: the tests are sized for a 2-core machine and must not oversubscribe it.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def _private_corpus_cache(corpus_cache: Path) -> None:
    """Every test here renders the corpus into a private cache (tests/conftest.py)."""


@pytest.fixture(scope="session")
def run_bench_script(child_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess]:
    """``run_bench_script(*args)`` runs ``python benchmarks/bench.py *args`` in the repository root.

    As from a checkout that is not installed: the checkout is on PYTHONPATH, nothing else.
    """

    def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "benchmarks/bench.py", *args], cwd=REPO, env=child_env, capture_output=True, text=True, timeout=timeout
        )

    return run
