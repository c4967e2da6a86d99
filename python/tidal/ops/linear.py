"""A linear layer for a few rows with its neighbours fused in, as torch ops
(``torch.ops.tidal.skinny_linear`` and ``torch.ops.tidal.skinny_linear_add_``).

``f(x) @ weight.T (+ bias)``, where f is the identity, ``rms_norm(x, norm_weight, eps)`` or
``silu_and_mul(x)`` (``gated``); the result is returned, or added into ``residual`` in place. On a GPU,
for at most 4 rows, one kernel does all of it (decode at small batch: a Llama layer becomes four
of these plus rotary and attention); otherwise, and on the CPU, the unfused ops run: the same
rounding of f(x), a matmul, an add. The weight may be quantized (``weight_format``, with its
``scales`` and ``zeros``: tidal.ops.quant's layouts), then computed as ``quant_linear`` computes it;
on sm_90 GPUs the fused kernel streams its codes.
"""

import torch
import torch.nn.functional as F

from tidal.ops._lib import capsule, is_eager_call, lib, native, stream_of
from tidal.ops.activation import silu_and_mul
from tidal.ops.norm import rms_norm
from tidal.ops.quant import _format_code, _in_features, _quant_linear_impl

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_ROWS = 4  # the fused kernel's limit; more rows take the unfused ops

lib.define("skinny_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? norm_weight, float eps, bool gated, "
           "ScalarType? out_dtype, Tensor? prefetch=None, int weight_format=-1, Tensor? scales=None, "
           "Tensor? zeros=None) -> Tensor")
lib.define("skinny_linear_add_(Tensor x, Tensor weight, Tensor? bias, Tensor? norm_weight, float eps, bool gated, "
           "Tensor(a!) residual, Tensor? prefetch=None, int weight_format=-1, Tensor? scales=None, "
           "Tensor? zeros=None) -> ()")
DENSE = -1  # weight_format of a dense weight in the ops' schemas


