"""lstm_ext: fused recurrent layers for PyTorch, drop-ins for torch.nn.LSTM, nn.GRU,
nn.RNN and their cells (nn.LSTMCell, nn.GRUCell, nn.RNNCell)."""
from . import functional, ops  # noqa: F401
from .convert import convert, to_torch
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

__all__ = [
    "LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert", "to_torch", "functional",
]
__version__ = "0.1.0"
