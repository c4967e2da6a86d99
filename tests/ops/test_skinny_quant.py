"""skinny_linear over a quantized weight (int8, int4 with zero points, FP8 E4M3 codes: tidal.ops.quant's
layouts) against a pure-torch fp32 reference (on sm_90 every format widened into tensor-core
fragments): f(x) rounded as rms_norm / silu_and_mul round, the weight
widened code by code from the layouts' definitions, a matmul, the residual add. On the CPU (the unfused
ops: f(x), then quant_linear); on CUDA where there is a GPU, outputs poisoned first, with the fused
kernel asserted to run on sm_90 for the shapes it takes: rows of codes whole in a tile and rows split
into segments, groups of 64 to 512 inputs and one group a row, row counts that leave a partial last
tile, 1 to 4 rows, bias, the residual add, CUDA graphs; and asserted to decline the shapes it does not
take (which the unfused ops then compute)."""

import pytest
import torch

import tidal
from conftest import DEVICES, TOLERANCES, gpu_only, poison_cuda_allocator
from test_quant_linear import reference_weight
from test_skinny_linear import PROLOGUES, kwargs_for
from test_skinny_linear import reference as dense_reference
from tidal.ops._lib import capsule, native, stream_of
from tidal.ops.quant import WEIGHT_FORMATS

FORMATS = ["int8", "int4", "fp8"]
DTYPES = [torch.float16, torch.bfloat16]


def random_weight(n, k, fmt, group, seed):
    """Random codes (every value but FP8's NaN patterns), scales and int4 zero points: ``group``
    inputs a scale (None: one a row)."""
    g = torch.Generator().manual_seed(seed)
    width = k // 2 if fmt == "int4" else k
    codes = torch.randint(0, 256, (n, width), generator=g, dtype=torch.int64)
    if fmt == "fp8":
        codes = torch.where((codes & 0x7F) == 0x7F, codes - 1, codes)
    codes = codes.to(torch.uint8)
    if fmt == "int8":
        codes = codes.view(torch.int8)
    groups = 1 if group is None else k // group
    scale = k ** -0.5 / (8.0 if fmt == "int4" else 64.0 if fmt == "int8" else 32.0)
    scales = scale * (0.5 + torch.rand(n, groups, generator=g))
    zeros = torch.randint(0, 16, (n, groups), generator=g, dtype=torch.int64).to(torch.uint8) \
        if fmt == "int4" else None
    return codes, scales, zeros


def make(m, n, k, dtype, fmt, group, prologue, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(m, 2 * k if prologue == "silu_and_mul" else k, generator=g)).to(dtype)
    codes, scales, zeros = random_weight(n, k, fmt, group, seed + 1)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    nw = torch.randn(k, generator=g).to(dtype) if prologue == "rms_norm" else None
    return x, codes, scales, zeros, b, nw


def reference(x, codes, scales, zeros, fmt, b, nw, prologue, residual=None):
    w = reference_weight(codes.view(torch.uint8) if fmt != "int8" else codes, scales, zeros, fmt)
    return dense_reference(x, w, b, nw, prologue, residual=residual)


def tolerance(dtype, k):
    atol, rtol = TOLERANCES[dtype]
    return atol * max(1.0, k ** 0.5 / 4), rtol


def fused_runs(x, codes, scales, zeros, b, nw, prologue, fmt, out) -> bool:
    """Whether the fused kernel takes these tensors (it writes out when it does)."""
    opt = lambda t: None if t is None else capsule(t)  # noqa: E731
    return native.skinny_linear(capsule(out), None, capsule(x), capsule(codes), opt(b), opt(nw),
                                PROLOGUES.index(prologue), 1e-6, stream_of(x), None, WEIGHT_FORMATS[fmt],
                                capsule(scales), opt(zeros))


def is_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


