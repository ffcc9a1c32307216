import os
from pathlib import Path
from typing import Iterator

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    # Every test draws the same numbers on every run. Some float32 cases are
    # ill-conditioned (saturated gates at 1e4-1e8 input scale: nn.LSTM itself is
    # then off from a float64 run by O(1)), and unseeded data made them flaky.
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# Fixtures of the application's and the benchmark's tests (tests/shakespeare, tests/benchmarks).
# They import the application only when used, so the library's tests do not need it.


@pytest.fixture(scope="session")
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
