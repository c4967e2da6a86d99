"""The gated activation of Llama-family MLPs as a torch op (``torch.ops.tidal.silu_and_mul``).

One Python function serves the CPU and CUDA dispatch keys: it shapes the input into rows and calls
the native core, which dispatches by device to the CPU or CUDA kernel.
"""

import torch

from tidal.ops._lib import as_rows, capsule, is_eager_call, lib, native, stream_of

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

lib.define("silu_and_mul(Tensor x) -> Tensor")
lib.define("silu_and_mul_backward(Tensor grad, Tensor x) -> Tensor")
lib.define("silu_and_mul_backward_recompute(Tensor grad, Tensor x) -> (Tensor, Tensor)")


def _check(x: torch.Tensor) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x.dtype={x.dtype} is not supported; expected float32, float16 or bfloat16")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., 2 * d], got a 0-d tensor")
    if x.shape[-1] % 2:
        raise ValueError(f"x.shape[-1]={x.shape[-1]} must be even: x is [..., 2 * d]")


def _silu_and_mul_impl(x: torch.Tensor) -> torch.Tensor:
    _check(x)
    out = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rows = as_rows(x, "x")
    native.silu_and_mul(capsule(out.view(rows.shape[0], -1)), capsule(rows), stream_of(x))
    return out


def _backward(grad: torch.Tensor, x: torch.Tensor, recompute: bool):
    _check(x)
    if grad.shape != (*x.shape[:-1], x.shape[-1] // 2):
        raise ValueError(f"grad.shape={tuple(grad.shape)} must be x.shape[:-1] + (x.shape[-1] // 2,) = "
                         f"{(*x.shape[:-1], x.shape[-1] // 2)}")
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(grad.shape, dtype=x.dtype, device=x.device) if recompute else None
    if grad_x.numel() == 0:
        return grad_x, out
    rows, grad_rows = as_rows(x, "x"), as_rows(grad.to(x.dtype), "grad")
    native.silu_and_mul_backward(capsule(grad_x.view(rows.shape)), capsule(grad_rows), capsule(rows), stream_of(x),
                                 None if out is None else capsule(out.view(grad_rows.shape)))
    return grad_x, out


def _silu_and_mul_backward_impl(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _backward(grad, x, False)[0]


def _silu_and_mul_backward_recompute_impl(grad: torch.Tensor, x: torch.Tensor):
    return _backward(grad, x, True)


for _key in ("CPU", "CUDA"):
    lib.impl("silu_and_mul", _silu_and_mul_impl, _key)
    lib.impl("silu_and_mul_backward", _silu_and_mul_backward_impl, _key)
    lib.impl("silu_and_mul_backward_recompute", _silu_and_mul_backward_recompute_impl, _key)


@torch.library.register_fake("tidal::silu_and_mul")
def _silu_and_mul_fake(x):
    _check(x)
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.register_fake("tidal::silu_and_mul_backward")
def _silu_and_mul_backward_fake(grad, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("tidal::silu_and_mul_backward_recompute")
def _silu_and_mul_backward_recompute_fake(grad, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format), grad.new_empty(grad.shape, dtype=x.dtype)


# ---- autograd: computed in fp32 from the saved input, like the forward -----------------------------

def _silu_and_mul_setup(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x)


def _silu_and_mul_backward(ctx, grad):
    """d/dg silu(g) u = u s (1 + g (1 - s)) and d/du = g s, with s = sigmoid(g): one fused kernel
    (torch.ops.tidal.silu_and_mul_backward), fp32 math, one rounding."""
    (x,) = ctx.saved_tensors
    return torch.ops.tidal.silu_and_mul_backward(grad, x)


torch.library.register_autograd("tidal::silu_and_mul", _silu_and_mul_backward, setup_context=_silu_and_mul_setup)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    r"""SiLU-gated product of the two halves of the last dimension (the Llama MLP activation).

    .. math:: \mathrm{out} = \mathrm{silu}(x_{[..., :d]}) \odot x_{[..., d:]}, \qquad
              \mathrm{silu}(g) = \frac{g}{1 + e^{-g}}

    computed in fp32 and rounded once to ``x.dtype``.

    Parameters
    ----------
    x : torch.Tensor
        ``[..., 2 * d]``, float32 / float16 / bfloat16, any strides (gate half first, as in a fused
        ``gate_up_proj`` output).

    Returns
    -------
    torch.Tensor
        A new contiguous ``[..., d]`` tensor of ``x.dtype``. Differentiable: the gradient is
        computed in fp32 from the saved input and rounded once to ``x.dtype``.
    """
    if is_eager_call(x):
        return _silu_and_mul_impl(x)
    return torch.ops.tidal.silu_and_mul(x)


def silu_and_mul_backward(grad: torch.Tensor, x: torch.Tensor,
                          recompute: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""The gradient of :func:`silu_and_mul` with respect to its input, and optionally its output.

    With ``x = [g | u]`` and :math:`s = \mathrm{sigmoid}(g)`:
    :math:`\partial/\partial g = \mathrm{grad}\, u\, s (1 + g (1 - s))`,
    :math:`\partial/\partial u = \mathrm{grad}\, g\, s`, in fp32, rounded once to ``x.dtype``.

    Parameters
    ----------
    grad : torch.Tensor
        ``[..., d]``, the gradient of silu_and_mul's output (cast to ``x.dtype``).
    x : torch.Tensor
        ``[..., 2 * d]``, silu_and_mul's input.
    recompute : bool
        Also return ``silu_and_mul(x)``, computed in the same pass, equal bit for bit to what the
        forward kernel returns: a training step that did not keep the activation gets it back for
        the weight gradient of the projection it fed.

    Returns
    -------
    tuple
        ``(grad_x, out)``: ``grad_x`` like ``x`` (contiguous); ``out`` ``[..., d]`` or None.
    """
    if is_eager_call(grad, x):
        return _backward(grad, x, recompute)
    if recompute:
        return torch.ops.tidal.silu_and_mul_backward_recompute(grad, x)
    return torch.ops.tidal.silu_and_mul_backward(grad, x), None
