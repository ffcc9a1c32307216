"""``compare``: RNN, GRU and LSTM on the same batches; figure, table, JSON and samples (issue 11 item 4)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lstm_ext.shakespeare.checkpoint import load_checkpoint
from lstm_ext.shakespeare.cli import main
from lstm_ext.shakespeare.compare import loss_at, parse_cells
from lstm_ext.shakespeare.timing import cpu_model

TINY = ["--hidden", "12", "--layers", "1", "--batch", "4", "--seq", "8", "--steps", "12", "--eval-every", "4",
        "--eval-batches", "2", "--speed-steps", "3", "--sample-chars", "30", "--no-progress"]


@pytest.mark.parametrize("impl", ["torch", "lstm_ext"])  # lstm_ext needs lstm_ext.GRU and lstm_ext.RNN
def test_compare_writes_figure_table_and_json(impl: str, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--impl", impl, "--data", str(text_file), *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    assert res["cells"] == ["rnn", "gru", "lstm"] and res["config"]["impl"] == impl
    assert res["environment"]["cpu"] == cpu_model()
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "compare.md").read_text(encoding="utf-8")
    uniform = math.log(res["vocab_size"])
    ends = []
    for cell, label in (("rnn", "RNN (tanh)"), ("gru", "GRU"), ("lstm", "LSTM")):
        run = res["runs"][cell]
        hist = run["history"]
        assert [v[0] for v in hist["val"]] == [4, 8, 12] and len(hist["val_seconds"]) == 3
        assert 0 < hist["val_seconds"][0] < hist["val_seconds"][-1] == run["train_seconds"]
        assert 0 < run["final_val_loss"] == hist["val"][-1][1] < 1.1 * uniform
        assert run["val_loss_at_equal_time"] is None or 0 < run["val_loss_at_equal_time"] < 1.1 * uniform
        speed = run["train_tokens_per_s"]
        assert speed["torch"] > 0 and speed["impl"] > 0 and speed["speedup"] > 0 and speed["rounds"] == 3
        assert run["sample"].startswith("\n") and len(run["sample"]) == 31
        assert f"| {label} | {run['parameters']:,} | {run['final_val_loss']:.4f} |" in md
        assert run["sample"].strip() in md
        assert f"| {label} |" in printed
        ends.append(run["train_seconds"])
        ckpt = load_checkpoint(out / cell / "checkpoint.pt")  # each cell's run can be sampled or resumed
        assert ckpt["config"]["cell"] == cell and ckpt["step"] == 12
    # Equal wall time: the shortest run's total; that run's loss there is its final one.
    assert res["equal_time_s"] == min(ends)
    fastest = min(res["runs"].values(), key=lambda r: r["train_seconds"])
    assert fastest["val_loss_at_equal_time"] == fastest["final_val_loss"]
    assert f"validation loss at {res['equal_time_s']:.1f} s" in md and f"CPU {cpu_model()}" in md
    # The same batches: every cell's first training loss is on batch 0, the runs' seeds and data are one config.
    assert res["config"]["seed"] == 0 and "cell" not in res["config"]


def test_compare_a_subset_of_cells(text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--impl", "torch", "--cells", "gru,rnn", "--data", str(text_file), *TINY, "--out", str(out)]) == 0
    res = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    assert res["cells"] == ["gru", "rnn"] and set(res["runs"]) == {"gru", "rnn"} and not (out / "lstm").exists()


def test_unwritable_out_is_one_line_error_before_training(text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory", encoding="utf-8")
    capsys.readouterr()
    assert main(["compare", "--impl", "torch", "--data", str(text_file), *TINY, "--out", str(blocker)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and "it is a file" in captured.err
    assert "==" not in captured.out  # no training started


@pytest.mark.parametrize("cells", ["lstm,lsmt", "", "gru,gru"])
def test_bad_cells_are_a_usage_error(cells: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--cells", cells])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --cells:" in err.splitlines()[-1] and "Traceback" not in err


def test_parse_cells_and_loss_at() -> None:
    assert parse_cells(" rnn, lstm") == ["rnn", "lstm"]
    val, seconds = [[10, 3.0], [20, 2.0], [30, 1.5]], [1.0, 2.0, 4.0]
    assert loss_at(val, seconds, 0.5) is None  # before the first validation
    assert loss_at(val, seconds, 1.0) == 3.0 and loss_at(val, seconds, 1.5) == 2.5
    assert loss_at(val, seconds, 3.0) == 1.75 and loss_at(val, seconds, 4.0) == 1.5 and loss_at(val, seconds, 9.0) == 1.5
    assert loss_at(val, [None, 2.0, 4.0], 1.5) is None and loss_at(val, [None, 2.0, 4.0], 3.0) == 1.75
