"""skinny_linear (a linear layer over a few rows with rms_norm or silu_and_mul before it and the
residual add after it) against a pure-torch fp32 reference: on the CPU (the unfused ops) here, and on
CUDA where there is a GPU, there with the fused kernel asserted to run for the shapes it takes, the
output poisoned before each run, and against the CPU result. Every dtype, 1 to 4 rows (and 5 to 9:
the unfused path), odd output counts, widths that end mid-vector (the unfused path), bias, out in fp32,
and CUDA graph capture."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import tidal
from conftest import DEVICES, TOLERANCES, gpu_only, poison_cuda_allocator
from tidal.ops._lib import capsule, native, stream_of

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PROLOGUES = ["identity", "rms_norm", "silu_and_mul"]


def randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype)


def make(m, n, k, dtype, prologue, bias, seed=0):
    x = randn(m, 2 * k if prologue == "silu_and_mul" else k, dtype=dtype, seed=seed, scale=2.0)
    w = randn(n, k, dtype=dtype, seed=seed + 1, scale=k ** -0.5)
    b = randn(n, dtype=dtype, seed=seed + 2) if bias else None
    nw = randn(k, dtype=dtype, seed=seed + 3) if prologue == "rms_norm" else None
    return x, w, b, nw


def reference(x, w, b, nw, prologue, eps=1e-6, residual=None):
    """fp32 math; f(x) rounded to the dtype as rms_norm / silu_and_mul round; the sum rounded once."""
    xf = x.float()
    if prologue == "rms_norm":
        h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * nw.float()).to(x.dtype)
    elif prologue == "silu_and_mul":
        k = x.shape[1] // 2
        h = (F.silu(xf[:, :k]) * xf[:, k:]).to(x.dtype)
    else:
        h = x
    y = h.float() @ w.float().t() + (0.0 if b is None else b.float())
    return y if residual is None else residual.float() + y


def kwargs_for(prologue, nw):
    return dict(norm_weight=nw, eps=1e-6, gated=prologue == "silu_and_mul")


def tolerance(dtype, k):
    atol, rtol = TOLERANCES[dtype]
    return atol * max(1.0, k ** 0.5 / 8), rtol  # fp32 sums of k products in another order


def fused_runs(x, w, b, nw, prologue, out) -> bool:
    """Whether the fused kernel takes these tensors (it writes out when it does)."""
    opt = lambda t: None if t is None else capsule(t)  # noqa: E731
    return native.skinny_linear(capsule(out), None, capsule(x), capsule(w), opt(b), opt(nw),
                                PROLOGUES.index(prologue), 1e-6, stream_of(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prologue", PROLOGUES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (3, 37, 200), (8, 300, 1024), (5, 129, 1000), (2, 16, 36), (9, 40, 64)])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_out(m, n, k, dtype, prologue, bias, device):
    x, w, b, nw = make(m, n, k, dtype, prologue, bias, seed=m + n + k)
    expected = reference(x, w, b, nw, prologue)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    if device == "cuda":
        poison_cuda_allocator(m * n * x.element_size())
    out = tidal.ops.skinny_linear(dev(x), dev(w), dev(b), **kwargs_for(prologue, dev(nw)))
    assert out.shape == (m, n) and out.dtype == dtype and out.device.type == device
    atol, rtol = tolerance(dtype, k)
    torch.testing.assert_close(out.float().cpu(), expected.to(dtype).float(), atol=atol, rtol=rtol)
    if device == "cuda":  # the CPU twin (the unfused ops) agrees
        cpu = tidal.ops.skinny_linear(x, w, b, **kwargs_for(prologue, nw))
        torch.testing.assert_close(out.cpu().float(), cpu.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prologue", PROLOGUES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 4, 6, 8])
def test_residual_in_place(m, dtype, prologue, device):
    n, k = 96, 512
    x, w, b, nw = make(m, n, k, dtype, prologue, True, seed=m)
    residual = randn(m, n, dtype=dtype, seed=99, scale=4.0)
    expected = reference(x, w, b, nw, prologue, residual=residual).to(dtype)
    res_dev = residual.to(device)
    x_dev = x.to(device)
    x_before = x_dev.clone()
    got = tidal.ops.skinny_linear(x_dev, w.to(device), b.to(device),
                                  residual=res_dev, **kwargs_for(prologue, None if nw is None else nw.to(device)))
    assert got is res_dev
    atol, rtol = tolerance(dtype, k)
    torch.testing.assert_close(res_dev.cpu().float(), expected.float(), atol=atol + 4 * rtol, rtol=rtol)
    torch.testing.assert_close(x_dev, x_before, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_out_float32(dtype, device):
    """out in fp32 holds the sums unrounded (the logits of a decode step)."""
    m, n, k = 3, 250, 256
    x, w, b, nw = make(m, n, k, dtype, "rms_norm", False)
    out = torch.full((m, n), float("nan"), dtype=torch.float32, device=device)
    got = tidal.ops.skinny_linear(x.to(device), w.to(device), norm_weight=nw.to(device), out=out)
    assert got is out
    torch.testing.assert_close(out.cpu(), reference(x, w, None, nw, "rms_norm"), atol=1e-4, rtol=1e-4)


@gpu_only
@pytest.mark.parametrize("prologue", PROLOGUES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 1, 8), (1, 4096, 4096), (2, 1000, 3584), (4, 33, 1024), (3, 513, 2048),
                                   (4, 64, 4096)])
def test_fused_kernel_runs(m, n, k, dtype, prologue):
    """The shapes a decode step has take the fused kernel (not the unfused fallback) and it is exact
    to the reference; rows past the batch and outputs past n stay untouched."""
    x, w, b, nw = make(m, n, k, dtype, prologue, True, seed=k)
    x, w, b = x.cuda(), w.cuda(), b.cuda()
    nw = None if nw is None else nw.cuda()
    out = torch.full((m + 1, n + 3), float("nan"), dtype=dtype, device="cuda")
    assert fused_runs(x, w, b, nw, prologue, out[:m, :n])
    atol, rtol = tolerance(dtype, k)
    expected = reference(x.cpu(), w.cpu(), b.cpu(), None if nw is None else nw.cpu(), prologue).to(dtype)
    torch.testing.assert_close(out[:m, :n].cpu().float(), expected.float(), atol=atol, rtol=rtol)
    assert out[m:].isnan().all() and out[:, n:].isnan().all()


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 300, 14336), (2, 77, 10248), (1, 1000, 64), (3, 2053, 200), (2, 8, 4104)])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_fused_kernel_weight_layouts(m, n, k, dtype, strided):
    """Rows longer than one streamed tile (split into segments, the last one short), many short rows
    to a tile (one copy per tile when the weight is contiguous, one per row when its row stride is
    wider than k), and groups of rows cut off by n: each equal to the reference."""
    x, w, b, nw = make(m, n, k, dtype, "silu_and_mul", True, seed=n)
    if strided:
        wide = torch.full((n, k + 24), float("nan"), dtype=dtype)
        wide[:, :k] = w
        w_dev = wide.cuda()[:, :k]
    else:
        w_dev = w.cuda()
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    assert fused_runs(x.cuda(), w_dev, b.cuda(), None, "silu_and_mul", out)
    atol, rtol = tolerance(dtype, k)
    expected = reference(x, w, b, None, "silu_and_mul").to(dtype)
    torch.testing.assert_close(out.cpu().float(), expected.float(), atol=atol, rtol=rtol)


@gpu_only
@pytest.mark.parametrize("shape,dtype,strided", [
    ((37, 200), torch.float32, False), ((1000, 64), torch.bfloat16, True), ((5, 14336), torch.bfloat16, False),
    ((4096, 4096), torch.float16, False), ((3, 16), torch.int8, False)])
def test_prefetch_is_only_a_hint(shape, dtype, strided):
    """An L2 prefetch of another weight (any dtype, strided rows, more or fewer rows than blocks) leaves
    the result bit for bit what it is without one, and touches nothing it should not (the sanitizer
    runs these)."""
    x, w, b, nw = make(2, 300, 1024, torch.bfloat16, "rms_norm", True)
    x, w, b, nw = x.cuda(), w.cuda(), b.cuda(), nw.cuda()
    full = torch.ones(shape[0], shape[1] + (16 if strided else 0), device="cuda").to(dtype)
    other = full[:, :shape[1]]
    plain = tidal.ops.skinny_linear(x, w, b, norm_weight=nw)
    hinted = tidal.ops.skinny_linear(x, w, b, norm_weight=nw, prefetch=other)
    residual = torch.zeros(2, 300, dtype=torch.bfloat16, device="cuda")
    tidal.ops.skinny_linear(x, w, b, norm_weight=nw, residual=residual, prefetch=other)
    torch.cuda.synchronize()
    assert torch.equal(plain, hinted) and torch.equal(residual, plain)
    with pytest.raises(ValueError, match="prefetch: rows must start at 16-byte boundaries"):
        tidal.ops.skinny_linear(x, w, b, norm_weight=nw, prefetch=torch.zeros(3, 8, dtype=torch.int8, device="cuda"))


def test_bad_prefetch_names_itself():
    x, w, b, nw = make(2, 8, 16, torch.float32, "rms_norm", True)
    with pytest.raises(ValueError, match=r"prefetch must be a 2-D weight with contiguous rows, got shape=\(16,\)"):
        tidal.ops.skinny_linear(x, w, norm_weight=nw, prefetch=torch.zeros(16))
    with pytest.raises(ValueError, match="prefetch must be a 2-D weight with contiguous rows"):
        tidal.ops.skinny_linear(x, w, norm_weight=nw, prefetch=torch.zeros(8, 16).t())


@gpu_only
@pytest.mark.parametrize("ring", ["5x7", "1x32", "4x32x", "four"])
def test_bad_stream_ring_names_itself(ring):
    """TIDAL_SKINNY_STAGES (the streamed kernel's ring, read once per process) rejects a malformed or
    unsupported value by name on the first fused call."""
    code = ("import torch, tidal.ops; x = torch.ones(1, 64, device='cuda'); w = torch.ones(8, 64, device='cuda'); "
            "tidal.ops.skinny_linear(x, w); torch.cuda.synchronize()")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TIDAL_SKINNY_STAGES": ring},
                          capture_output=True, text=True, timeout=300)
    if torch.cuda.get_device_capability()[0] < 9:  # the register kernel has no ring
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode != 0
    assert f"TIDAL_SKINNY_STAGES={ring}: expected STAGESxKIB" in done.stderr


@gpu_only
def test_unsupported_shapes_fall_back():
    """Rows past 4, widths that are not whole 16-byte vectors and f(x) past shared memory: the kernel
    declines (writing nothing) and the op still gives the right answer through the unfused ops."""
    for m, n, k in [(5, 16, 64), (1, 16, 36), (4, 16, 65536)]:
        x, w, b, nw = make(m, n, k, torch.bfloat16, "rms_norm", False)
        x, w, nw = x.cuda(), w.cuda(), nw.cuda()
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        assert not fused_runs(x, w, None, nw, "rms_norm", out)
        assert out.isnan().all()
        got = tidal.ops.skinny_linear(x, w, norm_weight=nw)
        torch.testing.assert_close(got.cpu().float(), reference(x.cpu(), w.cpu(), None, nw.cpu(), "rms_norm")
                                   .bfloat16().float(), atol=2e-2, rtol=1e-2)


@gpu_only
def test_cuda_graph_capture():
    m, n, k = 2, 384, 1024
    x, w, b, nw = make(m, n, k, torch.bfloat16, "rms_norm", True)
    x, w, b, nw = x.cuda(), w.cuda(), b.cuda(), nw.cuda()
    residual = torch.zeros(m, n, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.inference_mode():
        tidal.ops.skinny_linear(x, w, b, norm_weight=nw, residual=residual)  # warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            tidal.ops.skinny_linear(x, w, b, norm_weight=nw, residual=residual)
    torch.cuda.synchronize()
    residual.zero_()
    x.copy_(randn(m, k, dtype=torch.bfloat16, seed=5).cuda())
    graph.replay()
    graph.replay()  # adds twice
    expected = 2 * reference(x.cpu(), w.cpu(), b.cpu(), nw.cpu(), "rms_norm")
    torch.testing.assert_close(residual.cpu().float(), expected, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_name_themselves(device):
    x, w, b, nw = make(2, 8, 16, torch.float32, "rms_norm", True)
    x, w, b, nw = x.to(device), w.to(device), b.to(device), nw.to(device)
    with pytest.raises(ValueError, match=r"x.shape=\(2, 16\) must be \[m, 32\]"):
        tidal.ops.skinny_linear(x, w, gated=True)
    with pytest.raises(ValueError, match=r"bias.shape=\(7,\) must be \(n,\) = \(8,\)"):
        tidal.ops.skinny_linear(x, w, b[:7])
    with pytest.raises(ValueError, match=r"norm_weight.shape=\(15,\)"):
        tidal.ops.skinny_linear(x, w, norm_weight=nw[:15])
    with pytest.raises(ValueError, match=r"residual.shape=\(2, 9\) must be \[m, n\] = \[2, 8\]"):
        tidal.ops.skinny_linear(x, w, residual=torch.zeros(2, 9, device=device))
    with pytest.raises(ValueError, match=r"weight.dtype=torch.float16 must equal x.dtype=torch.float32"):
        tidal.ops.skinny_linear(x, w.half())
    with pytest.raises(ValueError, match=r"norm_weight and gated=True are exclusive"):
        tidal.ops.skinny_linear(torch.cat([x, x], 1), w, norm_weight=nw, gated=True)
    with pytest.raises(ValueError, match=r"eps=-1.0 must be finite"):
        tidal.ops.skinny_linear(x, w, norm_weight=nw, eps=-1.0)
    with pytest.raises(ValueError, match=r"out.shape=\(3, 8\) must be \[m, n\] = \[2, 8\]"):
        tidal.ops.skinny_linear(x, w, out=torch.empty(3, 8, device=device))
