"""Character-level language model: Embedding -> recurrent layers (RNN, GRU or LSTM) -> Linear, with either implementation."""
from __future__ import annotations

from typing import Mapping, Optional, Union

from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

IMPLS = ("lstm_ext", "torch")
# The recurrent cells: the name of each, its class in torch and in lstm_ext, and gates per unit
# (rows of weight_hh = gates * hidden).
CELLS = ("lstm", "gru", "rnn")
CELL_CLASSES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
# The LSTM's state is (h, c); a GRU's or an RNN's is h alone.
State = Union[Tensor, tuple[Tensor, Tensor]]
# The state dict prefix of the recurrent layers; checkpoints written before GRU and RNN
# cells existed call it "lstm." (``upgrade_state_dict``).
PREFIX, OLD_PREFIX = "rnn.", "lstm."


class ImplUnavailableError(Exception):
    """The requested implementation cannot be loaded."""


def make_rnn(
    cell: str, impl: str, input_size: int, hidden: int, layers: int, dropout: float = 0.0, proj_size: int = 0
) -> nn.Module:
    """A time-major multi-layer ``cell`` ("lstm", "gru" or "rnn" with tanh) of torch or lstm_ext (same constructors).

    ``proj_size`` exists for the LSTM only.
    """
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; choose from {', '.join(CELLS)}")
    if proj_size and cell != "lstm":
        raise ValueError(f"proj_size is an LSTM option; the {cell} cell has none")
    name = CELL_CLASSES[cell]
    if impl == "torch":
        cls = getattr(nn, name)
    elif impl == "lstm_ext":
        # Imported here so that --impl torch works without the compiled extension.
        try:
            import lstm_ext

            cls = getattr(lstm_ext, name)
        except Exception as err:  # an import failure may surface as any error type
            raise ImplUnavailableError(
                f"lstm_ext.{name} is not available ({type(err).__name__}: {err}); --impl torch uses nn.{name}"
            ) from err
    else:
        raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")
    extra = {"proj_size": proj_size} if cell == "lstm" else {}
    return cls(input_size, hidden, layers, dropout=dropout, **extra)


def make_lstm(
    impl: str, input_size: int, hidden: int, layers: int, dropout: float = 0.0, proj_size: int = 0
) -> nn.Module:
    """A time-major multi-layer LSTM: ``torch.nn.LSTM`` or ``lstm_ext.LSTM`` (same constructor)."""
    return make_rnn("lstm", impl, input_size, hidden, layers, dropout, proj_size)


def upgrade_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A model state dict with the recurrent layers' old ``lstm.`` prefix renamed to ``rnn.``."""
    return {PREFIX + k[len(OLD_PREFIX):] if k.startswith(OLD_PREFIX) else k: v for k, v in state_dict.items()}


class CharRNN(nn.Module):
    """Embedding -> multi-layer RNN, GRU or LSTM -> dropout -> Linear over the vocabulary.

    The embedding width equals ``hidden``. Inputs are time-major character ids
    (seq, batch), or a PackedSequence of them; the state is the recurrent module's:
    ``(h, c)`` for the LSTM, ``h`` for the GRU and the RNN. Parameter names do not
    depend on ``impl``, so state dicts move between the two implementations.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden: int = 256,
        layers: int = 2,
        dropout: float = 0.0,
        impl: str = "torch",
        proj_size: int = 0,
        cell: str = "lstm",
    ) -> None:
        super().__init__()
        self.cell = cell
        self.embed = nn.Embedding(vocab_size, hidden)
        # torch warns that the layers' dropout does nothing with one layer; the output dropout still applies.
        self.rnn = make_rnn(cell, impl, hidden, hidden, layers, dropout if layers > 1 else 0.0, proj_size)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(proj_size or hidden, vocab_size)

    @staticmethod
    def sized_for(state_dict: Mapping[str, Tensor], vocab_size: int, hidden: int, layers: int, cell: str = "lstm") -> bool:
        """Whether ``state_dict`` can be of a model of these sizes and cell, judged without building one.

        A cheap guard before construction (a foreign config could ask for a huge model);
        ``load_state_dict`` still checks every weight.
        """
        embed = state_dict.get("embed.weight")
        top, beyond = state_dict.get(f"{PREFIX}weight_hh_l{layers - 1}"), f"{PREFIX}weight_hh_l{layers}"
        return (embed is not None and tuple(embed.shape) == (vocab_size, hidden)
                and top is not None and top.shape[0] == GATES.get(cell, 0) * hidden and beyond not in state_dict)

    def forward(
        self, x: Union[Tensor, PackedSequence], state: Optional[State] = None
    ) -> tuple[Tensor, State]:
        """Logits and the final state.

        Logits are (seq, batch, vocab) for a tensor input, and (total_length, vocab)
        aligned with ``x.data`` for a PackedSequence.
        """
        if isinstance(x, PackedSequence):
            emb: Union[Tensor, PackedSequence] = PackedSequence(
                self.embed(x.data), x.batch_sizes, x.sorted_indices, x.unsorted_indices
            )
        else:
            emb = self.embed(x)
        out, state = self.rnn(emb, state)
        if isinstance(out, PackedSequence):
            out = out.data
        return self.head(self.drop(out)), state


# The name from before GRU and RNN cells: an LSTM model by default.
CharLSTM = CharRNN


def detach_state(state: State) -> State:
    """The state with its autograd history cut (truncated backpropagation through time)."""
    if isinstance(state, Tensor):
        return state.detach()
    return state[0].detach(), state[1].detach()


def state_tensors(state: Optional[State]) -> tuple[Tensor, ...]:
    """The tensors of a state as a tuple: ``(h, c)`` or ``(h,)``; ``()`` for None."""
    if state is None:
        return ()
    return (state,) if isinstance(state, Tensor) else tuple(state)
