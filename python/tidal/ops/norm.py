"""RMSNorm and residual-add + RMSNorm as torch ops (``torch.ops.tidal.rms_norm`` and friends).

The CPU and CUDA implementations are the same Python function: it shapes the tensors into rows and
calls the native core, which dispatches by device. Fake implementations serve ``torch.compile``;
the functional ops carry an autograd formula for training.
"""

import functools

import torch

from tidal.ops._lib import as_rows, capsule, is_eager_call, lib, native, stream_of

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

lib.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
lib.define("fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)")
lib.define("fused_add_rms_norm_(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()")
lib.define("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)")


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x.dtype={x.dtype} is not supported; expected float32, float16 or bfloat16")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., hidden_size], got a 0-d tensor")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight.shape={tuple(weight.shape)} must be (hidden_size,) = ({x.shape[-1]},)")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight.dtype={weight.dtype} must equal x.dtype={x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if not (eps >= 0.0 and eps != float("inf")):
        raise ValueError(f"eps={eps} must be finite and >= 0")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual.shape={tuple(residual.shape)} must equal x.shape={tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"residual.dtype={residual.dtype} must equal x.dtype={x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")


def _rms_norm_impl(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check(x, weight, eps)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rows = as_rows(x, "x")
    native.rms_norm(capsule(out.view(rows.shape)), capsule(rows), capsule(weight.contiguous()), eps, stream_of(x))
    return out


def _fused_add_rms_norm_impl(x, residual, weight, eps):
    _check(x, weight, eps, residual)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out, residual_out
    rows, res_rows = as_rows(x, "x"), as_rows(residual, "residual")
    native.fused_add_rms_norm(
        capsule(out.view(rows.shape)), capsule(residual_out.view(rows.shape)), capsule(rows), capsule(res_rows),
        capsule(weight.contiguous()), eps, stream_of(x))
    return out, residual_out


def _rows_view(t: torch.Tensor) -> torch.Tensor | None:
    """A [num_tokens, hidden_size] view of ``t`` the kernel can write through, or None."""
    try:
        rows = t.view(-1, t.shape[-1])
    except RuntimeError:
        return None
    return rows if rows.shape[-1] <= 1 or rows.stride(-1) == 1 else None


def _fused_add_rms_norm_inplace_impl(x, residual, weight, eps):
    _check(x, weight, eps, residual)
    if x.numel() == 0:
        return
    rows, res_rows = _rows_view(x), _rows_view(residual)
    if rows is None or res_rows is None:
        out, residual_out = _fused_add_rms_norm_impl(x, residual, weight, eps)
        x.copy_(out)
        residual.copy_(residual_out)
        return
    native.fused_add_rms_norm(capsule(rows), capsule(res_rows), capsule(rows), capsule(res_rows),
                              capsule(weight.contiguous()), eps, stream_of(x))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _backward_parts(x: torch.Tensor, num_tokens: int) -> int:
    """How many contiguous parts rms_norm_backward splits the rows into (one weight-gradient
    partial each): 4 blocks per SM on a GPU, one part per thread on the CPU."""
    if x.device.type == "cuda":
        per_device = 4 * _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    else:
        per_device = torch.get_num_threads()
    return max(1, min(num_tokens, per_device))


def _rms_norm_backward_impl(grad, x, weight, eps):
    """(grad_x in x's dtype, grad_weight in fp32): the fused kernel; the weight gradient's partials
    are summed here."""
    rows = as_rows(x, "x")
    grad_rows = as_rows(grad.to(x.dtype), "grad")
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    partial = torch.empty((_backward_parts(x, rows.shape[0]), x.shape[-1]), dtype=torch.float32, device=x.device)
    if x.shape[-1] == 0:
        return grad_x, partial.sum(0)
    native.rms_norm_backward(capsule(grad_x.view(rows.shape)), capsule(partial), capsule(grad_rows), capsule(rows),
                             capsule(weight.contiguous()), eps, stream_of(x))
    return grad_x, partial.sum(0)


for _key in ("CPU", "CUDA"):
    lib.impl("rms_norm_backward", _rms_norm_backward_impl, _key)
    lib.impl("rms_norm", _rms_norm_impl, _key)
    lib.impl("fused_add_rms_norm", _fused_add_rms_norm_impl, _key)
    lib.impl("fused_add_rms_norm_", _fused_add_rms_norm_inplace_impl, _key)


@torch.library.register_fake("tidal::rms_norm")
def _rms_norm_fake(x, weight, eps):
    _check(x, weight, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("tidal::fused_add_rms_norm")
def _fused_add_rms_norm_fake(x, residual, weight, eps):
    _check(x, weight, eps, residual)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.register_fake("tidal::rms_norm_backward")
def _rms_norm_backward_fake(grad, x, weight, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            weight.new_empty(weight.shape, dtype=torch.float32))


@torch.library.register_fake("tidal::fused_add_rms_norm_")
def _fused_add_rms_norm_inplace_fake(x, residual, weight, eps):
    _check(x, weight, eps, residual)


# ---- autograd: one fused kernel in fp32 from the saved input, like the forward ---------------------

def _rms_norm_grads(x, weight, grad, eps):
    """Gradients of rms_norm w.r.t. x (x's dtype) and weight (fp32):
    grad_x = r (g w - x_hat mean(g w x_hat)), grad_w = sum over rows of g x_hat, r = rsqrt(mean(x^2) + eps)."""
    return torch.ops.tidal.rms_norm_backward(grad, x, weight, eps)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_norm_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x, grad_w = _rms_norm_grads(x, weight, grad, ctx.eps)
    return grad_x, grad_w.to(weight.dtype), None


def _fused_add_rms_norm_setup(ctx, inputs, output):
    _, _, weight, eps = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.eps = eps


def _fused_add_rms_norm_backward(ctx, grad_out, grad_residual_out):
    residual_out, weight = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(residual_out)
    grad_sum, grad_w = _rms_norm_grads(residual_out, weight, grad_out, ctx.eps)
    if grad_residual_out is not None:
        grad_sum = grad_sum + grad_residual_out.to(grad_sum.dtype)
    return grad_sum, grad_sum, grad_w.to(weight.dtype), None


torch.library.register_autograd("tidal::rms_norm", _rms_norm_backward, setup_context=_rms_norm_setup)
torch.library.register_autograd("tidal::fused_add_rms_norm", _fused_add_rms_norm_backward,
                                setup_context=_fused_add_rms_norm_setup)


# ---- public functions ------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    r"""Root-mean-square normalisation over the last dimension.

    .. math:: \mathrm{out} = \frac{x}{\sqrt{\tfrac{1}{d}\sum_{i} x_i^2 + \epsilon}} \odot w

    computed in fp32 and rounded once to ``x.dtype``.

    Parameters
    ----------
    x : torch.Tensor
        ``[..., hidden_size]``, float32 / float16 / bfloat16, any strides.
    weight : torch.Tensor
        ``[hidden_size]``, same dtype and device as ``x``.
    eps : float
        Added to the mean square; finite and >= 0.

    Returns
    -------
    torch.Tensor
        A new contiguous tensor shaped like ``x``. Differentiable w.r.t. ``x`` and ``weight``.
    """
    if is_eager_call(x, weight):
        return _rms_norm_impl(x, weight, eps)
    return torch.ops.tidal.rms_norm(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Residual add fused with RMSNorm: one pass over the data instead of three.

    .. math:: r' = x + r, \qquad \mathrm{out} = \mathrm{rms\_norm}(r', w, \epsilon)

    ``r'`` is rounded to the dtype before it is normalised, exactly as an unfused add would be.

    Returns
    -------
    (out, residual_out) : tuple of torch.Tensor
        New contiguous tensors shaped like ``x``. Differentiable w.r.t. ``x``, ``residual``, ``weight``.
    """
    if is_eager_call(x, residual, weight):
        return _fused_add_rms_norm_impl(x, residual, weight, eps)
    return torch.ops.tidal.fused_add_rms_norm(x, residual, weight, eps)


def fused_add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> None:
    """In-place :func:`fused_add_rms_norm`: ``x`` becomes ``out`` and ``residual`` becomes ``residual_out``.

    The serving form: no allocation, so it can sit inside a captured CUDA graph. ``x`` and
    ``residual`` must not share memory. Not differentiable.
    """
    if is_eager_call(x, residual, weight):
        return _fused_add_rms_norm_inplace_impl(x, residual, weight, eps)
    torch.ops.tidal.fused_add_rms_norm_(x, residual, weight, eps)
