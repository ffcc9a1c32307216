"""lstm_ext: a fused LSTM for PyTorch, a drop-in for torch.nn.LSTM and nn.LSTMCell."""
from . import functional, ops  # noqa: F401

__version__ = "0.1.0"
