"""--cell rnn|gru|lstm: train, sample and resume with each cell; old LSTM checkpoints still load (issue 11 item 4)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lstm_ext.shakespeare.checkpoint import load_checkpoint
from lstm_ext.shakespeare.cli import main
from lstm_ext.shakespeare.model import CharRNN, detach_state
from lstm_ext.shakespeare.sample import load_for_sampling

TINY = ["--hidden", "8", "--layers", "2", "--batch", "2", "--seq", "8", "--eval-every", "2", "--eval-batches", "1", "--no-progress"]


@pytest.fixture(scope="module")
def small_text(tmp_path_factory: pytest.TempPathFactory, text_file: Path) -> Path:
    path = tmp_path_factory.mktemp("small") / "small.txt"
    path.write_text(text_file.read_text(encoding="utf-8")[:2000], encoding="utf-8")
    return path


def train_cli(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), *TINY, "--out", str(out), *extra])


@pytest.mark.parametrize("impl", ["torch", "lstm_ext"])  # lstm_ext needs lstm_ext.GRU and lstm_ext.RNN
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_train_resume_and_sample_with_each_cell(cell: str, impl: str, small_text: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert train_cli(small_text, out, "--impl", impl, "--cell", cell, "--steps", "3") == 0
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["config"]["cell"] == cell and ckpt["config"]["impl"] == impl
    assert any(k.startswith("rnn.weight_hh_l1") for k in ckpt["model"])
    rows = {"lstm": 4, "gru": 3, "rnn": 1}[cell] * 8
    assert ckpt["model"]["rnn.weight_hh_l0"].shape == (rows, 8)
    state = ckpt["ranks"][0]["state"]
    if cell == "lstm":
        assert isinstance(state, tuple) and [t.shape for t in state] == [(2, 2, 8)] * 2
    else:
        assert isinstance(state, torch.Tensor) and state.shape == (2, 2, 8)
    assert len(ckpt["history"]["val_seconds"]) == len(ckpt["history"]["val"]) == 2
    assert 0 < ckpt["history"]["val_seconds"][0] <= ckpt["history"]["val_seconds"][1] == ckpt["history"]["seconds"]
    # Resume takes the cell from the checkpoint.
    assert main(["train", "--resume", str(out / "checkpoint.pt"), "--steps", "5", "--no-progress"]) == 0
    resumed = load_checkpoint(out / "checkpoint.pt")
    assert resumed["step"] == 5 and resumed["config"]["cell"] == cell
    assert resumed["history"]["val_seconds"][-1] >= ckpt["history"]["val_seconds"][-1]
    # Sampling: the cell comes from the checkpoint; either implementation runs it.
    for sample_impl in ("torch", impl):
        capsys.readouterr()
        assert main(["sample", str(out / "checkpoint.pt"), "--impl", sample_impl, "--length", "20", "--seed", "1"]) == 0
        text = capsys.readouterr().out
        assert len(text) == 1 + 20 + 1  # the newline prime, 20 characters, print's newline
    model, _ = load_for_sampling(str(out / "checkpoint.pt"), impl)
    assert model.cell == cell


def one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_resume_with_another_cell_is_one_line_error(small_text: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert train_cli(small_text, out, "--impl", "torch", "--cell", "gru", "--steps", "2") == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "checkpoint.pt"), "--cell", "lstm", "--steps", "4"]) == 1
    err = one_line_error(capsys)
    assert "cannot resume" in err and "cell: checkpoint 'gru', requested 'lstm'" in err
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2


def test_bad_cell_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--cell", "lstmx"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --cell: invalid choice: 'lstmx'" in err and "Traceback" not in err


def test_old_checkpoint_without_cell_loads_as_lstm(small_text: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A checkpoint as written before cells existed: no cell setting, weights under "lstm.", no val_seconds."""
    out = tmp_path / "run"
    assert train_cli(small_text, out, "--impl", "torch", "--steps", "2") == 0
    ckpt = load_checkpoint(out / "checkpoint.pt")
    del ckpt["config"]["cell"], ckpt["history"]["val_seconds"]
    ckpt["model"] = {("lstm." + k[4:] if k.startswith("rnn.") else k): v for k, v in ckpt["model"].items()}
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    model, _ = load_for_sampling(str(old))
    assert model.cell == "lstm"
    assert torch.equal(model.state_dict()["rnn.weight_hh_l1"], ckpt["model"]["lstm.weight_hh_l1"])
    capsys.readouterr()
    assert main(["sample", str(old), "--length", "10"]) == 0
    # Resuming it continues as an LSTM; its earlier validations have unknown times.
    assert main(["train", "--resume", str(old), "--out", str(tmp_path / "more"), "--steps", "3", "--no-progress"]) == 0
    new = load_checkpoint(tmp_path / "more" / "checkpoint.pt")
    assert new["config"]["cell"] == "lstm" and new["step"] == 3
    assert new["history"]["val_seconds"][0] is None and new["history"]["val_seconds"][-1] > 0
    capsys.readouterr()
    assert main(["train", "--resume", str(old), "--cell", "rnn", "--steps", "3"]) == 1
    assert "cell: checkpoint 'lstm', requested 'rnn'" in one_line_error(capsys)


def test_weights_of_another_cell_are_one_line_error(small_text: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert train_cli(small_text, out, "--impl", "torch", "--cell", "rnn", "--steps", "2") == 0
    ckpt = load_checkpoint(out / "checkpoint.pt")
    ckpt["config"]["cell"] = "gru"  # the RNN's weights, labelled GRU
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    capsys.readouterr()
    assert main(["sample", str(bad)]) == 1
    assert "do not fit this model (cell gru" in one_line_error(capsys)


def test_model_rejects_projection_for_gru_and_rnn_and_detaches_either_state() -> None:
    for cell in ("gru", "rnn"):
        with pytest.raises(ValueError, match="proj_size"):
            CharRNN(10, 8, 1, impl="torch", proj_size=4, cell=cell)
    assert CharRNN(10, 8, 1, impl="torch", proj_size=4).head.in_features == 4
    h = torch.zeros(1, 2, 3, requires_grad=True) * 2
    assert not detach_state(h).requires_grad
    assert not any(t.requires_grad for t in detach_state((h, h)))
