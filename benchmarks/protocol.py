"""Per-shape measurement of lstm_ext.LSTM against torch.nn.LSTM on the Shakespeare model
(or of lstm_ext.GRU / lstm_ext.RNN against nn.GRU / nn.RNN with ``cell``).

Both models start from the same weights and train on the same batches, one step of
each in turn (the order alternating), so the machine's noise hits both alike. Every
speed-up is the median over rounds of the paired ratio (nn.LSTM time / candidate
time); throughputs are tokens (or characters) over the median time. Phases: training
steps, forward only (no_grad), the LSTM alone forward+backward (against the matmul
rate), generation at batch 1 (also against a loop of nn.LSTMCell), memory.

Memory: ``saved_mib`` is what autograd keeps for backward during one training
forward (whole model, unique storages, via ``saved_tensors_hooks``; tensors an
implementation hides on its autograd context outside ``save_for_backward`` are not
seen); ``peak_mib`` (CUDA only) is the allocator's peak above the resting level
during one forward+backward. CPU peak memory is not measured.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, ContextManager, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from config import BenchConfig, Plan, Shape, dtype_setup
from lstm_ext.shakespeare.data import CharStreams, Vocab, load_text, split
from lstm_ext.shakespeare.model import CELL_CLASSES, GATES, CharLSTM, State
from lstm_ext.shakespeare.sample import generate
from lstm_ext.shakespeare.timing import Contender, autocast_region
from lstm_ext.shakespeare.train import evaluate, lm_loss
from timing import describe_machine, interleaved, matmul_gflops, median_rate, median_ratio, sync, tf32_disabled

BASE, CAND, CELLS = "baseline", "candidate", "cells"


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


def compare(times: dict[str, list[float]], work: Sequence[float], warmup: int) -> dict[str, float]:
    """Throughput (median of work per second) of each contender, and paired speed-ups.

    ``speedup`` is the candidate's over the baseline; with an nn.LSTMCell loop timed
    too, ``speedup_vs_cells`` is the candidate's over it and ``cells_vs_baseline`` its own.
    """
    out = {name: median_rate(work, ts, warmup) for name, ts in times.items()}
    out["speedup"] = median_ratio(times[BASE], times[CAND], warmup)
    if CELLS in times:
        out["speedup_vs_cells"] = median_ratio(times[CELLS], times[CAND], warmup)
        out["cells_vs_baseline"] = median_ratio(times[BASE], times[CELLS], warmup)
    return out


def lstm_forward_flops(tokens: int, shape: Shape, proj_size: int, cell: str = "lstm") -> float:
    """FLOPs of the recurrent layers' forward: per layer 2*tokens*G*H*(I+R), plus 2*tokens*H*P for a projection.

    G is the gate count (4 for the LSTM, 3 for the GRU, 1 for the RNN).
    """
    h, p = shape.hidden, proj_size
    r = p or h
    total = 0.0
    for k in range(shape.layers):
        i = h if k == 0 else r  # the embedding is H wide
        total += 2 * tokens * GATES[cell] * h * (i + r) + (2 * tokens * h * p if p else 0)
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
    sync(device)
    rest = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    lm_loss(model(x)[0], y).backward()
    sync(device)
    model.zero_grad(set_to_none=True)
    return (torch.cuda.max_memory_allocated(device) - rest) / 2**20


@dataclass
class Corpus:
    vocab: Vocab
    train: Tensor
    val: Tensor


def bench_shape(
    shape: Shape, dtype_name: str, cfg: BenchConfig, plan: Plan, corpus: Corpus, device: torch.device
) -> tuple[dict[str, Any], dict[str, CharLSTM]]:
    """All measurements for one shape in one dtype; returns the result record and the trained models."""
    dtype, autocast = dtype_setup(dtype_name)

    def region() -> ContextManager[Any]:
        """Where every forward of this shape runs: under torch.autocast for the autocast dtypes."""
        return autocast_region(device, autocast)

    torch.manual_seed(cfg.seed)
    base_model = CharLSTM(len(corpus.vocab), shape.hidden, shape.layers, 0.0, "torch", cfg.proj_size, cfg.cell)
    cand_model = CharLSTM(len(corpus.vocab), shape.hidden, shape.layers, 0.0, cfg.impl, cfg.proj_size, cfg.cell)
    cand_model.load_state_dict(base_model.state_dict())
    models = {BASE: base_model.to(device, dtype), CAND: cand_model.to(device, dtype)}
    contenders = {name: Contender(m, cfg.lr, autocast) for name, m in models.items()}
    batches = Batches(CharStreams(corpus.train, shape.batch, shape.seq), cfg.packed, device, cfg.seed)
    carry = not cfg.packed  # packed batches hold sequences of mixed lengths: nothing to carry over
    label = f"{shape} {dtype_name}"
    # Fetched before timing, once, so that both contenders see the very same batches.
    steps = [batches.get(i) for i in range(plan.steps)]

    def step_fn(c: Contender) -> Callable[[int], None]:
        def run(r: int) -> None:
            if batches.epoch_start(r):
                c.state = None
            c.train_step(steps[r][0], steps[r][1], carry)
        return run

    times = interleaved([step_fn(c) for c in contenders.values()], plan.steps, device, f"{label}: training")
    train = compare(dict(zip(contenders, times)), [b[2] for b in steps], plan.warmup)

    probe = [batches.get(plan.steps + r) for r in range(plan.warmup + plan.rounds)]
    tokens = [p[2] for p in probe]

    def forward_fn(m: CharLSTM) -> Callable[[int], None]:
        def run(r: int) -> None:
            with torch.no_grad(), region():
                m(probe[r][0])
        return run

    times = interleaved([forward_fn(m) for m in models.values()], len(probe), device, f"{label}: forward")
    forward = compare(dict(zip(models, times)), tokens, plan.warmup)

    # The LSTM alone, on random inputs of the embedding's width, for the matmul-rate comparison.
    inputs = [_lstm_input(p[0], shape.hidden, dtype) for p in probe]
    grads = [torch.randn(*_data(i).shape[:-1], cfg.proj_size or shape.hidden, device=device, dtype=dtype) for i in inputs]
    # Under autocast the output may come in either dtype: both casts are made here, untimed.
    grads_as = {dt: [g.to(dt) for g in grads] for dt in {dtype, autocast or dtype}}

    def lstm_fn(m: CharLSTM) -> Callable[[int], None]:
        def run(r: int) -> None:
            with region():
                out = _data(m.rnn(inputs[r])[0])
            out.backward(grads_as[out.dtype][r])
        return run

    times = interleaved([lstm_fn(m) for m in models.values()], len(probe), device, f"{label}: LSTM fwd+bwd")
    lstm = compare(dict(zip(models, times)), tokens, plan.warmup)
    matmul = matmul_gflops(4 * shape.hidden, autocast or dtype, device)
    flops_per_token = 3 * lstm_forward_flops(1, shape, cfg.proj_size, cfg.cell)  # backward ~ 2x forward
    for name in models:
        lstm[f"gflops_{name}"] = lstm[name] * flops_per_token / 1e9
        lstm[f"matmul_fraction_{name}"] = lstm[f"gflops_{name}"] / matmul

    gen_models = dict(models)
    if cfg.cell == "lstm" and cfg.proj_size == 0:  # nn.LSTMCell has no projection
        cells = copy.deepcopy(models[BASE])
        cells.rnn = LSTMCellStack(models[BASE].rnn)
        gen_models[CELLS] = cells

    def gen_fn(m: CharLSTM) -> Callable[[int], None]:
        def run(r: int) -> None:
            with region():
                generate(m, corpus.vocab, length=plan.gen_chars, temperature=1.0, seed=r)
        return run

    times = interleaved([gen_fn(m) for m in gen_models.values()], plan.warmup + plan.gen_rounds, device, f"{label}: generation")
    gen = compare(dict(zip(gen_models, times)), [plan.gen_chars] * len(times[0]), plan.warmup)

    x, y, _ = probe[0]
    with region():
        memory = {
            "saved_mib": {n: saved_mib(m, x, y) for n, m in models.items()},
            "peak_mib": {n: peak_mib(m, x, y, device) for n, m in models.items()},
        }
    val_streams = CharStreams(corpus.val, shape.batch, shape.seq)
    with region():
        val_loss = {n: evaluate(m, val_streams, plan.eval_batches, device) for n, m in models.items()}
    losses = {n: c.losses for n, c in contenders.items()}
    record = {
        "shape": asdict(shape),
        "dtype": dtype_name,
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
        "val_loss": val_loss,
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


def labels(cfg: BenchConfig) -> dict[str, str]:
    """How the reports name the contenders: nn.LSTM and lstm_ext.LSTM (or GRU, RNN), the cell loop."""
    name = CELL_CLASSES[cfg.cell]
    cand = f"lstm_ext.{name}" if cfg.impl == "lstm_ext" else f"nn.{name} (again)"
    return {BASE: f"nn.{name}", CAND: cand, CELLS: "nn.LSTMCell loop"}


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark described by ``cfg`` and return its results (see ``report.write_reports``).

    The main shape is measured in ``cfg.dtype`` (loss curves, sample); every sweep shape
    in every one of ``cfg.sweep_dtypes()``. TF32 is off throughout, so float32 is float32.
    """
    device = torch.device(cfg.device)
    text = load_text(cfg.data)
    vocab = Vocab.from_text(text)
    corpus = Corpus(vocab, *split(vocab.encode(text), 0.1))
    started = time.perf_counter()
    with tf32_disabled():
        main, models = bench_shape(cfg.main_shape(), cfg.dtype, cfg, cfg.main_plan(), corpus, device)
        sample = generate(models[CAND], vocab, length=cfg.sample_chars, temperature=0.8, seed=cfg.seed)
        sweep = [
            bench_shape(shape, dtype, cfg, cfg.sweep_plan(), corpus, device)[0]
            for shape in cfg.sweep_shapes()
            for dtype in cfg.sweep_dtypes()
        ]
        environment = describe_machine(device)
    return {
        "config": asdict(cfg),
        "labels": labels(cfg),
        "environment": environment,
        "vocab_size": len(vocab),
        "main": main,
        "sample": sample,
        "sweep": sweep,
        "seconds": time.perf_counter() - started,
    }
