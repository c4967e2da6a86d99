"""Autograd functions of the training forward that keep less for the backward pass.

Each one spans a cheap elementwise op and the op next to it, and keeps only what the backward pass
needs anyway; the elementwise result is recomputed there, bit for bit, by the same kernel:

- :func:`norm_linear`: ``linear(rms_norm(x))`` keeps ``x`` (the residual stream, kept anyway), not
  the normalised copy the linear would otherwise save.
- :func:`gated_linear`: ``linear(silu_and_mul(gate_up))`` keeps ``gate_up`` (which silu_and_mul's
  own backward needs), not the activation; the backward kernel recomputes it in the same pass as the
  activation's gradient.
- :func:`rotary_qkv_`: rotary embedding applied in place to the query and key columns of a fused
  qkv projection output, so attention reads q, k and v as views of one buffer (no copies of q and k,
  and the buffer is all attention keeps).

For Llama-3.2-1B (hidden 2048, intermediate 8192, 8 kv heads of 64) the bf16 activations a layer
keeps per token go from 79 KiB to 50 KiB: the two normalised inputs (4 KiB each), the activation
(16 KiB) and the copies of q and k (5 KiB) are no longer kept.

The gradients equal those of the unfused ops bit for bit (the same kernels and GEMMs in the same
order). Bias gradients are summed in the model dtype as ``F.linear``'s backward sums them.
"""

import torch

from tidal import ops


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` into a fresh tensor of its own (F.linear over a 3-D input may
    return a view of a 2-D result; a custom function's output must not be a view that later code
    modifies in place, as rotary_qkv_ does)."""
    out = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)
    rows = x.reshape(-1, x.shape[-1])
    if bias is None:
        torch.mm(rows, weight.t(), out=out.view(-1, weight.shape[0]))
    else:
        torch.addmm(bias, rows, weight.t(), out=out.view(-1, weight.shape[0]))
    return out


def _weight_grads(grad_out: torch.Tensor, inputs: torch.Tensor, needs_weight: bool, needs_bias: bool):
    """(grad_weight, grad_bias) of ``linear(inputs)`` from ``grad_out`` [rows, out]."""
    grad_weight = grad_out.t() @ inputs if needs_weight else None
    grad_bias = grad_out.sum(0) if needs_bias else None
    return grad_weight, grad_bias


class _NormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, eps: float, weight, bias):
        out = _linear(ops.rms_norm(x, norm_weight, eps), weight, bias)
        ctx.save_for_backward(x, norm_weight, weight)
        ctx.eps, ctx.has_bias = eps, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, norm_weight, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = grad_bias = None
        if needs[3] or needs[4]:
            normed = ops.rms_norm(x, norm_weight, ctx.eps).reshape(-1, x.shape[-1]) if needs[3] else None
            grad_weight, grad_bias = _weight_grads(rows, normed, needs[3], needs[4] and ctx.has_bias)
            del normed
        grad_x = grad_norm_weight = None
        if needs[0] or needs[1]:
            grad_normed = (rows @ weight).view(x.shape)
            grad_x, grad_norm_weight = torch.ops.tidal.rms_norm_backward(grad_normed, x, norm_weight, ctx.eps)
            grad_norm_weight = grad_norm_weight.to(norm_weight.dtype)
        return grad_x, grad_norm_weight, None, grad_weight, grad_bias


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(ops.rms_norm(x, norm_weight, eps), weight, bias)``, differentiable, keeping ``x``
    instead of the normalised input for the backward pass (recomputed there)."""
    return _NormLinear.apply(x, norm_weight, eps, weight, bias)


class _GatedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, weight, bias):
        out = _linear(ops.silu_and_mul(gate_up), weight, bias)
        ctx.save_for_backward(gate_up, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate_up, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_gate_up = activation = None
        if needs[0]:
            grad_activation = rows @ weight
            grad_gate_up, activation = ops.silu_and_mul_backward(grad_activation.view(*gate_up.shape[:-1], -1),
                                                                 gate_up, recompute=needs[1])
            del grad_activation
        elif needs[1]:
            activation = ops.silu_and_mul(gate_up)
        grad_weight, grad_bias = None, None
        if needs[1] or needs[2]:
            inputs = activation.reshape(-1, activation.shape[-1]) if needs[1] else None
            grad_weight, grad_bias = _weight_grads(rows, inputs, needs[1], needs[2] and ctx.has_bias)
        return grad_gate_up, grad_weight, grad_bias


def gated_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(ops.silu_and_mul(gate_up), weight, bias)`` (a gated MLP's down projection),
    differentiable, keeping ``gate_up`` but not the activation for the backward pass."""
    return _GatedLinear.apply(gate_up, weight, bias)


class _RotaryQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, positions, table, inverse_table, num_heads: int, num_kv_heads: int, head_dim: int):
        q, k = _query_key(qkv, num_heads, num_kv_heads, head_dim)
        ops.rotary_embedding_(positions, q, k, head_dim, table, True)
        ctx.mark_dirty(qkv)
        ctx.save_for_backward(positions, inverse_table)
        ctx.heads = (num_heads, num_kv_heads, head_dim)
        return qkv

    @staticmethod
    def backward(ctx, grad):
        positions, inverse_table = ctx.saved_tensors
        # NOTE(tidal): rotated in place. The gradient arrives as the buffer split()'s backward
        # concatenates from the q, k and v gradients, which nothing else holds; anything else gets a copy.
        if not grad.is_contiguous():
            grad = grad.contiguous()
        q, k = _query_key(grad, *ctx.heads)
        ops.rotary_embedding_(positions, q, k, ctx.heads[2], inverse_table, True)
        return grad, None, None, None, None, None, None


def _query_key(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    rows = qkv.view(-1, qkv.shape[-1])
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    return (rows[:, :q_size].view(-1, num_heads, head_dim),
            rows[:, q_size:q_size + kv_size].view(-1, num_kv_heads, head_dim))


def inverse_rotary_table(table: torch.Tensor) -> torch.Tensor:
    """The table of the opposite rotation (sines negated): the transpose of rotary embedding, what
    its backward pass applies to the gradients."""
    half = table.shape[1] // 2
    return torch.cat((table[:, :half], -table[:, half:]), dim=1)


def rotary_qkv_(qkv: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, inverse_table: torch.Tensor,
                num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Neox rotary embedding of the q and k columns of ``qkv`` ([..., (num_heads + 2 num_kv_heads)
    head_dim], contiguous; q then k then v) in place, differentiable; ``positions`` [rows of qkv]
    index ``table`` (cos then sin halves, fp32) and ``inverse_table`` = inverse_rotary_table(table).
    Returns ``qkv``."""
    if not qkv.is_contiguous():
        raise ValueError(f"qkv must be contiguous, got strides {qkv.stride()}")
    if qkv.shape[-1] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"qkv.shape[-1]={qkv.shape[-1]} must be (num_heads + 2 * num_kv_heads) * head_dim = "
                         f"{(num_heads + 2 * num_kv_heads) * head_dim}")
    return _RotaryQKV.apply(qkv, positions, table, inverse_table, num_heads, num_kv_heads, head_dim)
