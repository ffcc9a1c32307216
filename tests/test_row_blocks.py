"""Where a step's GEMM is small, the CPU forward and backward run blocks of the batch's rows
through their time loop apart, one block per thread (CpuBackend::for_each_row_block);
inference so runs each block of steps. Against torch's modules, every output and gradient:
batches that split unevenly, packed sequences whose batch shrinks past the split (rows
leave one block before the other), projections, both directions, every cell, float32 and
float64; and bfloat16 split against unsplit.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_ext

TOL = {torch.float32: 2e-5, torch.float64: 1e-10}
MODULES = {
    "lstm": (nn.LSTM, lstm_ext.LSTM, {}),
    "lstm_proj": (nn.LSTM, lstm_ext.LSTM, {"proj_size": 7}),
    "gru": (nn.GRU, lstm_ext.GRU, {}),
    "rnn_relu": (nn.RNN, lstm_ext.RNN, {"nonlinearity": "relu"}),
}


def close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, rtol=TOL[dtype], atol=TOL[dtype] * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread: the rows are never split")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cell", list(MODULES))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_row_blocks_match_torch(bidirectional, packed, cell, dtype):
    ref_cls, ext_cls, extra = MODULES[cell]
    I, H, T = 6, 16, 9
    lengths = [9, 9, 8, 8, 7, 6, 6, 5, 4, 3, 3, 2, 1]  # 13 rows: blocks of 6 and 7
    ref = ref_cls(I, H, num_layers=2, bidirectional=bidirectional, dtype=dtype, **extra)
    ext = ext_cls(I, H, num_layers=2, bidirectional=bidirectional, dtype=dtype, **extra)
    ext.load_state_dict(ref.state_dict())
    x = torch.randn(T, len(lengths), I, dtype=dtype)
    results = {}
    for name, module in (("ref", ref), ("ext", ext)):
        leaf = x.clone().requires_grad_()
        y, state = module(pack_padded_sequence(leaf, lengths) if packed else leaf)
        states = state if isinstance(state, tuple) else (state,)
        y = y.data if packed else y
        (y.square().sum() + sum((k + 1) * s.square().sum() for k, s in enumerate(states))).backward()
        results[name] = [y, *states, leaf.grad] + [p.grad for p in module.parameters()]
    for i, (got, expected) in enumerate(zip(results["ext"], results["ref"])):
        close(got, expected, dtype, f"output or gradient {i}")


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread: the rows are never split")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cell", list(MODULES))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize(
    "layers, bidirectional, T",
    [(1, False, 9), (3, False, 9), (2, True, 9), (1, False, 400)],
    ids=["one_layer", "three_layers", "bi", "long"],
)
def test_inference_row_blocks_match_torch(layers, bidirectional, T, packed, cell, dtype):
    # Under no_grad the layers run one at a time here (one layer; three on two threads,
    # which do not overlap; both directions), each projecting its inputs by blocks of steps
    # (T=400: several) and splitting each block's steps by rows.
    ref_cls, ext_cls, extra = MODULES[cell]
    lengths = [max(1, T - i * (T // 9)) for i in range(13)]  # 13 rows: blocks of 6 and 7
    ref = ref_cls(6, 16, num_layers=layers, bidirectional=bidirectional, dtype=dtype, **extra)
    ext = ext_cls(6, 16, num_layers=layers, bidirectional=bidirectional, dtype=dtype, **extra)
    ext.load_state_dict(ref.state_dict())
    x = torch.randn(T, len(lengths), 6, dtype=dtype)
    results = {}
    with torch.no_grad():
        for name, module in (("ref", ref), ("ext", ext)):
            y, state = module(pack_padded_sequence(x, lengths) if packed else x)
            results[name] = [y.data if packed else y, *(state if isinstance(state, tuple) else (state,))]
    for i, (got, expected) in enumerate(zip(results["ext"], results["ref"])):
        close(got, expected, dtype, f"output or state {i}")


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread: the rows are never split")
@pytest.mark.parametrize("cell", list(MODULES))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_bfloat16_row_blocks_equal_one_thread(packed, cell):
    # bfloat16 splits its rows where its microkernel runs. Each output element
    # sums the same products in the same order either way, so two threads (blocks of 6 and 7
    # rows) must give one thread's results bit for bit.
    _, ext_cls, extra = MODULES[cell]
    lengths = [9, 9, 8, 8, 7, 6, 6, 5, 4, 3, 3, 2, 1]
    ext = ext_cls(6, 16, num_layers=2, bidirectional=True, dtype=torch.bfloat16, **extra)
    x = torch.randn(9, len(lengths), 6, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            leaf = x.clone().requires_grad_()
            y, state = ext(pack_padded_sequence(leaf, lengths) if packed else leaf)
            states = state if isinstance(state, tuple) else (state,)
            y = y.data if packed else y
            (y.float().square().sum() + sum((k + 1) * s.float().sum() for k, s in enumerate(states))).backward()
            results.append([y, *states, leaf.grad] + [p.grad for p in ext.parameters()])
            ext.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    recurrent = [line for line in torch.ops.lstm_ext.gemm_choices().splitlines()
                 if line.startswith(f"recurrent bfloat16 m={len(lengths)} ")]
    if not recurrent or not all(": microkernel (" in line for line in recurrent):
        pytest.skip("bfloat16 runs on ATen's GEMM here: its rows are not split")
    for i, (got, expected) in enumerate(zip(results[1], results[0])):
        assert torch.equal(got, expected), f"output or gradient {i}"
