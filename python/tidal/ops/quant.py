"""Quantized linear layers as torch ops (``torch.ops.tidal.quant_linear`` and
``torch.ops.tidal.dequantize_weight``).

A quantized weight ``w`` [n, k] is stored as codes plus fp32 scales per output row and group of
``g = k / num_groups`` inputs (and, for int4, zero points)::

    w[j, i] = (code[j, i] - zero[j, i // g]) * scale[j, i // g]

``"int8"``: int8 codes ``[n, k]``, no zero point; ``"int4"``: two codes a byte (input 2c in the low
nibble of byte c), ``[n, k / 2]`` uint8, zero points ``[n, num_groups]`` uint8; ``"fp8"``: FP8 E4M3
codes ``[n, k]`` (stored as their uint8 bits).

How ``x @ w.T`` runs: up to ``GEMV_MAX_ROWS`` rows (FP8: ``fp8_weight_only_rows``; on a GPU
``TC_MAX_ROWS`` for int4 and int8 with 16-bit activations, on tensor cores) through tidal's kernels,
which widen the codes in registers and so read the weight at its quantized size (a shape the GPU
kernel does not take: a dense matmul on the weight dequantized to x's dtype); more rows through that
dense matmul, or, for ``"fp8"``, with the activations quantized per token to FP8 as well
(``torch._scaled_mm`` on GPUs with FP8 tensor cores, the same arithmetic emulated in fp32 elsewhere).
"""

import torch
import torch.nn.functional as F

from tidal.ops._lib import capsule, is_eager_call, lib, native, stream_of

WEIGHT_FORMATS = {"int8": 0, "int4": 1, "fp8": 2}
GEMV_MAX_ROWS = 8  # the kernel's limit; more rows take the dense matmul
TC_MAX_ROWS = 32  # the GPU's tensor-core kernel (int4 and int8 with 16-bit x) goes to here
# NOTE(tidal): FP8 on FP8 tensor cores. Measured on H100 (bench/bench_quant_linear.py, Llama-3-8B
# projections): the decode kernel took a layer's four projections in 121 / 183 / 355 us at 1 / 4 / 8
# rows, per-token quantization + torch._scaled_mm in 186 / 188 / 185 us: the kernel up to 4 rows.
FP8_GEMV_MAX_ROWS = 4
FP8_MAX = 448.0  # the largest finite FP8 E4M3 value
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

lib.define("quant_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int format, "
           "Tensor? input_scale) -> Tensor")
lib.define("dequantize_weight(Tensor qweight, Tensor scales, Tensor? zeros, int format, ScalarType dtype) -> Tensor")


def _format_code(format: str, name: str = "format") -> int:
    """The op code of a format's name; ``name``: the argument the error message names."""
    if format not in WEIGHT_FORMATS:
        raise ValueError(f"{name}={format!r} must be one of {sorted(WEIGHT_FORMATS)}")
    return WEIGHT_FORMATS[format]


def _in_features(qweight: torch.Tensor, fmt: int) -> int:
    return qweight.shape[1] * 2 if fmt == WEIGHT_FORMATS["int4"] else qweight.shape[1]


def _check(x, qweight, scales, zeros, bias, fmt, input_scale):
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x.dtype={x.dtype} is not supported; expected float32, float16 or bfloat16")
    if x.dim() != 2 or qweight.dim() != 2:
        raise ValueError(f"x and qweight must be 2-D, got x.shape={tuple(x.shape)}, "
                         f"qweight.shape={tuple(qweight.shape)}")
    k = _in_features(qweight, fmt)
    if x.shape[1] != k:
        raise ValueError(f"x.shape={tuple(x.shape)} must be [m, {k}] for qweight.shape={tuple(qweight.shape)}")
    if bias is not None and (bias.dtype != x.dtype or bias.shape != (qweight.shape[0],)):
        raise ValueError(f"bias must be [{qweight.shape[0]}] in x.dtype={x.dtype}, "
                         f"got {tuple(bias.shape)} {bias.dtype}")
    if input_scale is not None and (fmt != WEIGHT_FORMATS["fp8"] or input_scale.numel() != 1):
        raise ValueError("input_scale (a static activation scale) is one float32 value, for format 'fp8' only")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _dequantize(qweight, scales, zeros, fmt, dtype) -> torch.Tensor:
    out = torch.empty((qweight.shape[0], _in_features(qweight, fmt)), dtype=dtype, device=qweight.device)
    native.dequantize_weight(capsule(out), capsule(qweight), capsule(scales),
                             None if zeros is None else capsule(zeros), fmt, stream_of(qweight))
    return out


