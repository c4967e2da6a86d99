"""quant_linear and dequantize_weight (int8, int4 with zero points, FP8 E4M3 codes) against a pure-torch
fp32 reference: the weight widened code by code, then a matmul. On the CPU here; on CUDA where there is
a GPU, with the kernel asserted to run for the shapes it takes, outputs poisoned first, and against the
CPU result. Every activation dtype, 1 to 8 rows (the kernel) and more (the dense path; FP8 quantizes the
activations there), odd output counts, groups, widths the kernel does not take, bias, CUDA graphs."""

import pytest
import torch
import torch.nn.functional as F

import tidal
from conftest import DEVICES, TOLERANCES, gpu_only, poison_cuda_allocator
from tidal.ops._lib import capsule, native, stream_of
from tidal.ops.quant import WEIGHT_FORMATS
from tidal.quant import quantize_weight

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = ["int8", "int4", "fp8"]


def fp8_to_float(bits: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 (fn) bit patterns to fp32 by the format's definition (not through torch's cast)."""
    b = bits.to(torch.int64)
    sign = torch.where(b & 0x80 != 0, -1.0, 1.0)
    exponent, mantissa = (b >> 3) & 0xF, (b & 7).double()
    normal = (1 + mantissa / 8) * torch.pow(2.0, (exponent - 7).double())
    subnormal = mantissa / 8 * 2.0 ** -6
    return (sign * torch.where(exponent == 0, subnormal, normal)).float()


def reference_weight(codes, scales, zeros, fmt) -> torch.Tensor:
    """w = (code - zero) * scale, fp32, from the layouts' definitions."""
    if fmt == "int4":
        codes = torch.stack((codes & 0xF, codes >> 4), dim=-1).reshape(codes.shape[0], -1)
    values = fp8_to_float(codes) if fmt == "fp8" else codes.float()
    n, k = values.shape
    g = k // scales.shape[1]
    z = zeros.float() if zeros is not None else torch.zeros_like(scales)
    return ((values.reshape(n, -1, g) - z[..., None]) * scales[..., None]).reshape(n, k)


