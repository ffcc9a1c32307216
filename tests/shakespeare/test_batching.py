"""Vocabulary, train/validation split and char-rnn stream batching."""
from __future__ import annotations

import pytest
import torch

from lstm_ext.shakespeare.data import CharStreams, DataError, Vocab, split


def test_vocab_round_trip_and_unknown_characters() -> None:
    vocab = Vocab.from_text("hello, world\n")
    assert vocab.chars == sorted(set("hello, world\n"))
    ids = vocab.encode("world\n")
    assert ids.dtype == torch.long and vocab.decode(ids) == "world\n"
    with pytest.raises(DataError, match="'z'"):
        vocab.encode("zero")


def test_split_keeps_the_tail_for_validation() -> None:
    train, val = split(torch.arange(100), 0.1)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))


def test_streams_are_contiguous_and_targets_shifted_by_one() -> None:
    ids = torch.arange(1000)  # id == position, so every batch shows where it was cut from
    s = CharStreams(ids, batch=4, seq=10)
    assert s.stream_len == 249 and s.batches_per_epoch == 24
    for i in range(s.batches_per_epoch):
        x, y = s.get(i)
        assert x.shape == y.shape == (10, 4)  # time-major
        for b in range(4):
            start = b * s.stream_len + i * 10
            assert x[:, b].tolist() == list(range(start, start + 10))
        assert torch.equal(y, x + 1)
    # The next epoch starts the streams again.
    assert torch.equal(s.get(s.batches_per_epoch)[0], s.get(0)[0])


def test_ranks_read_disjoint_streams_of_the_same_layout() -> None:
    ids = torch.arange(1000)
    whole = CharStreams(ids, batch=6, seq=10)
    ranks = [CharStreams(ids, batch=3, seq=10, rank=r, world=2) for r in range(2)]
    for i in range(whole.batches_per_epoch):
        assert torch.equal(torch.cat([r.get(i)[0] for r in ranks], dim=1), whole.get(i)[0])


def test_too_little_text_is_explained() -> None:
    with pytest.raises(DataError, match="too few"):
        CharStreams(torch.arange(50), batch=8, seq=10)
