"""silu_and_mul against a pure-torch fp32 reference, on CPU here and on CUDA where there is a GPU (there
also against the CPU kernel, with the output allocation poisoned so unwritten elements show): odd
widths, strided inputs (16-byte and scalar kernel paths), special values, opcheck, side streams and
CUDA graph capture."""

import pytest
import torch

import tidal
from conftest import DEVICES, assert_close, cuda_param, gpu_only, poison_cuda_allocator, to_device


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


def run_and_check(x: torch.Tensor, device: str) -> torch.Tensor:
    """silu_and_mul of x (built on the CPU) on `device`: against the reference, the input untouched,
    and on CUDA against the CPU kernel."""
    expected = ref_silu_and_mul(x)
    xd = to_device(x, device)
    if device == "cuda":
        poison_cuda_allocator(expected.numel() * expected.element_size())
    x_before = xd.clone()
    out = tidal.ops.silu_and_mul(xd)
    assert out.device == xd.device and out.shape == expected.shape and out.dtype == x.dtype and out.is_contiguous()
    assert_close(out, expected)
    torch.testing.assert_close(xd, x_before, atol=0, rtol=0)
    if device == "cuda":  # cross-backend: the GPU kernel equals the CPU kernel
        assert_close(out, tidal.ops.silu_and_mul(x))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("leading", LEADING, ids=str)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype, d, leading, device):
    out = run_and_check(randn(*leading, 2 * d, dtype=dtype, seed=d), device)
    assert out.shape == (*leading, d)


def strided_input(layout: str, d: int, dtype) -> torch.Tensor:
    if layout == "row_strided":  # a slice of a wider buffer: row stride > 2 * d, base offset by 3 elements
        return randn(9, 2 * d + 11, dtype=dtype)[:, 3:3 + 2 * d]
    if layout == "row_strided_aligned":  # row stride a multiple of 16 bytes: the GPU's vector path
        return randn(9, 2 * d + 64, dtype=dtype)[:, :2 * d]
    if layout == "transposed":  # last dim not contiguous: copied by the wrapper
        return randn(2 * d, 9, dtype=dtype).t()
    if layout == "3d_strided":  # leading dims that do not collapse into one stride
        return randn(9, 2, 2 * d, dtype=dtype).transpose(0, 1)
    raise AssertionError(layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["row_strided", cuda_param("row_strided_aligned", id="row_strided_aligned"),
                                    "transposed", "3d_strided"])