def quantize_fp8_per_token(x: torch.Tensor, input_scale: torch.Tensor | None = None):
    """``(codes, scale)``: ``x`` [m, k] as FP8 E4M3 codes (``torch.float8_e4m3fn``) and fp32 scales
    [m, 1] with ``x ~ codes * scale``; the scale is ``max(max |x[t]| / 448, 1e-12)`` per row, or
    ``input_scale`` (a static per-tensor scale) for every row; codes round ``x / scale``, clamped to
    +-448, to nearest even. One kernel (tidal's), CPU and GPU alike."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [m, k], got shape {tuple(x.shape)}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    scale = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    native.quantize_fp8_per_token(capsule(codes), capsule(scale), capsule(x),
                                  None if input_scale is None else capsule(input_scale.float().reshape(1)),
                                  stream_of(x))
    return codes.view(torch.float8_e4m3fn), scale


def fused_add_rms_norm_quant_fp8_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``residual += x`` (rounded to its dtype), then the sum's RMSNorm times ``weight`` as FP8 per row:
    ``(codes, scale)`` equal bit for bit to ``fused_add_rms_norm_(x, residual, weight, eps)`` followed by
    ``quantize_fp8_per_token(x)``, from one kernel on the GPU where a row fits a block's registers (the
    W8A8 projections' inputs after a norm). ``x`` and ``residual``: [m, k] of one float dtype with
    contiguous rows; ``x`` is consumed (its contents afterwards are unspecified)."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [m, k], got shape {tuple(x.shape)}")
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    scale = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    native.fused_add_rms_norm_quant_fp8(capsule(codes), capsule(scale), capsule(residual), capsule(x),
                                        capsule(residual), capsule(weight), eps, stream_of(x))
    return codes.view(torch.float8_e4m3fn), scale


def silu_and_mul_quant_fp8_(x: torch.Tensor):
    """``silu_and_mul(x)`` as FP8 per row: ``(codes, scale)`` equal bit for bit to ``silu_and_mul(x)``
    followed by ``quantize_fp8_per_token``, from one kernel on the GPU where a row fits a block's
    registers (the input of a W8A8 down projection). ``x``: [m, 2d] of a float dtype with contiguous
    rows; it is consumed (its contents afterwards are unspecified)."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [m, 2d], got shape {tuple(x.shape)}")
    codes = torch.empty((x.shape[0], x.shape[1] // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    native.silu_and_mul_quant_fp8(capsule(codes), capsule(scale), capsule(x), stream_of(x))
    return codes.view(torch.float8_e4m3fn), scale


def _has_fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _fp8_scaled_mm_shape(dtype: torch.dtype, qweight, scales) -> bool:
    """Whether torch._scaled_mm takes this W8A8 product into ``dtype`` (on GPUs with FP8 tensor cores)."""
    n, k = qweight.shape
    return dtype == torch.bfloat16 and scales.shape[1] == 1 and n % 16 == 0 and k % 16 == 0


def fp8_weight_only_rows(x, qweight, scales) -> int:
    """Up to how many rows FP8 runs weight-only (x as is); past them x is quantized per token too.
    A property of the shapes, not of the device, so the CPU and the GPU compute the same thing."""
    return FP8_GEMV_MAX_ROWS if _fp8_scaled_mm_shape(x.dtype, qweight, scales) else GEMV_MAX_ROWS


def _fp8_linear(x, qweight, scales, bias, input_scale) -> torch.Tensor:
    """W8A8: activations per token (or by the static ``input_scale``) and weights per row in FP8."""
    xq, x_scale = quantize_fp8_per_token(x, input_scale)
    return fp8_matmul(xq, x_scale, qweight, scales, bias, x.dtype)


def fp8_matmul(xq, x_scale, qweight, scales, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """``(xq * x_scale) @ w.T (+ bias)`` in ``out_dtype`` for activations already quantized to FP8
    (``xq`` [m, k] ``torch.float8_e4m3fn``, ``x_scale`` fp32 [m, 1]) and an FP8 weight: torch._scaled_mm
    on GPUs with FP8 tensor cores where it takes the shapes, the same arithmetic in fp32 elsewhere."""
    n = qweight.shape[0]
    if _fp8_scaled_mm_shape(out_dtype, qweight, scales) and _has_fp8_tensor_cores(xq.device):
        return torch._scaled_mm(xq, qweight.view(torch.float8_e4m3fn).t(), scale_a=x_scale.contiguous(),
                                scale_b=scales.view(1, n), bias=bias, out_dtype=out_dtype)
    w = _dequantize(qweight, scales, None, WEIGHT_FORMATS["fp8"], torch.float32)
    out = (xq.float() * x_scale) @ w.t()
    if bias is not None:
        out += bias.float()
    return out.to(out_dtype)


def _quant_linear_impl(x, qweight, scales, zeros, bias, fmt, input_scale):
    _check(x, qweight, scales, zeros, bias, fmt, input_scale)
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    m, n = x.shape[0], qweight.shape[0]
    tensor_cores = x.device.type == "cuda" and fmt != WEIGHT_FORMATS["fp8"] and x.dtype != torch.float32
    max_rows = TC_MAX_ROWS if tensor_cores else GEMV_MAX_ROWS
    if fmt == WEIGHT_FORMATS["fp8"]:
        max_rows = fp8_weight_only_rows(x, qweight, scales)
    if m <= max_rows:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        if m == 0 or native.quant_linear(capsule(out), capsule(x), capsule(qweight), capsule(scales),
                                         None if zeros is None else capsule(zeros),
                                         None if bias is None else capsule(bias), fmt, stream_of(x)):
            return out
    if fmt == WEIGHT_FORMATS["fp8"] and m > max_rows:
        return _fp8_linear(x, qweight, scales, bias, input_scale)
    return F.linear(x, _dequantize(qweight, scales, zeros, fmt, x.dtype), bias)


def _dequantize_impl(qweight, scales, zeros, fmt, dtype):
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype} is not supported; expected float32, float16 or bfloat16")
    return _dequantize(qweight, scales, zeros, fmt, dtype)


for _key in ("CPU", "CUDA"):
    lib.impl("quant_linear", _quant_linear_impl, _key)
    lib.impl("dequantize_weight", _dequantize_impl, _key)


@torch.library.register_fake("tidal::quant_linear")
def _quant_linear_fake(x, qweight, scales, zeros, bias, fmt, input_scale):
    _check(x, qweight, scales, zeros, bias, fmt, input_scale)
    return x.new_empty((x.shape[0], qweight.shape[0]))


@torch.library.register_fake("tidal::dequantize_weight")
def _dequantize_fake(qweight, scales, zeros, fmt, dtype):
    return qweight.new_empty((qweight.shape[0], _in_features(qweight, fmt)), dtype=dtype)


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, format: str = "int8",
                 input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T (+ bias)`` for ``x`` [..., k] and the quantized weight ``w`` [n, k] (see the module
    docstring for the layouts); returns [..., n] in x's dtype. ``input_scale``: a static per-tensor
    FP8 activation scale (``"fp8"`` only; None quantizes activations per token). Not differentiable."""
    fmt = _format_code(format)
    rows = x.reshape(-1, x.shape[-1])
    if is_eager_call(rows, qweight):
        out = _quant_linear_impl(rows, qweight, scales, zeros, bias, fmt, input_scale)
    else:
        out = torch.ops.tidal.quant_linear(rows, qweight, scales, zeros, bias, fmt, input_scale)
    return out.reshape(*x.shape[:-1], qweight.shape[0])


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                      format: str = "int8", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight ``w`` [n, k] = (code - zero) * scale, rounded once to ``dtype``."""
    fmt = _format_code(format)
    if is_eager_call(qweight):
        return _dequantize_impl(qweight, scales, zeros, fmt, dtype)
    return torch.ops.tidal.dequantize_weight(qweight, scales, zeros, fmt, dtype)
