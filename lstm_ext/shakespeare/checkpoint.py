"""Checkpoint files: everything needed to resume training exactly, or to sample.

A checkpoint is a ``torch.save``'d dict of plain containers and tensors, loaded with
``weights_only=True`` (no arbitrary code runs when a file is opened)::

    format        FORMAT
    config        the TrainConfig as a dict
    vocab         list of characters (index = id)
    data_digest   hash of the training text
    step          optimizer steps taken; also the data position (next batch: step mod batches per epoch)
    model         model state dict (the same for both LSTM implementations)
    optimizer     Adam state dict
    history       {"train": [loss per step], "val": [[step, loss], ...]}
    ranks         per process: {"rng": ..., "state": (h, c) or None}
"""
from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

FORMAT = "lstm_ext.shakespeare/1"
REQUIRED = ("format", "config", "vocab", "data_digest", "step", "model", "optimizer", "history", "ranks")


class CheckpointError(Exception):
    """A checkpoint cannot be read, or does not fit the requested run."""


def save_checkpoint(path: Union[str, Path], payload: dict[str, Any]) -> None:
    """Write atomically, so that an interruption never leaves a truncated file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    torch.save({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Union[str, Path]) -> dict[str, Any]:
    """Read and sanity-check a checkpoint; any problem becomes a CheckpointError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {path} does not exist") from err
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated?): {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an lstm_ext.shakespeare checkpoint (expected format {FORMAT!r})")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return ckpt


def load_weights(module: torch.nn.Module, state_dict: dict[str, Any], path: Union[str, Path]) -> None:
    """``module.load_state_dict`` with shape and name mismatches reported as CheckpointError."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"the weights in {path} do not fit this model: {err}") from err


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