@pytest.mark.parametrize("d", [689, cuda_param(1024, id="1024")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_strided(dtype, d, layout, device):
    x = strided_input(layout, d, dtype)
    assert not x.is_contiguous()
    run_and_check(x, device)


def test_large_input_uses_threads_and_matches():
    x = randn(300, 2 * 1376, dtype=torch.float32, seed=5)  # above the kernel's parallel threshold
    assert_close(tidal.ops.silu_and_mul(x), ref_silu_and_mul(x))


@pytest.mark.parametrize("device", DEVICES)
def test_special_values(device):
    x = torch.tensor([[0.0, -1e4, 1e4, float("inf"), float("-inf"), float("nan"), 1.0, 2.0,
                       3.0, 3.0, 3.0, 2.0, 2.0, 2.0, 1.0, 1.0]])
    out = tidal.ops.silu_and_mul(x.to(device)).cpu()
    expected = ref_silu_and_mul(x)
    torch.testing.assert_close(out, expected, equal_nan=True, atol=1e-5, rtol=1e-5)
    assert torch.isnan(out[0, 5]) and torch.isinf(out[0, 3])


def _samples(device):
    return [
        (randn(4, 96, dtype=torch.float32, seed=1).to(device),),
        (randn(3, 41, 2 * 40, dtype=torch.bfloat16, seed=2)[:, 1:].to(device),),
        (randn(5, 2 * 7, dtype=torch.float16, seed=3).to(device),),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in _samples(device):
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


@gpu_only
def test_cuda_large_grid_side_stream_and_graph():
    """More vectors than the kernel's capped grid (the grid-stride loop), a side stream, and a CUDA
    graph replayed on new contents of its input."""
    x = randn(4096, 2 * 1376, dtype=torch.bfloat16, seed=7)  # 4096 x 172 16-byte vectors > 132 * 16 * 256
    run_and_check(x, "cuda")

    xd = randn(64, 2 * 688, dtype=torch.float16, seed=8).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # launched on torch's current stream, whatever it is
        out = tidal.ops.silu_and_mul(xd)
    torch.cuda.current_stream().wait_stream(side)
    assert_close(out, ref_silu_and_mul(xd.cpu()))

    static_x = torch.zeros_like(xd)
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        tidal.ops.silu_and_mul(static_x)
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = tidal.ops.silu_and_mul(static_x)
    for seed in (9, 10):
        new_x = randn(64, 2 * 688, dtype=torch.float16, seed=seed)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(static_out, ref_silu_and_mul(new_x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_matches_reference_autograd(device, dtype):
    """The backward against autograd through F.silu(gate) * up in float64."""
    x = randn(6, 2 * 37, dtype=dtype, seed=4).to(device).requires_grad_()
    g_out = randn(6, 37, dtype=dtype, seed=5).to(device)
    (grad,) = torch.autograd.grad(tidal.ops.silu_and_mul(x), x, g_out)
    xd = x.detach().double().requires_grad_()
    gate, up = xd.chunk(2, dim=-1)
    (want,) = torch.autograd.grad(torch.nn.functional.silu(gate) * up, xd, g_out.double())
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad.double(), want, **tol)
    assert grad.dtype == dtype


def test_gradcheck():
    x = randn(3, 2 * 5, dtype=torch.float32, seed=6).requires_grad_()
    assert torch.autograd.gradcheck(tidal.ops.silu_and_mul, (x,), eps=1e-3, atol=2e-3, rtol=1e-2)



def ref_silu_and_mul_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The input gradient through F.silu(gate) * up, in fp32 autograd, rounded to x's dtype."""
    xf = x.detach().float().requires_grad_()
    gate, up = xf.chunk(2, dim=-1)
    (want,) = torch.autograd.grad(torch.nn.functional.silu(gate) * up, xf, grad.float())
    return want.to(x.dtype)


def backward_inputs(layout: str, d: int, dtype, seed: int):
    """(x [.., 2 d], grad [.., d]) built on the CPU: contiguous, row-strided views, or 3-D."""
    if layout == "row_strided":
        return (randn(9, 2 * d + 8, dtype=dtype, seed=seed)[:, : 2 * d],
                randn(9, d + 3, dtype=dtype, seed=seed + 1, scale=1.0)[:, :d])
    if layout == "3d":
        return randn(2, 5, 2 * d, dtype=dtype, seed=seed), randn(2, 5, d, dtype=dtype, seed=seed + 1, scale=1.0)
    return randn(9, 2 * d, dtype=dtype, seed=seed), randn(9, d, dtype=dtype, seed=seed + 1, scale=1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "3d"])
@pytest.mark.parametrize("d", [1, 8, 689, 2048])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_kernel(dtype, d, layout, device):
    """The fused backward op against fp32 autograd (16-byte and scalar paths), on CUDA also against
    the CPU kernel."""
    x, grad = backward_inputs(layout, d, dtype, seed=7)
    xd, gd = to_device(x, device), to_device(grad, device)
    got = torch.ops.tidal.silu_and_mul_backward(gd, xd)
    assert got.shape == x.shape and got.dtype == dtype and got.device == xd.device
    assert_close(got, ref_silu_and_mul_backward(grad, x))
    if device == "cuda":
        assert_close(got, torch.ops.tidal.silu_and_mul_backward(grad, x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "3d"])
@pytest.mark.parametrize("d", [1, 689, 2048])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_recompute_equals_forward(dtype, d, layout, device):
    """silu_and_mul_backward(recompute=True): the same input gradient as without, and the forward's
    output bit for bit (the fused training MLP relies on it), 16-byte and scalar paths."""
    x, grad = backward_inputs(layout, d, dtype, seed=9)
    xd, gd = to_device(x, device), to_device(grad, device)
    if device == "cuda":
        poison_cuda_allocator(2 * x.numel() * x.element_size())
    grad_x, out = tidal.ops.silu_and_mul_backward(gd, xd, recompute=True)
    assert out.shape == grad.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, tidal.ops.silu_and_mul(xd), atol=0, rtol=0)
    torch.testing.assert_close(grad_x, torch.ops.tidal.silu_and_mul_backward(gd, xd), atol=0, rtol=0)
    assert tidal.ops.silu_and_mul_backward(gd, xd)[1] is None
    with torch.enable_grad():  # through the dispatcher
        got_x, got_out = tidal.ops.silu_and_mul_backward(gd, xd, recompute=True)
    torch.testing.assert_close(got_out, out, atol=0, rtol=0)
    torch.testing.assert_close(got_x, grad_x, atol=0, rtol=0)


def test_backward_recompute_opcheck_and_errors():
    x, grad = randn(3, 10, dtype=torch.float32, seed=1), randn(3, 5, dtype=torch.float32, seed=2)
    torch.library.opcheck(torch.ops.tidal.silu_and_mul_backward_recompute.default, (grad, x))
    with pytest.raises(ValueError, match=r"grad.shape=\(3, 4\) must be x.shape\[:-1\] \+ \(x.shape\[-1\] // 2,\) "
                                         r"= \(3, 5\)"):
        tidal.ops.silu_and_mul_backward(grad[:, :4], x, recompute=True)


def test_backward_kernel_empty_and_opcheck():
    assert torch.ops.tidal.silu_and_mul_backward(torch.empty(0, 4), torch.empty(0, 8)).shape == (0, 8)
    x, grad = randn(3, 10, dtype=torch.float32, seed=1), randn(3, 5, dtype=torch.float32, seed=2)
    torch.library.opcheck(torch.ops.tidal.silu_and_mul_backward.default, (grad, x))


def test_backward_native_errors_name_the_argument():
    from torch.utils.dlpack import to_dlpack

    from tidal import _core

    x, grad = torch.randn(4, 8), torch.randn(4, 4)
    with pytest.raises(ValueError, match=r"grad.shape=\[4, 3\] must be \[num_tokens, d\] = \[4, 4\]"):
        _core.ops.silu_and_mul_backward(to_dlpack(torch.empty(4, 8)), to_dlpack(torch.randn(4, 3)), to_dlpack(x), 0)
    with pytest.raises(ValueError, match=r"grad_x.shape=\[4, 6\] must equal x.shape=\[4, 8\]"):
        _core.ops.silu_and_mul_backward(to_dlpack(torch.empty(4, 6)), to_dlpack(grad), to_dlpack(x), 0)
    with pytest.raises(ValueError, match="grad.dtype=float16 must equal x.dtype=float32"):
        _core.ops.silu_and_mul_backward(to_dlpack(torch.empty(4, 8)), to_dlpack(grad.half()), to_dlpack(x), 0)
    with pytest.raises(ValueError, match="grad_x overlaps an input"):
        _core.ops.silu_and_mul_backward(to_dlpack(x), to_dlpack(grad), to_dlpack(x), 0)
    with pytest.raises(ValueError, match=r"out.shape=\[4, 3\] must equal grad.shape=\[4, 4\]"):
        _core.ops.silu_and_mul_backward(to_dlpack(torch.empty(4, 8)), to_dlpack(grad), to_dlpack(x), 0,
                                        to_dlpack(torch.empty(4, 3)))
    with pytest.raises(ValueError, match="out overlaps another argument"):
        _core.ops.silu_and_mul_backward(to_dlpack(torch.empty(4, 8)), to_dlpack(grad), to_dlpack(x), 0,
                                        to_dlpack(x[:, :4]))
