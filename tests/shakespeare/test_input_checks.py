"""The app checks its input up front and never loses a run (issue 13, item 6).

Bad options are argparse errors before any work; an unusable output directory,
a malformed checkpoint, non-finite weights or a diverging run are one ``error:``
line with exit status 1, never a traceback.
"""
from __future__ import annotations

import copy
import importlib
import itertools
import operator
import shutil
from functools import reduce
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from lstm_ext.shakespeare.checkpoint import load_checkpoint
from lstm_ext.shakespeare.cli import main

# The module, not the function of the same name that the package exports.
train_module = importlib.import_module("lstm_ext.shakespeare.train")

TINY_ARGS = ["--impl", "torch", "--hidden", "8", "--layers", "1", "--batch", "2", "--seq", "8",
             "--eval-batches", "1", "--no-progress"]


def train_tiny(data: Path, out: Path, steps: int = 2, *extra: str) -> Path:
    """Train a tiny model with the CLI and return its checkpoint."""
    assert main(["train", "--data", str(data), *TINY_ARGS, "--steps", str(steps), "--out", str(out), *extra]) == 0
    return out / "checkpoint.pt"


def one_line_error(capsys: pytest.CaptureFixture) -> str:
    """The captured stderr, checked to be a single ``error:`` line."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def usage_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run ``argv``, expecting argparse's exit 2: usage, then one ``error:`` line, which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1], err
    return errors[0]


@pytest.fixture(scope="module")
def small_text(tmp_path_factory: pytest.TempPathFactory, text_file: Path) -> Path:
    path = tmp_path_factory.mktemp("small") / "small.txt"
    path.write_text(text_file.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, small_text: Path) -> Path:
    return train_tiny(small_text, tmp_path_factory.mktemp("run"))


BAD_TRAIN_OPTIONS = [
    ("--clip", "-1"), ("--clip", "0"), ("--clip", "nan"), ("--lr", "-1"), ("--lr", "nan"), ("--lr", "0"),
    ("--lr", "1e38"), ("--dropout", "1.5"), ("--dropout", "-0.1"), ("--dropout", "nan"), ("--val-fraction", "nan"),
    ("--seed", str(2**64)), ("--device", "bogus"), ("--device", "cuda:99"), ("--threads", "-1"), ("--threads", "0"),
]


@pytest.mark.parametrize(("option", "value"), BAD_TRAIN_OPTIONS)
def test_bad_train_option_is_a_usage_error(
    option: str, value: str, small_text: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    error = usage_error(capsys, ["train", "--data", str(small_text), *TINY_ARGS, "--steps", "2", "--out", str(out), option, value])
    assert f"argument {option}:" in error
    assert not out.exists()  # nothing ran


BAD_SAMPLE_OPTIONS = [
    ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"), ("--top-k", "-1"), ("--top-k", "0"),
    ("--seed", str(2**64)), ("--device", "bogus"), ("--device", "cuda:99"), ("--threads", "-1"),
]


@pytest.mark.parametrize(("option", "value"), BAD_SAMPLE_OPTIONS)
def test_bad_sample_option_is_a_usage_error(option: str, value: str, checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    assert f"argument {option}:" in usage_error(capsys, ["sample", str(checkpoint), "--length", "5", option, value])


@pytest.fixture()
def no_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any training step fail the test: checks must come before the first one."""

    def fail(*args: Any) -> None:
        raise AssertionError("a training step ran")

    monkeypatch.setattr(train_module, "lm_loss", fail)


@pytest.mark.parametrize("where", ["existing file", "below a file"])
def test_unusable_output_directory_is_an_error_before_the_first_step(
    where: str, small_text: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_steps: None
) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory", encoding="utf-8")
    out = blocker if where == "existing file" else blocker / "run"
    capsys.readouterr()
    assert main(["train", "--data", str(small_text), *TINY_ARGS, "--steps", "2", "--out", str(out)]) == 1
    assert str(out) in one_line_error(capsys)