def reference(x, w, b, fmt):
    """fp32 x @ w.T (+ b); for FP8 past the kernel's rows, with x quantized per token to FP8 first."""
    xf = x.float()
    if fmt == "fp8" and x.shape[0] > tidal.ops.quant.fp8_weight_only_rows(x, w, torch.ones(w.shape[0], 1)):
        scale = (xf.abs().amax(dim=1, keepdim=True) / 448).clamp(min=1e-12)
        xf = (xf / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    return xf @ w.t() + (0.0 if b is None else b.float())


def make(m, n, k, dtype, fmt, group, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * k ** -0.5
    codes, scales, zeros = quantize_weight(w, fmt, group if fmt == "int4" else None)
    x = (2 * torch.randn(m, k, generator=g)).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, codes, scales, zeros, b


def tolerance(dtype, k):
    atol, rtol = TOLERANCES[dtype]
    return atol * max(1.0, k ** 0.5 / 4), rtol


SHAPES = [(1, 64, 64, 32), (3, 37, 256, 64), (8, 300, 1024, 128), (5, 129, 512, None), (9, 40, 128, 32),
          (33, 24, 96, 32), (2, 16, 48, 16), (4, 8, 20, 10),
          (6, 32, 64, None)]  # FP8 in bf16 past fp8_weight_only_rows: W8A8 (torch._scaled_mm on the GPU)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,group", SHAPES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_quant_linear(m, n, k, group, dtype, fmt, bias, device):
    x, codes, scales, zeros, b = make(m, n, k, dtype, fmt, group, bias, seed=m + n + k)
    w = reference_weight(codes, scales, zeros, fmt)
    expected = reference(x, w, b, fmt)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    if device == "cuda":
        poison_cuda_allocator(m * n * x.element_size())
    out = tidal.ops.quant_linear(dev(x), dev(codes), dev(scales), dev(zeros), dev(b), fmt)
    assert out.shape == (m, n) and out.dtype == dtype and out.device.type == device
    atol, rtol = tolerance(dtype, k)
    weight_only_rows = (tidal.ops.quant.fp8_weight_only_rows(x, codes, scales) if fmt == "fp8"
                        else tidal.ops.quant.GEMV_MAX_ROWS)
    if device == "cuda" and (m > weight_only_rows or k % 32 or (group or k) % 32):
        # the dense path: the weight rounded to x's dtype first; FP8 tensor cores sum in their own order
        atol, rtol = 4 * atol, 4 * rtol
    torch.testing.assert_close(out.float().cpu(), expected.to(dtype).float(), atol=atol, rtol=rtol)
    if device == "cuda":  # the CPU twin agrees
        cpu = tidal.ops.quant_linear(x, codes, scales, zeros, b, fmt)
        torch.testing.assert_close(out.cpu().float(), cpu.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_weight(fmt, dtype, device):
    _, codes, scales, zeros, _ = make(1, 45, 192, dtype, fmt, 64, False, seed=3)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    out = tidal.ops.dequantize_weight(dev(codes), dev(scales), dev(zeros), fmt, dtype)
    torch.testing.assert_close(out.cpu(), reference_weight(codes, scales, zeros, fmt).to(dtype), atol=0, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_weight_round_trip(fmt):
    """The quantizers' codes reproduce the weight within half a step of each scale."""
    w = torch.randn(33, 256) * 0.1
    codes, scales, zeros = quantize_weight(w, fmt, 64 if fmt == "int4" else None)
    err = (reference_weight(codes, scales, zeros, fmt) - w).abs()
    if fmt == "fp8":  # 3 mantissa bits: half a unit in the last place, relative
        assert (err <= w.abs() * 2 ** -4 + scales * 2 ** -9).all()
    else:
        step = scales.repeat_interleave(256 // scales.shape[1], dim=1)
        assert (err <= step / 2 + 1e-7).all()


@gpu_only
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,group", [(1, 64, 64, 32), (4, 37, 256, 64), (8, 300, 1024, 128), (6, 129, 512, None),
                                         (1, 40, 512, 128), (3, 16, 256, None), (16, 50, 384, 128), (32, 33, 1024, 256),
                                         (27, 64, 128, 128),
                                         # more 16-row tiles than a wave of blocks: each block walks several
                                         (1, 9001, 1024, 128), (12, 8500, 256, None), (3, 10007, 384, 128)])
def test_kernel_runs_for_its_shapes(m, n, k, group, dtype, fmt):
    """The decode kernels themselves (tensor cores for int4/int8 with 16-bit x and groups of 128 or
    whole rows; the SIMT kernel otherwise, up to 8 rows), not the dense fallback, take these shapes
    and match the reference."""
    tensor_cores = fmt != "fp8" and dtype != torch.float32 and (group or k) % (128 if fmt == "int4" else 64) == 0
    if m > 8 and not tensor_cores:
        pytest.skip("past 8 rows only the tensor-core kernel runs")
    x, codes, scales, zeros, b = make(m, n, k, dtype, fmt, group, True, seed=k)
    cuda = [None if t is None else t.cuda() for t in (x, codes, scales, zeros, b)]
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    opt = lambda t: None if t is None else capsule(t)  # noqa: E731
    assert native.quant_linear(capsule(out), capsule(cuda[0]), capsule(cuda[1]), capsule(cuda[2]), opt(cuda[3]),
                               opt(cuda[4]), WEIGHT_FORMATS[fmt], stream_of(cuda[0]))
    expected = reference(x, reference_weight(codes, scales, zeros, fmt), b, fmt)
    torch.testing.assert_close(out.float().cpu(), expected.to(dtype).float(), atol=tolerance(dtype, k)[0],
                               rtol=tolerance(dtype, k)[1])


@gpu_only
def test_kernel_declines_shapes_it_does_not_take():
    x, codes, scales, zeros, _ = make(9, 16, 64, torch.bfloat16, "int4", 32, False)
    out = torch.empty(9, 16, dtype=torch.bfloat16, device="cuda")
    assert not native.quant_linear(capsule(out), capsule(x.cuda()), capsule(codes.cuda()), capsule(scales.cuda()),
                                   capsule(zeros.cuda()), None, WEIGHT_FORMATS["int4"], 0)


@gpu_only
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_graph_capture(fmt):
    x, codes, scales, zeros, b = make(4, 96, 256, torch.bfloat16, fmt, 64, True)
    args = [None if t is None else t.cuda() for t in (x, codes, scales, zeros, b)]
    eager = tidal.ops.quant_linear(*args, fmt)
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        tidal.ops.quant_linear(*args, fmt)  # warm-up outside capture
        with torch.cuda.graph(graph, stream=stream):
            captured = tidal.ops.quant_linear(*args, fmt)
    torch.cuda.current_stream().wait_stream(stream)
    args[0].mul_(-1)
    graph.replay()
    torch.testing.assert_close(captured, tidal.ops.quant_linear(*args, fmt), atol=0, rtol=0)
    assert not torch.equal(captured, eager)


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fmt):
    x, codes, scales, zeros, b = make(3, 32, 64, torch.float32, fmt, 32, True)
    torch.library.opcheck(torch.ops.tidal.quant_linear, (x, codes, scales, zeros, b, WEIGHT_FORMATS[fmt], None))
    torch.library.opcheck(torch.ops.tidal.dequantize_weight, (codes, scales, zeros, WEIGHT_FORMATS[fmt], torch.float32))


def test_bad_arguments_name_what_is_wrong():
    x, codes, scales, zeros, _ = make(2, 16, 64, torch.float32, "int4", 32, False)
    with pytest.raises(ValueError, match="format='int3'"):
        tidal.ops.quant_linear(x, codes, scales, zeros, None, "int3")
    with pytest.raises(ValueError, match=r"x.shape=\(2, 32\)"):
        tidal.ops.quant_linear(x[:, :32], codes, scales, zeros, None, "int4")
    with pytest.raises(ValueError, match="zeros"):
        tidal.ops.quant_linear(x, codes, scales, None, None, "int4")
    with pytest.raises(ValueError, match="scales"):
        tidal.ops.quant_linear(x, codes, scales[:, :1].repeat(1, 3).contiguous(), zeros, None, "int4")
    fp8_codes, fp8_scales, _ = quantize_weight(torch.randn(16, 64), "fp8")
    with pytest.raises(ValueError, match="qweight.dtype=uint8 must be int8"):
        tidal.ops.quant_linear(x, fp8_codes, fp8_scales, None, None, "int8")
    int8_codes, int8_scales, _ = quantize_weight(torch.randn(16, 64), "int8")
    with pytest.raises(ValueError, match="has no zero points"):
        tidal.ops.quant_linear(x, int8_codes, int8_scales, zeros, None, "int8")
    with pytest.raises(ValueError, match="group_size=32 applies to int4 only"):
        quantize_weight(torch.randn(16, 64), "int8", 32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("rows,width", [(37, 301), (37, 4096), (2051, 301), (2051, 4096), (2051, 6008)])
def test_quantize_fp8_per_token(rows, width, dtype, static, device):
    """Scales and codes bit for bit those of the pure-torch reference (torch's own FP8 cast), magnitudes
    over 11 decades, a row of zeros; on the GPU, the block-per-row kernel (few rows, odd widths) and
    from 2048 rows of widths in multiples of 8 the warp-per-row one (rows held in registers up to 2048
    inputs and read twice past that)."""
    from tidal.ops.quant import quantize_fp8_per_token

    g = torch.Generator().manual_seed(7)
    x = (torch.randn(rows, width, generator=g) * torch.logspace(-8, 3, width)).to(dtype)
    x[3] = 0
    input_scale = torch.tensor([0.01]) if static else None
    xf = x.float()
    scale = input_scale.reshape(1, 1).expand(rows, 1) if static else \
        (xf.abs().amax(1, keepdim=True) / 448).clamp(min=1e-12)
    want = (xf / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    codes, got_scale = quantize_fp8_per_token(x.to(device), None if input_scale is None else input_scale.to(device))
    assert torch.equal(got_scale.cpu(), scale.float())
    assert torch.equal(codes.cpu().view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_conversion_of_every_float16(dtype, device):
    from tidal.ops.quant import quantize_fp8_per_token

    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    values = values[torch.isfinite(values)].clamp(-448, 448)  # 63488 of them, then zeros to 2048 rows of 32
    values = torch.cat((values, values.new_zeros(65536 - len(values)))).reshape(2048, 32).to(dtype)
    codes, _ = quantize_fp8_per_token(values.to(device), torch.tensor([1.0], device=device))
    assert torch.equal(codes.cpu().view(torch.uint8), values.to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(1, 64), (3, 4096), (300, 128), (5, 100), (2, 20000), (2304, 256)])
def test_fused_add_rms_norm_quant_fp8(rows, width, dtype, device):
    """fused_add_rms_norm_quant_fp8_ against the two kernels it replaces (fused_add_rms_norm_, then
    quantize_fp8_per_token), bit for bit, residual included; and against pure-torch fp32 math (the
    residual add and the norm rounded to the dtype, torch's own FP8 cast) to FP8 resolution. On the
    GPU: rows held in one block's registers (sub-warp rows, whole blocks, the warp-per-row quantizer's
    row count), and the widths that run the two kernels (not a multiple of 16 bytes, too wide)."""
    from tidal.ops.quant import fused_add_rms_norm_quant_fp8_, quantize_fp8_per_token

    g = torch.Generator().manual_seed(rows + width)
    x = (torch.randn(rows, width, generator=g) * 3).to(dtype)
    residual = torch.randn(rows, width, generator=g).to(dtype)
    weight = (torch.rand(width, generator=g) + 0.5).to(dtype)
    x[0, :7] = 0  # a few zeros; a row of the sum stays non-zero
    eps = 1e-6

    x_two, residual_two = x.to(device, copy=True), residual.to(device, copy=True)  # both ops write in place
    tidal.ops.fused_add_rms_norm_(x_two, residual_two, weight.to(device), eps)
    want_codes, want_scale = quantize_fp8_per_token(x_two)
    residual_one = residual.to(device, copy=True)
    codes, scale = fused_add_rms_norm_quant_fp8_(x.to(device, copy=True), residual_one, weight.to(device), eps)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (rows, width) and scale.shape == (rows, 1)
    assert torch.equal(residual_one, residual_two)
    assert torch.equal(scale, want_scale)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))

    summed = (x.float() + residual.float()).to(dtype).float()
    normed = (summed * torch.rsqrt(summed.pow(2).mean(1, keepdim=True) + eps) * weight.float()).to(dtype).float()
    ref_scale = (normed.abs().amax(1, keepdim=True) / 448).clamp(min=1e-12)
    torch.testing.assert_close(residual_one.cpu().float(), summed, atol=0, rtol=0)
    torch.testing.assert_close(scale.cpu(), ref_scale, atol=0, rtol=2 ** -7)
    # in code units: E4M3 rounds to 3 mantissa bits, subnormals to steps of 2^-9
    torch.testing.assert_close(codes.cpu().float(), (normed / ref_scale).clamp(-448, 448), atol=2 ** -9, rtol=2 ** -3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d,pad", [(1, 64, 0), (3, 4096, 0), (300, 1024, 8), (2, 14336, 0), (5, 100, 0),
                                        (2, 20000, 0), (2304, 256, 0), (4, 512, 3)])
def test_silu_and_mul_quant_fp8(rows, d, pad, dtype, device):
    """silu_and_mul_quant_fp8_ against the two kernels it replaces (silu_and_mul, then
    quantize_fp8_per_token), bit for bit; and against pure-torch fp32 math (silu times up rounded to
    the dtype, torch's own FP8 cast) to FP8 resolution. On the GPU: rows held in one block's
    registers in one to eight passes (d = 14336 is Llama-3-8B's), rows of a padded view, and the cases
    that run the two kernels (a width not a multiple of 16 bytes, a row too wide, an odd row stride),
    the warp-per-row quantizer's row count among them."""
    from tidal.ops.quant import quantize_fp8_per_token, silu_and_mul_quant_fp8_

    g = torch.Generator().manual_seed(rows + d + pad)
    x = (torch.randn(rows, 2 * d + pad, generator=g) * 3).to(dtype)[:, :2 * d]  # pad: rows of a wider tensor
    x[0, :5] = 0  # a few zeros in the gate half
    want_codes, want_scale = quantize_fp8_per_token(tidal.ops.silu_and_mul(x.to(device)))
    x_dev = torch.empty(rows, 2 * d + pad, dtype=dtype, device=device)[:, :2 * d]
    x_dev.copy_(x)
    codes, scale = silu_and_mul_quant_fp8_(x_dev)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (rows, d) and scale.shape == (rows, 1)
    assert torch.equal(scale, want_scale)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))

    gate, up = x.float()[:, :d], x.float()[:, d:]
    act = (F.silu(gate) * up).to(dtype).float()
    ref_scale = (act.abs().amax(1, keepdim=True) / 448).clamp(min=1e-12)
    torch.testing.assert_close(scale.cpu(), ref_scale, atol=0, rtol=2 ** -7)
    torch.testing.assert_close(codes.cpu().float(), (act / ref_scale).clamp(-448, 448), atol=2 ** -9, rtol=2 ** -3)


