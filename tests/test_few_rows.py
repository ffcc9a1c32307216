"""GEMMs of one to four rows against an unpacked weight (generation: one sequence, one step
per call) run csrc/cpu/dot_gemm.h on CPU, in every dtype; five rows and more run the BLAS
(ATen's GEMM for half and bfloat16). Both, against torch's modules: outputs, states and,
where gradients flow, every gradient.

Sizes not a multiple of any vector width or of the kernel's weight-row blocks, and one
layer's weights above the 64 KiB a thread streams at least, so that two threads split them.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lstm_ext

# Half and bfloat16 round every stored value (their ulp at 1 is 1e-3 and 8e-3), and torch's
# modules sum in another order.
TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DTYPES = {"f32": torch.float32, "f64": torch.float64, "f16": torch.float16, "bf16": torch.bfloat16}
MODULES = {
    "lstm": (nn.LSTM, lstm_ext.LSTM, {}),
    "gru": (nn.GRU, lstm_ext.GRU, {}),
    "rnn_tanh": (nn.RNN, lstm_ext.RNN, {}),
}


def close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, rtol=TOL[dtype], atol=TOL[dtype] * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("cell", list(MODULES))
@pytest.mark.parametrize("I, H", [(19, 37), (70, 72)])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("N", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("layers", [1, 2])
def test_few_rows_match_torch(layers, N, T, I, H, cell, dtype):
    ref_cls, ext_cls, extra = MODULES[cell]
    ref = ref_cls(I, H, num_layers=layers, dtype=dtype, **extra)
    ext = ext_cls(I, H, num_layers=layers, dtype=dtype, **extra)
    ext.load_state_dict(ref.state_dict())
    x = torch.randn(T, N, I, dtype=dtype)
    h0 = torch.randn(layers, N, H, dtype=dtype)
    state = (h0, torch.randn_like(h0)) if cell == "lstm" else h0
    with torch.no_grad():  # the whole-stack inference op for two layers
        for i, (got, expected) in enumerate(zip(_flat(ext(x, state)), _flat(ref(x, state)))):
            close(got, expected, dtype, f"no_grad output {i}")
    results = {}
    for name, module in (("ref", ref), ("ext", ext)):
        leaf = x.clone().requires_grad_()
        outputs = _flat(module(leaf, state))
        sum((k + 1) * o.square().sum() for k, o in enumerate(outputs)).backward()
        results[name] = outputs + [leaf.grad] + [p.grad for p in module.parameters()]
    for i, (got, expected) in enumerate(zip(results["ext"], results["ref"])):
        close(got, expected, dtype, f"training output or gradient {i}")


def _flat(result) -> list[torch.Tensor]:
    y, state = result
    return [y, *(state if isinstance(state, tuple) else (state,))]
