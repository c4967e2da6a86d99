"""Shared test helpers: the device parameter (GPU cases skip cleanly without a GPU) and per-dtype
tolerances written once."""

import pytest
import torch

import tidal

HAS_GPU = torch.cuda.is_available() and tidal.build_info()["cuda"]

# The marks of a GPU case: selected by ``-m gpu``, skipped cleanly where there is no GPU (CI).
GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and a CUDA build")]

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=GPU_MARKS),
]


def gpu_only(fn):
    """Decorates a test that runs on CUDA alone (it skips cleanly without a GPU)."""
    for mark in GPU_MARKS:
        fn = mark(fn)
    return fn


def cuda_param(*values, id=None):
    """A parameter set that only runs on CUDA: GPU-specific sizes next to the CPU ones, without
    adding CPU cases."""
    return pytest.param(*values, id=id, marks=GPU_MARKS)


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """A copy of x on `device` (the CPU too) with x's shape, strides and storage offset: a view of a copy
    of its whole storage, so a strided or misaligned view stays one there (``x.to(device)`` would make
    it contiguous)."""
    storage = torch.as_strided(x, (x.untyped_storage().nbytes() // x.element_size(),), (1,), 0)
    return storage.to(device, copy=True).as_strided(x.shape, x.stride(), x.storage_offset())


def poison_cuda_allocator(nbytes: int) -> None:
    """Leaves a freed block of ``nbytes`` of 0xFF bytes (NaN in float32, float16 and bfloat16) in the
    caching allocator, so the output the next op allocates most likely lands on it and any element
    the kernel fails to write shows up as NaN. Best effort: the allocator may pick another block."""
    torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device="cuda").fill_(0xFF)

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
