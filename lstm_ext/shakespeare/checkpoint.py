"""Checkpoint files: everything needed to resume training exactly, or to sample.

A checkpoint is a ``torch.save``'d dict of plain containers and tensors, loaded with
``weights_only=True`` (no arbitrary code runs when a file is opened)::

    format        FORMAT
    config        the TrainConfig as a dict (data and out as absolute paths)
    vocab         list of characters (index = id)
    data_digest   hash of the training text
    step          optimizer steps taken; also the data position (next batch: step mod batches per epoch)
    model         model state dict (the same for both implementations; recurrent layers under "rnn.",
                  "lstm." in files from before GRU and RNN cells, renamed on loading)
    optimizer     Adam state dict
    history       {"train": [loss per step], "val": [[step, loss], ...],
                   "val_seconds": [training seconds at each validation, or None where unknown],
                   "seconds": training seconds of all steps}
    ranks         per process: {"rng": ..., "state": (h, c) for an LSTM, h for a GRU or RNN, or None}

``load_checkpoint`` checks the type of each part (``PARTS``); whether the parts fit a
model is checked as they are loaded into it (``load_weights``, ``train._restore``).
Every problem is a one-line CheckpointError.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

FORMAT = "lstm_ext.shakespeare/1"
REQUIRED = ("format", "config", "vocab", "data_digest", "step", "model", "optimizer", "history", "ranks")


class CheckpointError(Exception):
    """A checkpoint cannot be read or written, or does not fit the requested run."""


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_vocab(value: Any) -> bool:
    """A non-empty list of distinct single characters."""
    return (isinstance(value, list) and len(value) > 0 and len(set(value)) == len(value)
            and all(isinstance(c, str) and len(c) == 1 for c in value))


def _is_history(value: Any) -> bool:
    """``{"train": [loss, ...], "val": [[step, loss], ...]}``, optionally ``"val_seconds": [seconds or None, ...]``
    (one per validation) and ``"seconds"`` (checkpoints from before them have neither)."""
    seconds = value.get("val_seconds", []) if isinstance(value, dict) else None
    return (isinstance(value, dict) and isinstance(value.get("train"), list) and isinstance(value.get("val"), list)
            and all(_is_number(loss) for loss in value["train"])
            and all(isinstance(v, (list, tuple)) and len(v) == 2 and _is_count(v[0]) and _is_number(v[1])
                    for v in value["val"])
            and isinstance(seconds, list) and len(seconds) <= len(value["val"])
            and all(t is None or _is_number(t) for t in seconds) and _is_number(value.get("seconds", 0.0)))


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(t, Tensor) for k, t in value.items())


def _is_rank(value: Any) -> bool:
    """``{"rng": {"torch": tensor, "python": ...}, "state": None, h or (h, c)}``."""
    if not (isinstance(value, dict) and isinstance(value.get("rng"), dict) and "state" in value):
        return False
    rng, state = value["rng"], value["state"]
    is_pair = isinstance(state, (list, tuple)) and len(state) == 2 and all(isinstance(t, Tensor) for t in state)
    return isinstance(rng.get("torch"), Tensor) and "python" in rng and (state is None or isinstance(state, Tensor) or is_pair)


# What each part of a payload must be: its test, and how to tell a user.
PARTS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("config", lambda v: isinstance(v, dict), "a dict of settings"),
    ("vocab", _is_vocab, "a list of distinct characters"),
    ("data_digest", lambda v: isinstance(v, str), "a string"),
    ("step", _is_count, "a step count"),
    ("model", _is_state_dict, "a state dict of tensors"),
    ("optimizer", lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
     and isinstance(v.get("param_groups"), list), "an optimizer state dict"),
    ("history", _is_history, "a loss history"),
    ("ranks", lambda v: isinstance(v, list) and len(v) > 0 and all(_is_rank(r) for r in v),
     "a list of per-process states"),
)


def save_checkpoint(path: Union[str, Path], payload: dict[str, Any]) -> None:
    """Write atomically, so that an interruption never leaves a truncated file behind."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": FORMAT, **payload}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
        raise CheckpointError(f"cannot write checkpoint {path}: {err}") from err


def ensure_writable_dir(path: Path) -> None:
    """Create the directory ``path`` if needed and prove a file can be written there.

    Called before training, so that a run never ends with nowhere to save it.
    """
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot write checkpoints to {path}: it is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoints to {path}: {err}") from err


def load_checkpoint(path: Union[str, Path]) -> dict[str, Any]:
    """Read a checkpoint and check the type of each part; any problem becomes a CheckpointError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {path} does not exist") from err
    except Exception as err:  # unpickling foreign bytes fails with almost any error type
        raise CheckpointError(
            f"{path} is not a readable checkpoint (corrupt or truncated?): {type(err).__name__}: {err}"
        ) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an lstm_ext.shakespeare checkpoint (expected format {FORMAT!r})")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    wrong = [f"{key} is not {what}" for key, is_valid, what in PARTS if not is_valid(ckpt[key])]
    if wrong:
        raise CheckpointError(f"checkpoint {path} is malformed: {'; '.join(wrong)}")
    return ckpt


def describe_state_mismatch(wanted: dict[str, Tensor], saved: dict[str, Tensor], shown: int = 3) -> Optional[str]:
    """``"missing head.bias; head.weight is (3, 3), not (56, 8)"`` (at most ``shown`` items), or None."""
    problems = [f"missing {name}" for name in wanted if name not in saved]
    problems += [f"unexpected {name}" for name in saved if name not in wanted]
    problems += [f"{name} is {tuple(saved[name].shape)}, not {tuple(t.shape)}"
                 for name, t in wanted.items() if name in saved and saved[name].shape != t.shape]
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more if problems else None


def load_weights(module: torch.nn.Module, state_dict: dict[str, Tensor], path: Union[str, Path]) -> None:
    """``module.load_state_dict`` once every weight is known to be present, of the right shape and finite.

    Any problem is a one-line CheckpointError; NaN or inf weights (a diverged run) are never loaded.
    """
    problem = describe_state_mismatch(module.state_dict(), state_dict)
    if problem:
        raise CheckpointError(f"the weights in {path} do not fit this model: {problem}")
    non_finite = [name for name, t in state_dict.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if non_finite:
        raise CheckpointError(
            f"the weights in {path} are not finite (NaN or inf in {', '.join(non_finite)}); the model is unusable"
        )
    module.load_state_dict(state_dict)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Random generator states of this process (python's kept for code that uses it)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def describe_mismatch(saved: dict[str, Any], wanted: dict[str, Any], keys: tuple[str, ...]) -> Optional[str]:
    """``"hidden: checkpoint 128, requested 256; ..."`` for the keys that differ, or None."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, requested {wanted.get(k)!r}" for k in keys if saved.get(k) != wanted.get(k)]
    return "; ".join(diffs) or None
