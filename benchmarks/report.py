"""The benchmark's reports: a markdown table (also what the terminal shows), results.json and a figure."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from matplotlib.figure import Figure

from config import Shape
from lstm_ext.shakespeare.model import CELL_CLASSES
from lstm_ext.shakespeare.plot import draw_losses
from protocol import BASE, CAND, CELLS


def machine_line(env: dict[str, Any]) -> str:
    """The machine of ``timing.describe_machine`` in one line: GPU (on CUDA), CPU model, threads, torch."""
    line = f"CPU {env['cpu']} ({env['machine']}, {env['threads']} threads), torch {env['torch']}"
    if env["gpu"]:
        line = f"GPU {env['gpu']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), {line}"
    return line


def _n(v: Optional[float], digits: int = 0) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def _x(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.2f}x"


def _sweep_label(record: dict[str, Any], with_dtype: bool) -> str:
    shape = str(Shape(**record["shape"]))
    return f"{shape} {record['dtype']}" if with_dtype else shape


def cell_name(cfg: dict[str, Any]) -> str:
    """LSTM, GRU or RNN: the cell of a run's config (results from before --cell are LSTM)."""
    return CELL_CLASSES[cfg.get("cell", "lstm")]


def markdown(res: dict[str, Any]) -> str:
    """The results as a markdown report (also what the terminal shows)."""
    cfg, lab, m, env = res["config"], res["labels"], res["main"], res["environment"]
    cell = cell_name(cfg)
    tr, fw, ls, gen, mem = (m[k] for k in ("train_tokens_per_s", "forward_tokens_per_s", "lstm_fwd_bwd_tokens_per_s", "generate_chars_per_s", "memory"))
    extras = ", PackedSequence (mixed lengths)" if cfg["packed"] else ""
    extras += f", proj_size {cfg['proj_size']}" if cfg["proj_size"] else ""
    pct = {n: f"{ls[f'gflops_{n}']:.1f} ({100 * ls[f'matmul_fraction_{n}']:.0f}%)" for n in (BASE, CAND)}
    rows = [
        ("training, tokens/s", _n(tr[BASE]), _n(tr[CAND]), _x(tr["speedup"])),
        ("forward only (no_grad), tokens/s", _n(fw[BASE]), _n(fw[CAND]), _x(fw["speedup"])),
        (f"{cell} alone, forward+backward, tokens/s", _n(ls[BASE]), _n(ls[CAND]), _x(ls["speedup"])),
        (f"{cell} alone, forward+backward, GFLOP/s (% of matmul)", pct[BASE], pct[CAND], ""),
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
    machine = f"Machine: {machine_line(env)}."
    lines = [
        f"# lstm_ext benchmark: Shakespeare char-{cell}",
        "",
        f"{lab[BASE]} vs {lab[CAND]}, {m['dtype']}, on {cfg['device']}. {machine}",
    ]
    if env["gpu"]:
        lines.append(
            "TF32 off: torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False during the run, "
            "so float32 matmuls and cuDNN RNNs compute in float32. Times from CUDA events."
        )
    lines += [
        f"Embedding -> {cell} -> Linear, {m['shape']['layers']} layers of {m['shape']['hidden']}, vocabulary {res['vocab_size']}, "
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
            f"{machine} Matmul reference per row: a (4 hidden)^3 matmul in the same run and dtype.",
            "",
            f"| shape | dtype | training tokens/s {lab[BASE]} | {lab[CAND]} | training speed-up | forward speed-up | {cell} fwd+bwd speed-up "
            f"| {cell} fwd+bwd % of matmul, {lab[BASE]} / {lab[CAND]} | generation speed-up | generation vs {lab[CELLS]} | max loss diff |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in res["sweep"]:
            t, lstm, gen = s["train_tokens_per_s"], s["lstm_fwd_bwd_tokens_per_s"], s["generate_chars_per_s"]
            fractions = f"{lstm['matmul_fraction_baseline']:.0%} / {lstm['matmul_fraction_candidate']:.0%}"
            vs_cells = _x(gen["speedup_vs_cells"]) if "speedup_vs_cells" in gen else ""
            lines.append(
                f"| {Shape(**s['shape'])} | {s['dtype']} | {_n(t[BASE])} | {_n(t[CAND])} | {_x(t['speedup'])} | {_x(s['forward_tokens_per_s']['speedup'])} "
                f"| {_x(lstm['speedup'])} | {fractions} | {_x(gen['speedup'])} | {vs_cells} | {s['max_abs_loss_diff']:.1e} |"
            )
    if env["gemm"]:
        lines += ["", f"## {lab[CAND]}'s CPU GEMM per role and shape (m x k times k x n), chosen once per process", ""]
        if env.get("cpu_kernels"):
            lines += [f"CPU kernels: {env['cpu_kernels']} (LSTM_EXT_CPU_CAPABILITY)", ""]
        lines += [f"- {choice}" for choice in env["gemm"]]
    lines += ["", f"Sample from {lab[CAND]} (temperature 0.8):", "", "```", res["sample"].strip("\n"), "```", ""]
    return "\n".join(lines)


def figure(res: dict[str, Any], path: Path) -> None:
    """PNG: both loss curves, relative speed bars, and the sweep's training speed-ups if any."""
    lab, m, sweep = res["labels"], res["main"], res["sweep"]
    cell = cell_name(res["config"])
    panels = 3 if sweep else 2
    # One bar per sweep row: a long sweep (16 shapes x 3 dtypes) needs the height.
    fig = Figure(figsize=(6 * panels, max(4.5, 0.2 * len(sweep))), layout="constrained")
    axes = fig.subplots(1, panels)
    for name, style in ((BASE, "-"), (CAND, "--")):
        draw_losses(axes[0], {"train": m["losses"][name], "val": [[len(m["losses"][name]), m["val_loss"][name]]]}, lab[name], style)
    axes[0].set_title(f"training loss, same batches ({m['dtype']})")
    # The curves overlap, so their gap gets its own axis.
    gaps = [abs(a - b) for a, b in zip(m["losses"][BASE], m["losses"][CAND])]
    gap = axes[0].twinx()
    gap.plot(range(1, len(gaps) + 1), gaps, color="gray", lw=0.8)
    gap.set_ylim(0, 4 * max(gaps) or 1.0)  # keep it in the lower quarter, under the loss curves
    gap.set_ylabel("|difference| (gray)", color="gray")
    phases = {"training": "train_tokens_per_s", "forward": "forward_tokens_per_s", f"{cell} fwd+bwd": "lstm_fwd_bwd_tokens_per_s", "generation": "generate_chars_per_s"}
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
    if sweep:
        several_dtypes = len({s["dtype"] for s in sweep}) > 1
        axes[2].barh([_sweep_label(s, several_dtypes) for s in sweep], [s["train_tokens_per_s"]["speedup"] for s in sweep])
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
