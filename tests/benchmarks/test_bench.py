"""benchmarks/bench.py: runs end to end, writes its reports naming the machine, and both models learn alike."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

from bench import main
from config import QUICK, BenchConfig, Shape, dtype_setup, parse_dtypes, parse_sweep
from protocol import BASE, CAND, CELLS, LSTMCellStack, compare, lstm_forward_flops, run_bench
from timing import cpu_model, tf32_disabled

PHASES = ("train_tokens_per_s", "forward_tokens_per_s", "lstm_fwd_bwd_tokens_per_s", "generate_chars_per_s")


def check_reports(out: Path, steps: int, tolerance: float) -> dict[str, Any]:
    """The three files exist and agree, name the CPU; the loss curves match within ``tolerance``."""
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text(encoding="utf-8")
    assert res["environment"]["cpu"] == cpu_model() and f"CPU {cpu_model()}" in md
    main = res["main"]
    losses = main["losses"]
    assert len(losses[BASE]) == len(losses[CAND]) == steps
    diff = max(abs(a - b) for a, b in zip(losses[BASE], losses[CAND]))
    assert diff == main["max_abs_loss_diff"] <= tolerance
    assert abs(main["val_loss"][BASE] - main["val_loss"][CAND]) <= tolerance
    assert abs(main["tail_mean_loss"][BASE] - main["tail_mean_loss"][CAND]) <= tolerance
    for phase in PHASES:
        figures = main[phase]
        assert figures[BASE] > 0 and figures[CAND] > 0 and figures["speedup"] > 0
        assert f"{figures['speedup']:.2f}x" in md
    assert main["matmul_gflops"] > 0 and main["memory"]["saved_mib"][CAND] > 0
    assert res["sample"].strip() and res["sample"].strip().split("\n")[0] in md
    return res


def test_bench_script_quick_end_to_end(tmp_path: Path, run_bench_script: Callable) -> None:
    proc = run_bench_script("--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = check_reports(tmp_path, QUICK["steps"], tolerance=1e-3)
    assert res["labels"][CAND] == "lstm_ext.LSTM" and CELLS in res["main"]["generate_chars_per_s"]
    assert "| training, tokens/s |" in proc.stdout and f"CPU {cpu_model()}" in proc.stdout
    assert res["environment"]["gpu"] is None and not res["environment"]["tf32"]


def test_bench_extras_packed_projection_float64_sweep(tmp_path: Path, text_file: Path) -> None:
    argv = ["--quick", "--data", str(text_file), "--packed", "--proj-size", "8", "--dtype", "float64",
            "--sweep", "4x8x16x1,8x4x12x2", "--out", str(tmp_path)]
    assert main(argv) == 0
    res = check_reports(tmp_path, QUICK["steps"], tolerance=1e-9)
    assert [s["shape"] for s in res["sweep"]] == [{"batch": 4, "seq": 8, "hidden": 16, "layers": 1}, {"batch": 8, "seq": 4, "hidden": 12, "layers": 2}]
    assert {s["dtype"] for s in res["sweep"]} == {"float64"}
    assert CELLS not in res["main"]["generate_chars_per_s"]  # nn.LSTMCell has no projection
    # Sequences of 8 steps pack the weights: the report names the GEMM of each role.
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert res["environment"]["gemm"] and all(f"- {choice}" in md for choice in res["environment"]["gemm"])
    assert f"CPU kernels: {res['environment']['cpu_kernels']} " in md


def test_dtypes_run_every_sweep_shape_in_each(tmp_path: Path, text_file: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--quick", "--data", str(text_file), "--steps", "4", "--sweep-steps", "3", "--sweep", "4x8x16x1", "--dtypes", "float32,bfloat16", "--out", str(tmp_path)]
    assert main(argv) == 0
    res = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert res["main"]["dtype"] == "float32" and [s["dtype"] for s in res["sweep"]] == ["float32", "bfloat16"]
    assert "| B=4 T=8 H=16 L=1 | bfloat16 |" in capsys.readouterr().out


def test_autocast_dtype_runs_float32_models_in_bfloat16(tmp_path: Path, text_file: Path) -> None:
    argv = ["--quick", "--data", str(text_file), "--steps", "4", "--sweep-steps", "3", "--sweep", "4x8x16x1",
            "--dtypes", "float32,autocast-bfloat16", "--out", str(tmp_path)]
    assert main(argv) == 0
    res = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert [s["dtype"] for s in res["sweep"]] == ["float32", "autocast-bfloat16"]
    # Float32 models under autocast: lstm_ext's op ran in bfloat16 (8 steps: prepared weights).
    assert any(" bfloat16 m=" in line for line in res["environment"]["gemm"]), res["environment"]["gemm"]
    assert parse_dtypes("autocast-bfloat16") == ["autocast-bfloat16"]
    assert dtype_setup("autocast-bfloat16") == (torch.float32, torch.bfloat16)
    assert dtype_setup("bfloat16") == (torch.bfloat16, None)


def test_dtypes_without_sweep_sweep_the_main_shape() -> None:
    cfg = BenchConfig(dtypes="bfloat16,float16")
    assert cfg.sweep_shapes() == [cfg.main_shape()] and cfg.sweep_dtypes() == ["bfloat16", "float16"]
    assert BenchConfig().sweep_shapes() == [] and BenchConfig(dtype="float64").sweep_dtypes() == ["float64"]
    assert parse_dtypes(" float32, float16") == ["float32", "float16"]
    for bad in ("float32,float32", "float32,int8", ","):
        with pytest.raises(ValueError):
            parse_dtypes(bad)


def test_bad_options_are_usage_errors(capsys: pytest.CaptureFixture) -> None:
    for argv in (["--dtypes", "float32,int8"], ["--dtype", "float32", "--dtypes", "float16"], ["--sweep", "2x3"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cuda_without_gpu_is_a_one_line_error_before_any_work(tmp_path: Path, run_bench_script: Callable) -> None:
    out = tmp_path / "out"
    proc = run_bench_script("--device", "cuda", "--sweep", "gpu", "--dtypes", "float32,bfloat16,float16", "--out", str(out))
    # A usage error from the shared --device option: argparse's usage, then one error line.
    assert proc.returncode == 2 and not out.exists() and not proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("usage: ") and "Traceback" not in proc.stderr
    assert lines[-1].startswith("bench.py: error: argument --device: device 'cuda' is not available")


def test_nn_lstm_against_itself_learns_identically(tmp_path: Path, text_file: Path) -> None:
    res = run_bench(BenchConfig(impl="torch", data=str(text_file), out=str(tmp_path), **QUICK, quick=True))
    assert res["main"]["max_abs_loss_diff"] == 0.0 and res["labels"][CAND] == "nn.LSTM (again)"


def test_sweep_presets_and_shapes() -> None:
    assert len(parse_sweep("charrnn")) == 9 and len(parse_sweep("all")) == 13
    assert Shape(32, 100, 512, 2) in parse_sweep("issue5")
    gpu = parse_sweep("gpu")
    assert len(set(gpu)) == 16 and {(s.seq, s.layers) for s in gpu} == {(100, 2)}
    assert {s.batch for s in gpu} == {1, 8, 64, 256} and {s.hidden for s in gpu} == {128, 256, 512, 1024}
    assert parse_sweep("issue5,2x3x4x5")[-1] == Shape(2, 3, 4, 5)
    with pytest.raises(ValueError, match="BxTxHxL"):
        parse_sweep("2x3")


def test_tf32_is_off_inside_and_restored_after() -> None:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with tf32_disabled():
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_lstm_cell_stack_equals_nn_lstm() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 7, 3)
    x, h0, c0 = torch.randn(4, 2, 5), torch.randn(3, 2, 7), torch.randn(3, 2, 7)
    want, (hn, cn) = lstm(x, (h0, c0))
    got, (gh, gc) = LSTMCellStack(lstm)(x, (h0, c0))
    for a, b in ((want, got), (hn, gh), (cn, gc)):
        torch.testing.assert_close(a, b)


def test_flop_count_and_paired_speedups() -> None:
    # One layer, I = H = 2: 2 * 4H * (I + H) = 64 per token; a 3-wide projection adds 2*H*P = 12.
    assert lstm_forward_flops(1, Shape(1, 1, 2, 1), 0) == 64
    assert lstm_forward_flops(10, Shape(1, 1, 2, 2), 3) == 10 * ((2 * 8 * (2 + 3) + 12) + (2 * 8 * (3 + 3) + 12))
    times = {BASE: [9.0, 2.0, 2.0, 2.0], CAND: [9.0, 1.0, 1.0, 4.0], CELLS: [9.0, 4.0, 4.0, 4.0]}
    out = compare(times, [8, 8, 8, 8], warmup=1)
    assert out[BASE] == 4.0 and out[CAND] == 8.0 and out[CELLS] == 2.0
    assert out["speedup"] == 2.0 and out["speedup_vs_cells"] == 4.0 and out["cells_vs_baseline"] == 0.5


def test_cell_gru_and_rnn_measure_lstm_ext_against_nn_gru_and_nn_rnn(tmp_path: Path, text_file: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    # Needs lstm_ext.GRU and lstm_ext.RNN.
    for cell, name in (("gru", "GRU"), ("rnn", "RNN")):
        out = tmp_path / cell
        argv = ["--quick", "--data", str(text_file), "--cell", cell, "--steps", "4", "--sweep", "4x8x16x1", "--sweep-steps", "3", "--out", str(out)]
        assert main(argv) == 0
        res = json.loads((out / "results.json").read_text(encoding="utf-8"))
        assert res["config"]["cell"] == cell and res["labels"][BASE] == f"nn.{name}" and res["labels"][CAND] == f"lstm_ext.{name}"
        assert len(res["main"]["losses"][CAND]) == 4 and res["main"]["max_abs_loss_diff"] < 1e-3
        assert CELLS not in res["main"]["generate_chars_per_s"]  # the nn.LSTMCell loop is the LSTM's only
        assert [s["shape"]["hidden"] for s in res["sweep"]] == [16] and res["sweep"][0]["train_tokens_per_s"]["speedup"] > 0
        md = (out / "results.md").read_text(encoding="utf-8")
        assert f"# lstm_ext benchmark: Shakespeare char-{name}" in md and f"| {name} alone, forward+backward, tokens/s |" in md
        assert "| training, tokens/s |" in capsys.readouterr().out


def test_cell_all_runs_each_cell_into_its_directory(tmp_path: Path, text_file: Path) -> None:
    argv = ["--quick", "--impl", "torch", "--data", str(text_file), "--cell", "all", "--steps", "3", "--out", str(tmp_path)]
    assert main(argv) == 0
    for cell, name in (("lstm", "LSTM"), ("gru", "GRU"), ("rnn", "RNN")):
        res = json.loads((tmp_path / cell / "results.json").read_text(encoding="utf-8"))
        assert res["config"]["cell"] == cell and res["labels"][CAND] == f"nn.{name} (again)"
        assert res["main"]["max_abs_loss_diff"] == 0.0


def test_cell_option_is_checked(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--cell", "lstmx"])
    assert exc.value.code == 2 and "argument --cell: invalid choice" in capsys.readouterr().err
    assert main(["--quick", "--cell", "gru", "--proj-size", "4", "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err == "error: --proj-size is an LSTM option; --cell gru has none\n"
    assert not (tmp_path / "x").exists()
    assert BenchConfig().cell == "lstm"


def test_flop_count_of_gru_and_rnn() -> None:
    # One layer, I = H = 2: 2 * G*H * (I + H) per token, G = 3 gates for the GRU, 1 for the RNN.
    assert lstm_forward_flops(1, Shape(1, 1, 2, 1), 0, "gru") == 48
    assert lstm_forward_flops(1, Shape(1, 1, 2, 1), 0, "rnn") == 16
