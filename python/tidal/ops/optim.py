"""The fused Adam/AdamW step over flat fp32 tensors as a torch op (``torch.ops.tidal.adam_step_``).

One pass updates param and both moments in place with torch.optim's single-tensor arithmetic order;
the CPU kernel is the one optimizer offload uses; the CUDA kernel is one launch over the buffers.
"""

import math

import torch

from tidal.ops._lib import capsule, is_eager_call, lib, native, stream_of

lib.define(
    "adam_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, int step, float lr, "
    "float beta1, float beta2, float eps, float weight_decay, bool decoupled, float grad_scale=1.0, "
    "Tensor(d!)? param_copy=None) -> ()")

_NAMES = ("param", "grad", "exp_avg", "exp_avg_sq")


_COPY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(tensors, step, lr, beta1, beta2, eps, weight_decay, grad_scale, param_copy=None) -> None:
    param = tensors[0]
    if param_copy is not None:
        if param_copy.dtype not in _COPY_DTYPES:
            raise ValueError(f"param_copy.dtype={param_copy.dtype} must be float32, float16 or bfloat16")
        if not param_copy.is_contiguous():
            raise ValueError(f"param_copy must be contiguous (a flat buffer), got strides {param_copy.stride()}")
        if param_copy.numel() != param.numel():
            raise ValueError(f"param_copy.numel()={param_copy.numel()} must equal param.numel()={param.numel()}")
        if param_copy.device != param.device:
            raise ValueError(f"param_copy is on {param_copy.device} but param is on {param.device}")
    for name, t in zip(_NAMES, tensors):
        if name == "grad":
            if t.dtype not in _COPY_DTYPES:
                raise ValueError(f"grad.dtype={t.dtype} must be float32, float16 or bfloat16")
        elif t.dtype != torch.float32:
            raise ValueError(f"{name}.dtype={t.dtype} must be torch.float32")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (a flat buffer), got strides {t.stride()}")
        if t.numel() != param.numel():
            raise ValueError(f"{name}.numel()={t.numel()} must equal param.numel()={param.numel()}")
        if t.device != param.device:
            raise ValueError(f"{name} is on {t.device} but param is on {param.device}")
    if step < 1:
        raise ValueError(f"step={step} must be >= 1 (steps count from 1)")
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr={lr} must be finite and >= 0")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name}={beta} must be in [0, 1)")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps={eps} must be finite and > 0")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay={weight_decay} must be finite and >= 0")
    if not (math.isfinite(grad_scale) and grad_scale > 0):
        raise ValueError(f"grad_scale={grad_scale} must be finite and > 0")


def _adam_step_impl(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, decoupled,
                    grad_scale=1.0, param_copy=None):
    tensors = (param, grad, exp_avg, exp_avg_sq)
    _check(tensors, step, lr, beta1, beta2, eps, weight_decay, grad_scale, param_copy)
    native.adam_step(*(capsule(t) for t in tensors), step, lr, beta1, beta2, eps, weight_decay, decoupled,
                     grad_scale, stream_of(param), None if param_copy is None else capsule(param_copy))


for _key in ("CPU", "CUDA"):
    lib.impl("adam_step_", _adam_step_impl, _key)


@torch.library.register_fake("tidal::adam_step_")
def _adam_step_fake(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, decoupled,
                    grad_scale=1.0, param_copy=None):
    _check((param, grad, exp_avg, exp_avg_sq), step, lr, beta1, beta2, eps, weight_decay, grad_scale, param_copy)


def adam_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               decoupled: bool, grad_scale: float = 1.0, param_copy: torch.Tensor | None = None) -> None:
    r"""One fused Adam / AdamW step, in place on flat fp32 buffers (a ZeRO shard or one parameter).

    .. math::
        g &= \mathrm{grad} / s \\
        \text{AdamW: } p &\leftarrow p (1 - \eta \lambda) \qquad \text{Adam: } g \leftarrow g + \lambda p \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g \qquad v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        p &\leftarrow p - \frac{\eta}{1 - \beta_1^t} \, \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon}

    in torch.optim's single-tensor (``foreach=False``) order, so the results equal
    ``torch.optim.AdamW`` (``decoupled=True``) / ``torch.optim.Adam`` (``decoupled=False``) to fp32
    rounding (amsgrad, maximize off).

    Parameters
    ----------
    param, exp_avg, exp_avg_sq : torch.Tensor
        float32, contiguous, same numel and device; updated in place.
    grad : torch.Tensor
        float32, or the 16-bit compute dtype (float16 / bfloat16, widened exactly as it is read);
        contiguous, same numel and device; read only.
    step : int
        The step being taken, from 1 (the bias corrections use it).
    lr, beta1, beta2, eps, weight_decay : float
        ``lr >= 0``, ``0 <= beta < 1``, ``eps > 0``, ``weight_decay >= 0``.
    decoupled : bool
        True for AdamW's decoupled weight decay, False for Adam's L2 term.
    grad_scale : float
        The loss scale to undo: grad is multiplied by ``1 / grad_scale`` (rounded to fp32) first.
    param_copy : torch.Tensor, optional
        float32 / float16 / bfloat16, contiguous, same numel and device: receives the updated
        ``param`` rounded to its dtype in the same pass (mixed precision's compute-dtype weights),
        instead of a separate copy over memory afterwards.
    """
    tensors = (param, grad, exp_avg, exp_avg_sq) + (() if param_copy is None else (param_copy,))
    if is_eager_call(*tensors):
        return _adam_step_impl(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay,
                               decoupled, grad_scale, param_copy)
    torch.ops.tidal.adam_step_(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay,
                               decoupled, grad_scale, param_copy)