def _check(x, weight, bias, norm_weight, eps, gated, out_shape_dtype=None, residual=None, prefetch=None,
           fmt=DENSE, scales=None, zeros=None):
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x.dtype={x.dtype} is not supported; expected float32, float16 or bfloat16")
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x and weight must be 2-D, got x.shape={tuple(x.shape)}, weight.shape={tuple(weight.shape)}")
    n, k = weight.shape[0], _in_features(weight, fmt)
    if x.shape[1] != (2 * k if gated else k):
        raise ValueError(f"x.shape={tuple(x.shape)} must be [m, {2 * k if gated else k}] for weight.shape="
                         f"{tuple(weight.shape)}{' (gated: silu_and_mul halves x)' if gated else ''}")
    if fmt == DENSE:
        if scales is not None or zeros is not None:
            raise ValueError("scales and zeros belong to a quantized weight: pass weight_format too")
    else:
        if scales is None:
            raise ValueError("a quantized weight needs its scales [n, num_groups] (float32)")
        if out_shape_dtype is not None and out_shape_dtype != x.dtype:
            raise ValueError(f"out_dtype={out_shape_dtype} must be x.dtype={x.dtype} with a quantized weight")
        for name, t in (("weight", weight), ("scales", scales), ("zeros", zeros)):
            if t is not None and t.device != x.device:
                raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    for name, t in ((("weight", weight),) if fmt == DENSE else ()) + (
            ("bias", bias), ("norm_weight", norm_weight), ("residual", residual)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise ValueError(f"{name}.dtype={t.dtype} must equal x.dtype={x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias.shape={tuple(bias.shape)} must be (n,) = ({n},)")
    if norm_weight is not None:
        if gated:
            raise ValueError("norm_weight and gated=True are exclusive: f is one of rms_norm and silu_and_mul")
        if norm_weight.shape != (k,):
            raise ValueError(f"norm_weight.shape={tuple(norm_weight.shape)} must be (k,) = ({k},)")
        if not (eps >= 0.0 and eps != float("inf")):
            raise ValueError(f"eps={eps} must be finite and >= 0")
    if residual is not None and residual.shape != (x.shape[0], n):
        raise ValueError(f"residual.shape={tuple(residual.shape)} must be [m, n] = [{x.shape[0]}, {n}]")
    if prefetch is not None:
        if prefetch.dim() != 2 or prefetch.stride(-1) != 1:
            raise ValueError(f"prefetch must be a 2-D weight with contiguous rows, got shape={tuple(prefetch.shape)} "
                             f"strides={prefetch.stride()}")
        if prefetch.device != x.device:
            raise ValueError(f"prefetch is on {prefetch.device} but x is on {x.device}")
    if out_shape_dtype is not None and out_shape_dtype not in (x.dtype, torch.float32):
        raise ValueError(f"out_dtype={out_shape_dtype} must be x.dtype={x.dtype} or torch.float32")


def _prologue(norm_weight, gated) -> int:
    return 2 if gated else 1 if norm_weight is not None else 0


def _fused(x, weight, bias, norm_weight, eps, gated, out, residual, prefetch=None, fmt=DENSE, scales=None,
           zeros=None) -> bool:
    """Runs the fused kernel when it takes these tensors; False (nothing written) otherwise."""
    if x.device.type != "cuda" or x.shape[0] > MAX_ROWS or x.stride(-1) != 1 or weight.stride(-1) != 1:
        return False
    if fmt != DENSE and x.dtype == torch.float32:  # the quantized kernel takes 16-bit x
        return False
    opt = lambda t: None if t is None else capsule(t)  # noqa: E731
    return native.skinny_linear(opt(out), opt(residual), capsule(x), capsule(weight), opt(bias),
                                opt(None if norm_weight is None else norm_weight.contiguous()),
                                _prologue(norm_weight, gated), float(eps), stream_of(x), opt(prefetch),
                                fmt, opt(scales), opt(zeros))


def _unfused(x, weight, bias, norm_weight, eps, gated, out_dtype=None, fmt=DENSE, scales=None,
             zeros=None) -> torch.Tensor:
    h = silu_and_mul(x) if gated else rms_norm(x, norm_weight, eps) if norm_weight is not None else x
    if fmt != DENSE:
        return _quant_linear_impl(h, weight, scales, zeros, bias, fmt, None)
    if out_dtype is not None and out_dtype != x.dtype:  # float32 out: the products unrounded, as fused
        return F.linear(h.to(out_dtype), weight.to(out_dtype), None if bias is None else bias.to(out_dtype))
    return F.linear(h, weight, bias)


def _skinny_linear_impl(x, weight, bias, norm_weight, eps, gated, out_dtype, prefetch=None, weight_format=DENSE,
                        scales=None, zeros=None):
    q = dict(fmt=weight_format, scales=scales, zeros=zeros)
    _check(x, weight, bias, norm_weight, eps, gated, out_shape_dtype=out_dtype, prefetch=prefetch, **q)
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=out_dtype or x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if _fused(x, weight, bias, norm_weight, eps, gated, out, None, prefetch, **q):
        return out
    return out.copy_(_unfused(x, weight, bias, norm_weight, eps, gated, out_dtype, **q))


def _skinny_linear_add_impl(x, weight, bias, norm_weight, eps, gated, residual, prefetch=None, weight_format=DENSE,
                            scales=None, zeros=None):
    q = dict(fmt=weight_format, scales=scales, zeros=zeros)
    _check(x, weight, bias, norm_weight, eps, gated, residual=residual, prefetch=prefetch, **q)
    if residual.numel() == 0:
        return
    if residual.stride(-1) == 1 and _fused(x, weight, bias, norm_weight, eps, gated, None, residual, prefetch, **q):
        return
    residual.add_(_unfused(x, weight, bias, norm_weight, eps, gated, **q))


for _key in ("CPU", "CUDA"):
    lib.impl("skinny_linear", _skinny_linear_impl, _key)
    lib.impl("skinny_linear_add_", _skinny_linear_add_impl, _key)


@torch.library.register_fake("tidal::skinny_linear")
def _skinny_linear_fake(x, weight, bias, norm_weight, eps, gated, out_dtype, prefetch=None, weight_format=DENSE,
                        scales=None, zeros=None):
    _check(x, weight, bias, norm_weight, eps, gated, out_shape_dtype=out_dtype, prefetch=prefetch, fmt=weight_format,
           scales=scales, zeros=zeros)
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype or x.dtype)