def test_silu_and_mul_quant_fp8_errors():
    from tidal.ops.quant import silu_and_mul_quant_fp8_

    with pytest.raises(ValueError, match=r"x must be 2-D \[m, 2d\], got shape \(64,\)"):
        silu_and_mul_quant_fp8_(torch.randn(64))
    with pytest.raises(ValueError, match=r"x.shape\[1\]=63 must be even"):
        silu_and_mul_quant_fp8_(torch.randn(4, 63))
    with pytest.raises(ValueError, match="x.dtype=int32 is not supported"):
        silu_and_mul_quant_fp8_(torch.zeros(4, 64, dtype=torch.int32))


def test_fused_add_rms_norm_quant_fp8_errors():
    from tidal.ops.quant import fused_add_rms_norm_quant_fp8_

    x, residual, weight = torch.randn(4, 64), torch.randn(4, 64), torch.ones(64)
    with pytest.raises(ValueError, match=r"x must be 2-D \[m, k\], got shape \(256,\)"):
        fused_add_rms_norm_quant_fp8_(x.view(-1), residual.view(-1), weight, 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm_quant_fp8_(x, torch.randn(4, 32), weight, 1e-6)
    with pytest.raises(ValueError, match="weight"):
        fused_add_rms_norm_quant_fp8_(x, residual, torch.ones(32), 1e-6)
    with pytest.raises(ValueError, match="eps"):
        fused_add_rms_norm_quant_fp8_(x, residual, weight, -1.0)
