"""rms_norm and fused_add_rms_norm against a pure-torch fp32 reference, on CPU here and on CUDA where
there is a GPU (also against the CPU kernel), with opcheck and gradients."""

import pytest
import torch

import tidal
from conftest import DEVICES, HAS_GPU, assert_close


def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return out.to(x.dtype)


def ref_fused_add_rms_norm(x, residual, weight, eps):
    residual_out = (x.float() + residual.float()).to(x.dtype)
    return ref_rms_norm(residual_out, weight, eps), residual_out


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HIDDEN_SIZES = [8, 768, 769, 5120, 5125]
NUM_TOKENS = [1, 7, 33]
LAYOUTS = ["contiguous", "row_strided", "transposed", "3d", "3d_strided"]


def make_input(layout: str, num_tokens: int, hidden: int, dtype, device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)

    if layout == "contiguous":
        return randn(num_tokens, hidden)
    if layout == "row_strided":  # a slice of a wider buffer: row stride > hidden
        return randn(num_tokens, hidden + 13)[:, :hidden]
    if layout == "transposed":  # last dim not contiguous
        return randn(hidden, num_tokens).t()
    if layout == "3d":
        return randn(2, num_tokens, hidden)
    if layout == "3d_strided":  # leading dims that do not collapse into one stride
        return randn(num_tokens, 2, hidden).transpose(0, 1)
    raise AssertionError(layout)


def make_weight(hidden, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (1 + 0.5 * torch.randn(hidden, generator=g)).to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype, num_tokens, hidden, layout, device):
    x = make_input(layout, num_tokens, hidden, dtype, device, seed=hidden + num_tokens)
    w = make_weight(hidden, dtype, device)
    x_before = x.clone()
    out = tidal.ops.rms_norm(x, w, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert_close(out, ref_rms_norm(x, w, 1e-6))
    torch.testing.assert_close(x, x_before, atol=0, rtol=0)  # input untouched
    if device == "cuda":  # cross-backend: the GPU kernel equals the CPU kernel
        assert_close(out, tidal.ops.rms_norm(x.cpu(), w.cpu(), 1e-6))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(dtype, hidden, layout, device):
    num_tokens = 9
    x = make_input(layout, num_tokens, hidden, dtype, device, seed=hidden)
    residual = make_input(layout, num_tokens, hidden, dtype, device, seed=hidden + 1)
    w = make_weight(hidden, dtype, device)
    out, residual_out = tidal.ops.fused_add_rms_norm(x, residual, w, 1e-5)
    ref_out, ref_residual = ref_fused_add_rms_norm(x, residual, w, 1e-5)
    torch.testing.assert_close(residual_out, ref_residual, atol=0, rtol=0)  # one rounding of x + r, exactly
    assert_close(out, ref_out)
    if device == "cuda":
        cpu_out, cpu_residual = tidal.ops.fused_add_rms_norm(x.cpu(), residual.cpu(), w.cpu(), 1e-5)
        torch.testing.assert_close(residual_out.cpu(), cpu_residual, atol=0, rtol=0)
        assert_close(out, cpu_out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "transposed", "3d_strided"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_in_place(dtype, layout, device):
    x = make_input(layout, 5, 769, dtype, device, seed=3)
    residual = make_input(layout, 5, 769, dtype, device, seed=4)
    w = make_weight(769, dtype, device)
    ref_out, ref_residual = ref_fused_add_rms_norm(x, residual, w, 1e-6)
    tidal.ops.fused_add_rms_norm_(x, residual, w, 1e-6)
    torch.testing.assert_close(residual, ref_residual, atol=0, rtol=0)
    assert_close(x, ref_out)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_single_element(device):
    w = make_weight(16, torch.float32, device)
    assert tidal.ops.rms_norm(torch.empty(0, 16, device=device), w).shape == (0, 16)
    out, res = tidal.ops.fused_add_rms_norm(torch.empty(0, 16, device=device), torch.empty(0, 16, device=device), w)
    assert out.shape == res.shape == (0, 16)
    x = torch.tensor([[3.0]], device=device)
    torch.testing.assert_close(tidal.ops.rms_norm(x, torch.tensor([2.0], device=device), 0.0),
                               torch.tensor([[2.0]], device=device))


def test_special_values_propagate():
    x = torch.tensor([[1.0, float("nan"), 2.0], [1.0, 2.0, 3.0], [float("inf"), 1.0, 1.0]])
    out = tidal.ops.rms_norm(x, torch.ones(3), 1e-6)
    assert torch.isnan(out[0]).all() and torch.isnan(out[2]).any()
    assert_close(out[1], ref_rms_norm(x[1:2], torch.ones(3), 1e-6)[0])


def _samples(device):
    x = make_input("contiguous", 4, 96, torch.float32, device, 0)
    xb = make_input("row_strided", 3, 40, torch.bfloat16, device, 1)
    return [
        (x, make_weight(96, torch.float32, device), 1e-6),
        (xb, make_weight(40, torch.bfloat16, device), 1e-5),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for x, w, eps in _samples(device):
        torch.library.opcheck(torch.ops.tidal.rms_norm.default, (x, w, eps))
        r = torch.randn_like(x)
        torch.library.opcheck(torch.ops.tidal.fused_add_rms_norm.default, (x, r, w, eps))
        torch.library.opcheck(torch.ops.tidal.fused_add_rms_norm_.default, (x.clone(), r.clone(), w, eps))
        xg, wg = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        torch.library.opcheck(torch.ops.tidal.rms_norm.default, (xg, wg, eps))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_reference_autograd(device):
    x = make_input("row_strided", 6, 67, torch.float32, device, 5).requires_grad_()
    r = make_input("contiguous", 6, 67, torch.float32, device, 6).requires_grad_()
    w = make_weight(67, torch.float32, device).requires_grad_()
    g_out, g_res = torch.randn(6, 67, device=device), torch.randn(6, 67, device=device)

    out = tidal.ops.rms_norm(x, w, 1e-5)
    grads = torch.autograd.grad(out, (x, w), g_out)
    ref = ref_rms_norm(x.double(), w.double(), 1e-5)
    ref_grads = torch.autograd.grad(ref, (x, w), g_out.double())
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-4)

    out, res = tidal.ops.fused_add_rms_norm(x, r, w, 1e-5)
    grads = torch.autograd.grad((out, res), (x, r, w), (g_out, g_res))
    ref_out, ref_res = ref_fused_add_rms_norm(x.double(), r.double(), w.double(), 1e-5)
    ref_grads = torch.autograd.grad((ref_out, ref_res), (x, r, w), (g_out.double(), g_res.double()))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-4)


def test_bad_arguments_name_the_argument():
    x, w = torch.randn(4, 8), torch.ones(8)
    with pytest.raises(ValueError, match=r"weight.shape=\(7,\)"):
        tidal.ops.rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="weight.dtype=torch.float16"):
        tidal.ops.rms_norm(x, w.half())
    with pytest.raises(ValueError, match="x.dtype=torch.int32"):
        tidal.ops.rms_norm(x.int(), w.int())
    with pytest.raises(ValueError, match="eps=-1"):
        tidal.ops.rms_norm(x, w, -1.0)
    with pytest.raises(ValueError, match=r"residual.shape=\(4, 9\)"):
        tidal.ops.fused_add_rms_norm(x, torch.randn(4, 9), w)
    with pytest.raises(ValueError, match="overlap"):
        tidal.ops.fused_add_rms_norm_(x, x, w)