@torch.library.register_fake("tidal::skinny_linear_add_")
def _skinny_linear_add_fake(x, weight, bias, norm_weight, eps, gated, residual, prefetch=None, weight_format=DENSE,
                            scales=None, zeros=None):
    _check(x, weight, bias, norm_weight, eps, gated, residual=residual, prefetch=prefetch, fmt=weight_format,
           scales=scales, zeros=zeros)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  norm_weight: torch.Tensor | None = None, eps: float = 1e-6, gated: bool = False,
                  residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                  out: torch.Tensor | None = None, prefetch: torch.Tensor | None = None,
                  weight_format: str | None = None, scales: torch.Tensor | None = None,
                  zeros: torch.Tensor | None = None) -> torch.Tensor:
    """``f(x) @ weight.T (+ bias)`` for ``x`` [m, k] (``gated``: [m, 2k]) and ``weight`` [n, k].

    f: ``rms_norm(x, norm_weight, eps)`` when ``norm_weight`` is given, ``silu_and_mul(x)`` when
    ``gated``, else the identity; each rounded to x's dtype as those ops round. With ``residual``
    ([m, n], x's dtype) the result is added into it in place and ``residual`` is returned; otherwise
    a new [m, n] tensor in ``out_dtype`` (x's dtype, the default, or float32: the fp32 sums
    unrounded). ``out`` ([m, n], x's dtype or float32): written instead of a new tensor, and
    returned. ``prefetch``: the weight the next op in the stream reads (say the next projection's):
    on sm_90 the kernel has L2 fetch its first bytes early; a hint that never changes the result.
    ``weight_format`` ("int8", "int4" or "fp8"): ``weight`` holds a quantized weight's codes, with
    its ``scales`` and (int4) ``zeros``, in tidal.ops.quant's layouts; the product is
    ``quant_linear``'s (out in x's dtype). Not differentiable (serving).
    """
    fmt = DENSE if weight_format is None else _format_code(weight_format, "weight_format")
    q = dict(fmt=fmt, scales=scales, zeros=zeros)
    if out is not None:
        if residual is not None:
            raise ValueError("pass at most one of out and residual")
        _check(x, weight, bias, norm_weight, eps, gated, out_shape_dtype=out.dtype, prefetch=prefetch, **q)
        n = weight.shape[0]
        if out.shape != (x.shape[0], n):
            raise ValueError(f"out.shape={tuple(out.shape)} must be [m, n] = [{x.shape[0]}, {n}]")
        if out.device != x.device:
            raise ValueError(f"out is on {out.device} but x is on {x.device}")
        if out.numel() and not (out.stride(-1) == 1 and
                                _fused(x, weight, bias, norm_weight, eps, gated, out, None, prefetch, **q)):
            out.copy_(_unfused(x, weight, bias, norm_weight, eps, gated, out.dtype, **q))
        return out
    args = (prefetch, fmt, scales, zeros)
    if residual is not None:
        if is_eager_call(x, weight, residual):
            _skinny_linear_add_impl(x, weight, bias, norm_weight, eps, gated, residual, *args)
        else:
            torch.ops.tidal.skinny_linear_add_(x, weight, bias, norm_weight, eps, gated, residual, *args)
        return residual
    if is_eager_call(x, weight):
        return _skinny_linear_impl(x, weight, bias, norm_weight, eps, gated, out_dtype, *args)
    return torch.ops.tidal.skinny_linear(x, weight, bias, norm_weight, eps, gated, out_dtype, *args)
