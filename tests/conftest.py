"""Shared test helpers: the device parameter (GPU cases skip cleanly without a GPU) and per-dtype
tolerances written once."""

import pytest
import torch

import tidal

HAS_GPU = torch.cuda.is_available() and tidal.build_info()["cuda"]

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu,
                                          pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and a CUDA build")]),
]

# (atol, rtol) against an fp32 reference rounded once to the dtype: a kernel may differ by one
# rounding of the output (bf16: 2^-8 relative, fp16: 2^-11) plus fp32 summation order.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (8e-3, 1.6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol)
