"""The gated activation of Llama-family MLPs as a torch op (``torch.ops.tidal.silu_and_mul``).

One Python function serves the CPU and CUDA dispatch keys: it shapes the input into rows and calls
the native core, which dispatches by device to the CPU or CUDA kernel.
"""

import torch

from tidal.ops._lib import as_rows, capsule, is_eager_call, lib, native, stream_of

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

lib.define("silu_and_mul(Tensor x) -> Tensor")


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


for _key in ("CPU", "CUDA"):
    lib.impl("silu_and_mul", _silu_and_mul_impl, _key)


@torch.library.register_fake("tidal::silu_and_mul")
def _silu_and_mul_fake(x):
    _check(x)
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


# ---- autograd: computed in fp32 from the saved input, like the forward -----------------------------

def _silu_and_mul_setup(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x)


def _silu_and_mul_backward(ctx, grad):
    """d/dg silu(g) u = u s (1 + g (1 - s)) and d/du = g s, with s = sigmoid(g)."""
    (x,) = ctx.saved_tensors
    d = x.shape[-1] // 2
    g, u, gf = x[..., :d].float(), x[..., d:].float(), grad.float()
    s = torch.sigmoid(g)
    return torch.cat((gf * u * s * (1 + g * (1 - s)), gf * g * s), dim=-1).to(x.dtype)


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
