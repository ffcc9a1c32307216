import pytest
import torch


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
