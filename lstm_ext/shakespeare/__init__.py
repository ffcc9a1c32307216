"""Character-level RNN, GRU or LSTM on Shakespeare: data, training, sampling and their comparison.

Command line: ``python -m lstm_ext.shakespeare train|sample|compare --help``. The benchmark of
lstm_ext.LSTM against nn.LSTM on this model is ``python benchmarks/bench.py`` in a checkout.
Needs the install extra: ``pip install "lstm_ext[shakespeare]"``.
"""
try:
    import matplotlib  # noqa: F401
    import tqdm  # noqa: F401
except ImportError as err:
    # Name the extra rather than leave a bare ModuleNotFoundError. The package as ``name`` makes
    # ``python -m lstm_ext.shakespeare`` report this in one line instead of a traceback.
    raise ImportError(
        f"lstm_ext.shakespeare needs {err.name or 'a package'}, which is not installed: "
        'pip install "lstm_ext[shakespeare]"',
        name=__name__,
    ) from err

from .checkpoint import CheckpointError, load_checkpoint
from .data import CharStreams, DataError, Vocab, load_text, render_play, shakespeare_text
from .model import CELLS, CharLSTM, CharRNN, ImplUnavailableError, make_lstm, make_rnn
from .sample import generate, load_for_sampling
from .train import TrainConfig, TrainResult, evaluate, train

__all__ = [
    "CELLS", "CharLSTM", "CharRNN", "CharStreams", "CheckpointError", "DataError", "ImplUnavailableError", "TrainConfig",
    "TrainResult", "Vocab", "evaluate", "generate", "load_checkpoint", "load_for_sampling", "load_text",
    "make_lstm", "make_rnn", "render_play", "shakespeare_text", "train",
]