def test_native_errors_name_the_argument():
    from torch.utils.dlpack import to_dlpack

    from tidal import _core

    x, w = torch.randn(4, 8), torch.ones(8)
    with pytest.raises(ValueError, match=r"x must be 2-D .* got shape \[32\]"):
        _core.ops.rms_norm(to_dlpack(torch.empty(32)), to_dlpack(x.view(-1)), to_dlpack(w), 1e-6, 0)
    with pytest.raises(ValueError, match=r"out.shape=\[4, 7\] must equal x.shape=\[4, 8\]"):
        _core.ops.rms_norm(to_dlpack(torch.empty(4, 7)), to_dlpack(x), to_dlpack(w), 1e-6, 0)
    with pytest.raises(ValueError, match=r"x.stride\(-1\)=4 must be 1"):
        _core.ops.rms_norm(to_dlpack(torch.empty(8, 4).t()), to_dlpack(torch.empty(8, 4).t()), to_dlpack(torch.ones(8)), 1e-6, 0)
    with pytest.raises(TypeError, match="weight must be an unused DLPack capsule"):
        _core.ops.rms_norm(to_dlpack(x), to_dlpack(x), w, 1e-6, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_streams_graphs_and_devices():
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = make_weight(4096, torch.bfloat16, "cuda")
    ref_out, ref_res = ref_fused_add_rms_norm(x, r, w, 1e-6)

    side = torch.cuda.Stream()  # launched on torch's current stream, whatever it is
    with torch.cuda.stream(side):
        out, res = tidal.ops.fused_add_rms_norm(x, r, w, 1e-6)
    torch.cuda.current_stream().wait_stream(side)
    assert_close(out, ref_out)

    static_x, static_r = x.clone(), r.clone()
    graph = torch.cuda.CUDAGraph()
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        tidal.ops.fused_add_rms_norm_(static_x.clone(), static_r.clone(), w, 1e-6)
    torch.cuda.current_stream().wait_stream(warm)
    with torch.cuda.graph(graph):
        tidal.ops.fused_add_rms_norm_(static_x, static_r, w, 1e-6)
    static_x.copy_(x)
    static_r.copy_(r)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_r, ref_res, atol=0, rtol=0)
    assert_close(static_x, ref_out)

    with pytest.raises(ValueError, match="weight is on cpu"):
        tidal.ops.rms_norm(x, w.cpu())
    if torch.cuda.device_count() > 1:  # the kernel runs on the tensors' device, not the current one
        x1, w1 = x.to("cuda:1"), w.to("cuda:1")
        assert_close(tidal.ops.rms_norm(x1, w1), ref_rms_norm(x, w, 1e-6))


