"""Character-level language model: Embedding -> LSTM -> Linear, with either LSTM implementation."""
from __future__ import annotations

from typing import Mapping, Optional, Union

from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

IMPLS = ("lstm_ext", "torch")
State = tuple[Tensor, Tensor]


class ImplUnavailableError(Exception):
    """The requested LSTM implementation cannot be loaded."""


def make_lstm(
    impl: str, input_size: int, hidden: int, layers: int, dropout: float = 0.0, proj_size: int = 0
) -> nn.Module:
    """A time-major multi-layer LSTM: ``torch.nn.LSTM`` or ``lstm_ext.LSTM`` (same constructor)."""
    if impl == "torch":
        cls = nn.LSTM
    elif impl == "lstm_ext":
        # Imported here so that --impl torch works without the compiled extension.
        try:
            from lstm_ext import LSTM as cls  # type: ignore[attr-defined]
        except Exception as err:  # an import failure may surface as any error type
            raise ImplUnavailableError(
                f"lstm_ext.LSTM is not available ({type(err).__name__}: {err}); --impl torch uses nn.LSTM"
            ) from err
    else:
        raise ValueError(f"unknown LSTM implementation {impl!r}; choose from {IMPLS}")
    return cls(input_size, hidden, layers, dropout=dropout, proj_size=proj_size)


class CharLSTM(nn.Module):
    """Embedding -> multi-layer LSTM -> dropout -> Linear over the vocabulary.

    The embedding width equals ``hidden``. Inputs are time-major character ids
    (seq, batch), or a PackedSequence of them; the state is nn.LSTM's ``(h, c)``.
    Parameter names do not depend on ``impl``, so state dicts move between the two.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden: int = 256,
        layers: int = 2,
        dropout: float = 0.0,
        impl: str = "torch",
        proj_size: int = 0,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        # nn.LSTM warns that its dropout does nothing with one layer; the output dropout still applies.
        self.lstm = make_lstm(impl, hidden, hidden, layers, dropout if layers > 1 else 0.0, proj_size)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(proj_size or hidden, vocab_size)

    @staticmethod
    def sized_for(state_dict: Mapping[str, Tensor], vocab_size: int, hidden: int, layers: int) -> bool:
        """Whether ``state_dict`` can be of a model of these sizes, judged without building one.

        A cheap guard before construction (a foreign config could ask for a huge model);
        ``load_state_dict`` still checks every weight.
        """
        embed = state_dict.get("embed.weight")
        top, beyond = f"lstm.weight_hh_l{layers - 1}", f"lstm.weight_hh_l{layers}"
        return (embed is not None and tuple(embed.shape) == (vocab_size, hidden)
                and top in state_dict and beyond not in state_dict)

    def forward(
        self, x: Union[Tensor, PackedSequence], state: Optional[State] = None
    ) -> tuple[Tensor, State]:
        """Logits and the final ``(h, c)``.

        Logits are (seq, batch, vocab) for a tensor input, and (total_length, vocab)
        aligned with ``x.data`` for a PackedSequence.
        """
        if isinstance(x, PackedSequence):
            emb: Union[Tensor, PackedSequence] = PackedSequence(
                self.embed(x.data), x.batch_sizes, x.sorted_indices, x.unsorted_indices
            )
        else:
            emb = self.embed(x)
        out, state = self.lstm(emb, state)
        if isinstance(out, PackedSequence):
            out = out.data
        return self.head(self.drop(out)), state


def detach_state(state: State) -> State:
    """The state with its autograd history cut (truncated backpropagation through time)."""
    return state[0].detach(), state[1].detach()

