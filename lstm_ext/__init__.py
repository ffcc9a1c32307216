"""lstm_ext: a fused LSTM for PyTorch, a drop-in for torch.nn.LSTM and nn.LSTMCell."""
from . import functional, ops  # noqa: F401
from .convert import convert, to_torch
from .modules import LSTM, LSTMCell

__all__ = ["LSTM", "LSTMCell", "convert", "to_torch", "functional"]
__version__ = "0.1.0"
