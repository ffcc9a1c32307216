"""Generation: one character per call with (h, c) carried, seeded and reproducible."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lstm_ext.shakespeare.cli import main
from lstm_ext.shakespeare.data import Vocab
from lstm_ext.shakespeare.model import CharLSTM
from lstm_ext.shakespeare.sample import generate


@pytest.fixture()
def model_and_vocab(text_file: Path, impl: str) -> tuple[CharLSTM, Vocab]:
    vocab = Vocab.from_text(text_file.read_text(encoding="utf-8"))
    torch.manual_seed(0)
    return CharLSTM(len(vocab), hidden=24, layers=2, impl=impl).eval(), vocab


def test_same_seed_same_text_and_global_rng_untouched(model_and_vocab: tuple[CharLSTM, Vocab]) -> None:
    model, vocab = model_and_vocab
    rng = torch.get_rng_state()
    a = generate(model, vocab, "ROMEO:\n", 200, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), rng)
    assert generate(model, vocab, "ROMEO:\n", 200, temperature=1.0, seed=7) == a
    assert generate(model, vocab, "ROMEO:\n", 200, temperature=1.0, seed=8) != a
    assert a.startswith("ROMEO:\n") and len(a) == len("ROMEO:\n") + 200


def test_stepwise_generation_matches_whole_sequence_forward(model_and_vocab: tuple[CharLSTM, Vocab]) -> None:
    """Greedy text from carried (h, c) equals the argmax of a forward over the whole prefix."""
    model, vocab = model_and_vocab
    text = generate(model, vocab, "To be", 30, temperature=0.0)
    ids = vocab.encode(text)
    with torch.no_grad():
        logits, _ = model(ids[:-1].view(-1, 1))
    assert torch.equal(logits[len("To be") - 1 :, 0].argmax(-1), ids[len("To be") :])
    assert generate(model, vocab, "To be", 30, temperature=1.0, top_k=1, seed=3) == text


@pytest.fixture(scope="module")
def checkpoint(text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample_run")
    args = ["train", "--impl", "torch", "--data", str(text_file), "--hidden", "32", "--batch", "8", "--seq", "16",
            "--steps", "40", "--eval-every", "40", "--eval-batches", "2", "--lr", "0.01", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    return out / "checkpoint.pt"


def test_training_learns(checkpoint: Path) -> None:
    ckpt = torch.load(checkpoint, weights_only=True)
    losses = ckpt["history"]["train"]
    assert losses[0] > 0.95 * math.log(len(ckpt["vocab"]))  # starts near a uniform guess
    assert ckpt["history"]["val"][-1][1] < losses[0] - 0.5


def test_sample_command_is_reproducible(checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    outputs = []
    for seed in (5, 5, 6):
        capsys.readouterr()
        assert main(["sample", str(checkpoint), "--prime", "KING:", "--length", "60", "--top-k", "5", "--seed", str(seed)]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]
    assert outputs[0].startswith("KING:") and len(outputs[0]) == len("KING:") + 60 + 1  # + print's newline


def test_prime_outside_the_vocabulary_is_a_clear_error(checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sample", str(checkpoint), "--prime", "日本"]) == 1
    assert "not in the model's vocabulary" in capsys.readouterr().err
