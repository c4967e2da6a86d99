"""silu_and_mul against a pure-torch fp32 reference on CPU; on CUDA (where there is a GPU) the op
raises the core's "no CUDA kernel yet" error until the GPU kernel lands."""

import pytest
import torch

import tidal
from conftest import DEVICES, assert_close


def ref_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    xf = x.float()
    return (torch.nn.functional.silu(xf[..., :d]) * xf[..., d:]).to(x.dtype)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DS = [1, 8, 688, 689, 2048]
LEADING = [(1,), (7,), (3, 5), (0,)]


def randn(*shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype)


@pytest.mark.parametrize("leading", LEADING, ids=str)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype, d, leading):
    x = randn(*leading, 2 * d, dtype=dtype, seed=d)
    x_before = x.clone()
    out = tidal.ops.silu_and_mul(x)
    assert out.shape == (*leading, d) and out.dtype == dtype and out.is_contiguous()
    assert_close(out, ref_silu_and_mul(x))
    torch.testing.assert_close(x, x_before, atol=0, rtol=0)


@pytest.mark.parametrize("layout", ["row_strided", "transposed", "3d_strided"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_strided(dtype, layout):
    d = 689
    if layout == "row_strided":  # a slice of a wider buffer: row stride > 2 * d
        x = randn(9, 2 * d + 11, dtype=dtype)[:, 3:3 + 2 * d]
    elif layout == "transposed":  # last dim not contiguous: copied by the wrapper
        x = randn(2 * d, 9, dtype=dtype).t()
    else:  # leading dims that do not collapse into one stride
        x = randn(9, 2, 2 * d, dtype=dtype).transpose(0, 1)
    assert not x.is_contiguous()
    assert_close(tidal.ops.silu_and_mul(x), ref_silu_and_mul(x))


def test_large_input_uses_threads_and_matches():
    x = randn(300, 2 * 1376, dtype=torch.float32, seed=5)  # above the kernel's parallel threshold
    assert_close(tidal.ops.silu_and_mul(x), ref_silu_and_mul(x))


def test_special_values():
    x = torch.tensor([[0.0, -1e4, 1e4, float("inf"), float("-inf"), float("nan"), 1.0, 2.0,
                       3.0, 3.0, 3.0, 2.0, 2.0, 2.0, 1.0, 1.0]])
    out = tidal.ops.silu_and_mul(x)
    expected = ref_silu_and_mul(x)
    torch.testing.assert_close(out, expected, equal_nan=True, atol=1e-5, rtol=1e-5)
    assert torch.isnan(out[0, 5]) and torch.isinf(out[0, 3])


def _samples(device):
    return [
        (randn(4, 96, dtype=torch.float32, seed=1).to(device),),
        (randn(3, 41, 2 * 40, dtype=torch.bfloat16, seed=2)[:, 1:].to(device),),
        (randn(5, 2 * 7, dtype=torch.float16, seed=3).to(device),),
    ]


def test_opcheck():
    for args in _samples("cpu"):
        torch.library.opcheck(torch.ops.tidal.silu_and_mul.default, args)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=7 must be even"):
        tidal.ops.silu_and_mul(torch.randn(2, 7))
    with pytest.raises(ValueError, match="x.dtype=torch.int32"):
        tidal.ops.silu_and_mul(torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="0-d"):
        tidal.ops.silu_and_mul(torch.tensor(1.0))


def test_native_errors_name_the_argument():
    from torch.utils.dlpack import to_dlpack

    from tidal import _core

    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"out.shape=\[4, 3\] must be \[num_tokens, d\] = \[4, 4\]"):
        _core.ops.silu_and_mul(to_dlpack(torch.empty(4, 3)), to_dlpack(x), 0)
    with pytest.raises(ValueError, match=r"x.shape\[1\]=7 must be even"):
        _core.ops.silu_and_mul(to_dlpack(torch.empty(4, 3)), to_dlpack(torch.randn(4, 7)), 0)
    with pytest.raises(ValueError, match="out overlaps x"):
        _core.ops.silu_and_mul(to_dlpack(x[:, :4]), to_dlpack(x), 0)
    with pytest.raises(ValueError, match="out.dtype=float16 must be float32"):
        _core.ops.silu_and_mul(to_dlpack(torch.empty(4, 4, dtype=torch.float16)), to_dlpack(x), 0)


@pytest.mark.parametrize("device", [p for p in DEVICES if p.id == "cuda"])
def test_cuda_has_no_kernel_yet(device):
    x = torch.randn(4, 16, device=device)
    with pytest.raises(RuntimeError, match="silu_and_mul: no CUDA kernel yet; run on the CPU"):
        tidal.ops.silu_and_mul(x)
