"""Text generation: one character per call of the model, carrying its state ((h, c) or h) between calls."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .checkpoint import load_weights
from .data import Vocab
from .model import CharRNN, State
from .options import available_device, non_negative_float, positive_int
from .train import load_run


def default_prime(vocab: Vocab) -> str:
    """A newline (the start of a speech in play text) when the vocabulary has one."""
    return "\n" if "\n" in vocab.index else vocab.chars[0]


def pick(logits: Tensor, temperature: float, top_k: Optional[int], gen: torch.Generator) -> Tensor:
    """Sample ids from (batch, vocab) logits; temperature 0 means greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    vocab: Vocab,
    prime: Optional[str] = None,
    length: int = 500,
    temperature: float = 0.8,
    top_k: Optional[int] = None,
    seed: int = 0,
) -> str:
    """``prime`` followed by ``length`` generated characters.

    ``model`` maps time-major ids (1, 1) and a state to logits and the next state
    (``CharRNN``). Same model, arguments and seed give the same text: sampling
    draws from its own generator, never the global one.
    """
    prime = default_prime(vocab) if prime is None else prime
    if not prime:
        raise ValueError("the prime text must not be empty")
    non_negative_float.check(temperature, "temperature")
    if top_k is not None:
        positive_int.check(top_k, "top_k")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    was_training = model.training
    model.eval()
    ids = vocab.encode(prime).to(device)
    state: Optional[State] = None
    if len(ids) > 1:  # the prime sets the state in one call; its last char starts sampling
        _, state = model(ids[:-1].view(-1, 1), state)
    x = ids[-1].view(1, 1)
    out: list[Tensor] = []
    for _ in range(length):
        logits, state = model(x, state)
        x = pick(logits[-1], temperature, top_k, gen).view(1, 1)
        out.append(x)  # kept on the device: no host sync per character
    model.train(was_training)
    return prime + vocab.decode(torch.cat(out).view(-1).tolist() if out else [])


def load_for_sampling(path: str, impl: Optional[str] = None, device: str = "cpu") -> tuple[CharRNN, Vocab]:
    """Model (in eval mode) and vocabulary from a checkpoint; ``impl`` overrides the saved one.

    The cell (LSTM, GRU or RNN) is the checkpoint's; checkpoints without one hold an LSTM.

    A malformed checkpoint, weights that do not fit or are not finite, and an unavailable
    ``device`` raise CheckpointError or DeviceError.
    """
    ckpt, cfg = load_run(path)
    vocab = Vocab(ckpt["vocab"])
    model = CharRNN(len(vocab), cfg.hidden, cfg.layers, cfg.dropout, impl or cfg.impl, cell=cfg.cell)
    load_weights(model, ckpt["model"], path)
    return model.to(available_device(device)).eval(), vocab
