"""Checkpoints: exact resume, Ctrl-C, and clear errors for corrupt or mismatched files."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lstm_ext.shakespeare.checkpoint import load_checkpoint
from lstm_ext.shakespeare.cli import main
from lstm_ext.shakespeare.train import TrainConfig, train

TINY_ARGS = ["--impl", "torch", "--hidden", "16", "--layers", "2", "--batch", "4", "--seq", "8", "--eval-batches", "1", "--no-progress"]


def tiny_config(data: Path, out: Path, steps: int, impl: str) -> TrainConfig:
    # Dropout makes the run depend on the RNG state, which the checkpoint must restore too.
    return TrainConfig(
        data=str(data), impl=impl, hidden=16, layers=2, dropout=0.1, batch=4, seq=8,
        steps=steps, eval_every=4, eval_batches=1, save_every=1000, out=str(out),
    )


def test_resumed_run_repeats_the_uninterrupted_losses_exactly(tmp_path: Path, text_file: Path, impl: str) -> None:
    data = tmp_path / "short.txt"
    data.write_text(text_file.read_text(encoding="utf-8")[:400], encoding="utf-8")  # 11 batches per epoch
    full = train(tiny_config(data, tmp_path / "full", 15, impl), progress=False)
    first = train(tiny_config(data, tmp_path / "part", 6, impl), progress=False)
    rest = train(tiny_config(data, tmp_path / "part", 15, impl), resume=str(first.checkpoint), progress=False)
    assert rest.step == full.step == 15
    assert rest.history["train"] == full.history["train"]  # bitwise equal, past the epoch boundary
    for name, value in full.model.state_dict().items():
        assert torch.equal(rest.model.state_dict()[name], value), name
    saved = load_checkpoint(rest.checkpoint)
    assert saved["step"] == 15 and saved["vocab"] == full.vocab.chars
    assert saved["ranks"][0]["state"][0].shape == (2, 4, 16)  # the carried (h, c)
    assert (tmp_path / "part" / "loss.png").stat().st_size > 0


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path: Path, text_file: Path, child_env: dict[str, str]) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lstm_ext.shakespeare", "train", "--data", str(text_file), *TINY_ARGS,
           "--steps", "1000000", "--eval-every", "3", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("step 3:")  # training is under way
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "Traceback" not in err
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["step"] >= 3 and len(saved["history"]["train"]) == saved["step"]
    assert main(["train", "--resume", str(out / "checkpoint.pt"), "--steps", str(saved["step"] + 2), "--no-progress"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == saved["step"] + 2


@pytest.fixture()
def checkpoint(tmp_path: Path, text_file: Path) -> Path:
    out = tmp_path / "run"
    assert main(["train", "--data", str(text_file), *TINY_ARGS, "--steps", "2", "--out", str(out)]) == 0
    return out / "checkpoint.pt"


def test_mismatched_resume_is_one_clear_error(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["train", "--resume", str(checkpoint), "--hidden", "32", "--steps", "4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume") and "hidden: checkpoint 16, requested 32" in err
    other = tmp_path / "other.txt"
    other.write_text("something else entirely\n" * 100, encoding="utf-8")
    assert main(["train", "--resume", str(checkpoint), "--data", str(other), "--steps", "4"]) == 1
    assert "is not the text it was trained on" in capsys.readouterr().err


def corrupt_files(checkpoint: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """Broken checkpoints, each with the message it must produce."""
    garbage, truncated, foreign, reshaped = (tmp / n for n in ("garbage.pt", "truncated.pt", "foreign.pt", "reshaped.pt"))
    garbage.write_bytes(b"definitely not a checkpoint")
    raw = checkpoint.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    torch.save({"weights": torch.zeros(3)}, foreign)
    ckpt = load_checkpoint(checkpoint)
    ckpt["config"]["hidden"] = 24  # the stored weights are 16 wide
    torch.save(ckpt, reshaped)
    return {
        "garbage": (garbage, "not a readable checkpoint"),
        "truncated": (truncated, "not a readable checkpoint"),
        "foreign": (foreign, "not an lstm_ext.shakespeare checkpoint"),
        "reshaped": (reshaped, "do not fit this model"),
        "missing": (tmp / "missing.pt", "does not exist"),
    }


def test_corrupt_checkpoints_are_one_clear_error(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name, (path, message) in corrupt_files(checkpoint, tmp_path).items():
        capsys.readouterr()
        assert main(["sample", str(path), "--length", "5"]) == 1, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (name, err)
    garbage = tmp_path / "garbage.pt"
    assert main(["train", "--resume", str(garbage)]) == 1
    assert "not a readable checkpoint" in capsys.readouterr().err