def ref_rms_norm_backward(grad, x, weight, eps):
    """grad_x (x's dtype) and grad_weight (fp32) through the fp32 reference forward."""
    xf = x.detach().float().requires_grad_()
    wf = weight.detach().float().requires_grad_()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * wf
    gx, gw = torch.autograd.grad(out, (xf, wf), grad.float())
    return gx.to(x.dtype), gw


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "3d"])
@pytest.mark.parametrize("hidden", [8, 769, 2048, 5125])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_kernel(dtype, hidden, layout, device):
    """The fused backward op against fp32 autograd (16-byte and scalar paths, weight gradient summed
    over parts), on CUDA also against the CPU kernel."""
    x = make_input(layout, 33, hidden, dtype, "cpu", 11)
    grad = make_input("contiguous" if layout != "3d" else "3d", 33, hidden, dtype, "cpu", 12)
    w = make_weight(hidden, dtype, "cpu")
    want_x, want_w = ref_rms_norm_backward(grad, x, w, 1e-5)
    got_x, got_w = torch.ops.tidal.rms_norm_backward(grad.to(device), x.to(device), w.to(device), 1e-5)
    assert got_x.dtype == dtype and got_w.dtype == torch.float32 and got_x.shape == x.shape
    assert_close(got_x, want_x)
    rows = x.numel() // hidden
    torch.testing.assert_close(got_w.cpu(), want_w, atol=1e-3 * rows ** 0.5, rtol=2e-3)
    if device == "cuda":
        cpu_x, cpu_w = torch.ops.tidal.rms_norm_backward(grad, x, w, 1e-5)
        assert_close(got_x, cpu_x)
        torch.testing.assert_close(got_w.cpu(), cpu_w, atol=1e-3 * rows ** 0.5, rtol=2e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("parts", [1, 3, 8, 40])
def test_backward_native_parts(parts, device):
    """Any number of parts, more than rows included: the partials sum to the weight gradient and
    parts without rows are zero."""
    from tidal.ops._lib import capsule

    x = make_input("contiguous", 8, 64, torch.float32, device, 3)
    grad, w = make_input("contiguous", 8, 64, torch.float32, device, 4), make_weight(64, torch.float32, device)
    grad_x = torch.empty_like(x)
    partial = torch.full((parts, 64), float("nan"), device=device)
    tidal._core.ops.rms_norm_backward(capsule(grad_x), capsule(partial), capsule(grad), capsule(x), capsule(w), 1e-5,
                                      tidal.ops._lib.stream_of(x))
    want_x, want_w = ref_rms_norm_backward(grad.cpu(), x.cpu(), w.cpu(), 1e-5)
    torch.testing.assert_close(grad_x.cpu(), want_x, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(partial.sum(0).cpu(), want_w, atol=1e-4, rtol=1e-4)
    empty = [p for p in range(parts) if p * 8 // parts == (p + 1) * 8 // parts]  # part p: rows [p T / P, (p + 1) T / P)
    assert len(empty) == max(0, parts - 8)
    assert (partial[empty] == 0).all()  # parts without rows are zero-filled, not left unset
    assert not partial.isnan().any()


def test_backward_kernel_empty_and_opcheck():
    got_x, got_w = torch.ops.tidal.rms_norm_backward(torch.empty(0, 6), torch.empty(0, 6), torch.ones(6), 1e-6)
    assert got_x.shape == (0, 6) and torch.equal(got_w, torch.zeros(6))
    for x, w, eps in _samples("cpu"):
        torch.library.opcheck(torch.ops.tidal.rms_norm_backward.default, (torch.randn_like(x), x, w, eps))


def test_backward_native_errors_name_the_argument():
    from torch.utils.dlpack import to_dlpack

    from tidal import _core

    x, w = torch.randn(4, 8), torch.ones(8)
    args = lambda partial, grad=x: (to_dlpack(torch.empty(4, 8)), to_dlpack(partial), to_dlpack(grad.clone()),
                                    to_dlpack(x), to_dlpack(w), 1e-6, 0)
    with pytest.raises(ValueError, match=r"grad_weight_partial.shape=\[2, 7\] must be \[num_parts >= 1, hidden_size=8\]"):
        _core.ops.rms_norm_backward(*args(torch.empty(2, 7)))
    with pytest.raises(ValueError, match="grad_weight_partial.dtype=float16 must be float32"):
        _core.ops.rms_norm_backward(*args(torch.empty(2, 8, dtype=torch.float16)))
    with pytest.raises(ValueError, match=r"grad.shape=\[4, 9\] must equal x.shape=\[4, 8\]"):
        _core.ops.rms_norm_backward(*args(torch.empty(2, 8), torch.randn(4, 9)))
