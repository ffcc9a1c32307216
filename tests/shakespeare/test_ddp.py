"""Two CPU processes with DistributedDataParallel (gloo) keep identical weights."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from lstm_ext.shakespeare.checkpoint import load_checkpoint
from lstm_ext.shakespeare.model import CharLSTM

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_ranks_train_their_own_streams_with_identical_weights(
    impl: str, tmp_path: Path, text_file: Path, run_python: Callable
) -> None:
    out = tmp_path / "ddp"
    proc = run_python(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
        "train", "--ddp", "--impl", impl, "--data", str(text_file), "--hidden", "16", "--layers", "2",
        "--dropout", "0.1", "--batch", "4", "--seq", "8", "--steps", "6", "--eval-every", "3",
        "--eval-batches", "1", "--no-progress", "--out", str(out), timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name  # gradients were averaged, not rank-local
        assert torch.equal(value, ckpt["model"][name]), name
    torch.manual_seed(0)  # the run's seed; the embedding is made first, whatever the LSTM
    initial = CharLSTM(len(ckpt["vocab"]), 16, 2, impl="torch").embed.weight
    assert not torch.equal(ranks[0]["embed.weight"], initial)  # and it trained
    # Each rank carried the state of its own streams; both are in the checkpoint.
    (h0, _), (h1, _) = (r["state"] for r in ckpt["ranks"])
    assert h0.shape == h1.shape == (2, 4, 16) and not torch.equal(h0, h1)
    assert ckpt["step"] == 6 and len(ckpt["history"]["train"]) == 6