def test_relative_data_path_resumes_from_another_directory(
    small_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    first.mkdir()
    elsewhere.mkdir()
    shutil.copy(small_text, first / "plays.txt")
    monkeypatch.chdir(first)
    train_tiny(Path("plays.txt"), Path("run"))
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", "../first/run/checkpoint.pt", "--steps", "3"]) == 0
    assert load_checkpoint(first / "run" / "checkpoint.pt")["step"] == 3  # the run's own directory, not ./run
    assert not (elsewhere / "run").exists()


@pytest.mark.parametrize("spelling", ["absolute path", "copy"])
def test_the_same_text_at_another_path_resumes(
    spelling: str, small_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(small_text, tmp_path / "plays.txt")
    monkeypatch.chdir(tmp_path)
    ckpt = train_tiny(Path("plays.txt"), Path("run"))
    same = tmp_path / "plays.txt"
    if spelling == "copy":
        same = tmp_path / "moved" / "renamed.txt"
        same.parent.mkdir()
        shutil.copy(small_text, same)
    assert main(["train", "--resume", str(ckpt), "--data", str(same), "--steps", "3"]) == 0
    assert load_checkpoint(ckpt)["config"]["data"] == str(same.resolve())


Edit = Callable[[dict[str, Any]], None]


def _set(*keys: Any, value: Any) -> Edit:
    """An edit that sets ``ckpt[keys[0]]...[keys[-1]] = value``."""
    return lambda ckpt: operator.setitem(reduce(operator.getitem, keys[:-1], ckpt), keys[-1], value)


def _drop(*keys: Any) -> Edit:
    """An edit that deletes ``ckpt[keys[0]]...[keys[-1]]``."""
    return lambda ckpt: operator.delitem(reduce(operator.getitem, keys[:-1], ckpt), keys[-1])


MALFORMED = {
    "config is a string": _set("config", value="abc"),
    "config is a list": _set("config", value=[1]),
    "hidden is a string": _set("config", "hidden", value="8"),
    "hidden is a float": _set("config", "hidden", value=8.0),
    "hidden is missing": _drop("config", "hidden"),
    "hidden far larger than the weights": _set("config", "hidden", value=10**6),  # must not be allocated
    "layers far more than the weights": _set("config", "layers", value=10**6),
    "unknown impl": _set("config", "impl", value="zzz"),
    "dropout out of range": _set("config", "dropout", value=5.0),
    "lr is nan": _set("config", "lr", value=float("nan")),
    "vocab is an int": _set("vocab", value=5),
    "vocab is None": _set("vocab", value=None),
    "vocab of strings": _set("vocab", value=["ab", "c"]),
    "digest is an int": _set("data_digest", value=5),
    "step is a string": _set("step", value="2"),
    "negative step": _set("step", value=-1),
    "model is a string": _set("model", value="x"),
    "a weight is a string": _set("model", "head.weight", value="x"),
    "a weight has the wrong shape": _set("model", "head.weight", value=torch.zeros(3, 3)),
    "a weight is missing": _drop("model", "head.bias"),
    "optimizer is a list": _set("optimizer", value=[1]),
    "history is empty": _set("history", value={}),
    "no ranks": _set("ranks", value=[]),
    "rank without rng": _set("ranks", 0, value={"state": None}),
    "state of the wrong shape": _set("ranks", 0, "state", value=(torch.zeros(1), torch.zeros(1))),
}
# Parts that only resuming uses: sampling such a checkpoint works.
RESUME_ONLY = {"state of the wrong shape"}


@pytest.fixture(scope="module")
def malformed_dir(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One broken copy of ``checkpoint`` per MALFORMED edit, plus a text file."""
    root = tmp_path_factory.mktemp("malformed")
    good = torch.load(checkpoint, weights_only=True)
    for i, change in enumerate(MALFORMED.values()):
        ckpt = copy.deepcopy(good)
        change(ckpt)
        torch.save(ckpt, root / f"{i}.pt")
    (root / "hello.pt").write_text("hello world", encoding="utf-8")
    return root


def use_checkpoint(command: str, path: str, tmp_path: Path) -> list[str]:
    """Arguments that sample ``path`` or resume its run for one more step."""
    if command == "sample":
        return ["sample", path, "--length", "5"]
    return ["train", "--resume", path, "--steps", "3", "--out", str(tmp_path / "run"), "--no-progress"]


MALFORMED_FILES = {**{name: f"{i}.pt" for i, name in enumerate(MALFORMED)}, "text file": "hello.pt"}


@pytest.mark.parametrize("command", ["sample", "resume"])
@pytest.mark.parametrize("case", list(MALFORMED_FILES))
def test_malformed_checkpoint_is_one_line_error(
    case: str, command: str, malformed_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = str(malformed_dir / MALFORMED_FILES[case])
    argv = use_checkpoint(command, path, tmp_path)
    capsys.readouterr()
    if command == "sample" and case in RESUME_ONLY:
        assert main(argv) == 0
        return
    assert main(argv) == 1
    assert path in one_line_error(capsys)


@pytest.mark.parametrize("command", ["sample", "resume"])
def test_non_finite_weights_are_reported_not_used(
    command: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["model"]["head.weight"].fill_(float("nan"))
    path = tmp_path / "nan.pt"
    torch.save(ckpt, path)
    argv = use_checkpoint(command, str(path), tmp_path)
    capsys.readouterr()
    assert main(argv) == 1
    err = one_line_error(capsys)
    assert "not finite" in err and "head.weight" in err


def test_diverging_training_stops_with_an_error_and_keeps_the_last_finite_weights(
    small_text: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = itertools.count()
    real_loss = train_module.lm_loss

    def nan_at_step_3(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = real_loss(logits, targets)
        return loss * float("nan") if next(calls) == 2 else loss  # the third call is step 3's

    monkeypatch.setattr(train_module, "lm_loss", nan_at_step_3)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--data", str(small_text), *TINY_ARGS, "--steps", "5", "--out", str(out)]) == 1
    err = one_line_error(capsys)
    assert "diverged at step 3" in err and str(out / "checkpoint.pt") in err
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["step"] == 2 and all(torch.isfinite(t).all() for t in saved["model"].values())


def test_unavailable_device_of_a_resumed_run_is_one_line_error(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["config"]["device"] = "cuda:99"  # made on a machine with more GPUs
    path = tmp_path / "gpu.pt"
    torch.save(ckpt, path)
    capsys.readouterr()
    assert main(["train", "--resume", str(path), "--steps", "3", "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    assert "cuda:99" in one_line_error(capsys)
    assert main(["train", "--resume", str(path), "--steps", "3", "--out", str(tmp_path / "run"), "--no-progress",
                 "--device", "cpu"]) == 0