# (m, n, k, group): whole rows a tile with a partial last tile; rows in two and four segments; groups of
# 64, 512, and one a row; a tiny layer
SHAPES = [(1, 64, 256, 128), (2, 300, 4096, 128), (3, 77, 14336, 128), (1, 130, 2048, 64), (2, 24, 4096, 512),
          (4, 48, 1024, None), (1, 9, 512, None)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prologue", PROLOGUES)
@pytest.mark.parametrize("m,n,k,group", SHAPES)
def test_against_reference(m, n, k, group, prologue, dtype, fmt, device):
    bias = (m + n) % 2 == 0
    x, codes, scales, zeros, b, nw = make(m, n, k, dtype, fmt, group, prologue, bias, seed=m + n + k)
    expected = reference(x, codes, scales, zeros, fmt, b, nw, prologue)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    if device == "cuda":
        poison_cuda_allocator(m * n * x.element_size())
    out = tidal.ops.skinny_linear(dev(x), dev(codes), dev(b), **kwargs_for(prologue, dev(nw)), weight_format=fmt,
                                  scales=dev(scales), zeros=dev(zeros))
    assert out.shape == (m, n) and out.dtype == dtype and out.device.type == device
    atol, rtol = tolerance(dtype, k)
    torch.testing.assert_close(out.float().cpu(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 2, 4, 6])
def test_residual_in_place(m, fmt, device):
    n, k, dtype = 96, 2048, torch.bfloat16
    x, codes, scales, zeros, b, _ = make(m, n, k, dtype, fmt, 128, "silu_and_mul", True, seed=m)
    residual = torch.randn(m, n).to(dtype)
    expected = reference(x, codes, scales, zeros, fmt, b, None, "silu_and_mul", residual=residual)
    res = residual.to(device)
    got = tidal.ops.skinny_linear(x.to(device), codes.to(device), b.to(device), gated=True, residual=res,
                                  weight_format=fmt, scales=scales.to(device),
                                  zeros=None if zeros is None else zeros.to(device))
    assert got is res
    atol, rtol = tolerance(dtype, k)
    torch.testing.assert_close(res.float().cpu(), expected, atol=2 * atol, rtol=rtol)


@gpu_only
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,group", [s for s in SHAPES if s[3] is not None] + [(4, 48, 1024, None)])
def test_fused_kernel_runs(m, n, k, group, dtype, fmt):
    """On sm_90 the kernel takes these shapes (for int4 with one group a row, whole tiles of zero
    points need a row count that is a multiple of 16: 48 is; int4 groups of 64 inputs, half a
    tensor-core k block, it declines), and matches the reference."""
    x, codes, scales, zeros, b, nw = make(m, n, k, dtype, fmt, group, "rms_norm", True, seed=k)
    dev = lambda t: None if t is None else t.cuda()  # noqa: E731
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    ran = fused_runs(dev(x), dev(codes), dev(scales), dev(zeros), dev(b), dev(nw), "rms_norm", fmt, out)
    assert ran == (is_sm90() and not (fmt == "int4" and group == 64))
    if ran:
        atol, rtol = tolerance(dtype, k)
        torch.testing.assert_close(out.float().cpu(), reference(x, codes, scales, zeros, fmt, b, nw, "rms_norm"),
                                   atol=atol, rtol=rtol)


@gpu_only
@pytest.mark.parametrize("codes_kind", ["every", "subnormal"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_codes_widen_exactly(codes_kind, dtype):
    """Every E4M3 code but NaN, and a weight of subnormal codes only (exponent bits zero), through the
    fused kernel: a code widened wrongly, or a subnormal flushed to zero, moves the output by far more
    than the tolerance (the scales make the outputs of order one)."""
    n, k = 32, 512
    j = torch.arange(n * k, dtype=torch.int64).reshape(n, k)
    if codes_kind == "every":
        codes = (j * 7 + j // k) % 256
        codes = torch.where((codes & 0x7F) == 0x7F, codes ^ 0x01, codes)
    else:
        codes = (j * 7 + j // k) % 256 & 0x87  # sign and mantissa bits only
    codes = codes.to(torch.uint8)
    scale = 2.0 if codes_kind == "every" else 2048.0
    scales = scale * k ** -0.5 / 16 * (0.5 + torch.rand(n, 1, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(2)).to(dtype)
    out = torch.full((2, n), float("nan"), dtype=dtype, device="cuda")
    expected = reference(x, codes, scales, None, "fp8", None, None, "identity")
    assert expected.abs().max() > 0.5
    ran = fused_runs(x.cuda(), codes.cuda(), scales.cuda(), None, None, None, "identity", "fp8", out)
    assert ran == is_sm90()
    if not ran:
        out = tidal.ops.skinny_linear(x.cuda(), codes.cuda(), weight_format="fp8", scales=scales.cuda())
    atol, rtol = tolerance(dtype, k)
    torch.testing.assert_close(out.float().cpu(), expected, atol=atol, rtol=rtol)


@gpu_only
@pytest.mark.parametrize("fmt,n,k,group,why", [
    ("int4", 16, 96, 32, "rows of 48 bytes of codes (not whole 16-byte chunks)"),
    ("int4", 40, 1152, 192, "groups of 6 chunks (not a power of two)"),
    ("int4", 130, 2048, 64, "groups of 64 inputs (half a tensor-core k block)"),
    ("int8", 24, 1040, None, "rows of 1040 codes (not whole 64-byte k blocks)"),
    ("fp8", 32, 1040, None, "rows of 1040 codes (not whole 64-byte k blocks)"),
    ("int4", 9, 512, None, "a last tile of 9 zero points (not a whole 16-byte unit)"),
    ("fp8", 9, 512, None, "a last tile of 9 scales (36 bytes)"),
])
def test_declined_shapes_fall_back(fmt, n, k, group, why):
    """Shapes the kernel does not take: native.skinny_linear says so and writes nothing, and
    tidal.ops.skinny_linear computes them with the unfused ops."""
    x, codes, scales, zeros, b, nw = make(2, n, k, torch.bfloat16, fmt, group, "identity", False, seed=n)
    dev = lambda t: None if t is None else t.cuda()  # noqa: E731
    out = torch.full((2, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    assert not fused_runs(dev(x), dev(codes), dev(scales), dev(zeros), None, None, "identity", fmt, out), why
    assert torch.isnan(out).all()
    got = tidal.ops.skinny_linear(dev(x), dev(codes), weight_format=fmt, scales=dev(scales), zeros=dev(zeros))
    atol, rtol = tolerance(torch.bfloat16, k)
    torch.testing.assert_close(got.float().cpu(), reference(x, codes, scales, zeros, fmt, None, None, "identity"),
                               atol=atol, rtol=rtol)


@gpu_only
def test_float32_x_takes_the_unfused_ops():
    x, codes, scales, zeros, b, nw = make(1, 64, 1024, torch.float32, "int4", 128, "rms_norm", True)
    got = tidal.ops.skinny_linear(x.cuda(), codes.cuda(), b.cuda(), norm_weight=nw.cuda(), weight_format="int4",
                                  scales=scales.cuda(), zeros=zeros.cuda())
    atol, rtol = tolerance(torch.float32, 1024)
    torch.testing.assert_close(got.cpu(), reference(x, codes, scales, zeros, "int4", b, nw, "rms_norm"),
                               atol=atol, rtol=rtol)


@gpu_only
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_graph_capture(fmt):
    x, codes, scales, zeros, b, nw = make(2, 256, 4096, torch.bfloat16, fmt, 128, "rms_norm", False, seed=7)
    x, codes, scales, nw = x.cuda(), codes.cuda(), scales.cuda(), nw.cuda()
    zeros = None if zeros is None else zeros.cuda()
    out = torch.empty(2, 256, dtype=torch.bfloat16, device="cuda")

    def run():
        tidal.ops.skinny_linear(x, codes, norm_weight=nw, out=out, weight_format=fmt, scales=scales, zeros=zeros)

    run()
    torch.cuda.synchronize()
    eager = out.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, atol=0, rtol=0)


def test_bad_arguments_name_themselves():
    x, codes, scales, zeros, b, nw = make(1, 8, 64, torch.bfloat16, "int4", 32, "identity", False)
    with pytest.raises(ValueError, match="weight_format='int3'"):
        tidal.ops.skinny_linear(x, codes, weight_format="int3", scales=scales, zeros=zeros)
    with pytest.raises(ValueError, match="needs its scales"):
        tidal.ops.skinny_linear(x, codes, weight_format="int4", zeros=zeros)
    with pytest.raises(ValueError, match="out_dtype=torch.float32"):
        tidal.ops.skinny_linear(x, codes, weight_format="int4", scales=scales, zeros=zeros, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="pass weight_format too"):
        tidal.ops.skinny_linear(x, torch.zeros(8, 64, dtype=torch.bfloat16), scales=scales)
    with pytest.raises(ValueError, match=r"x.shape=\(1, 64\) must be \[m, 128\]"):
        tidal.ops.skinny_linear(x, codes[:, :64].contiguous().repeat(1, 2), weight_format="int4", scales=scales,
                                zeros=zeros)
