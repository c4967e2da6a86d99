"""The language-model head and its cross-entropy loss fused, for training.

``fused_linear_cross_entropy(hidden, weight, labels)`` equals
``F.cross_entropy((hidden @ weight.T + bias).float(), labels, ignore_index=-100)`` (the mean over the
rows whose label is not ignored) without ever holding the ``[rows, vocab]`` logits: the rows go
through in chunks, and each chunk's gradients with respect to ``hidden`` and ``weight`` are computed
in the same pass as its loss (the softmax minus the one-hot target, scaled by ``1 / valid rows``),
so the backward pass only scales them by the incoming gradient. Peak extra memory is one chunk of
fp32 logits plus the weight's fp32 gradient, instead of the full logits in the model dtype, their
fp32 copy and the softmax saved for the backward pass.
"""

import torch

IGNORE_INDEX = -100
# NOTE(tidal): 8192 rows x a 128k vocabulary of fp32 is 4 GiB; 2048 rows keeps a chunk at 1 GiB for
# the largest vocabularies and large enough for the chunk's GEMMs to run near their peak.
DEFAULT_CHUNK_ROWS = 2048


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_rows: int):
        rows = hidden.shape[0]
        valid_all = labels != IGNORE_INDEX
        # 1 / valid rows, kept on the device: no host synchronisation in the step
        scale = 1.0 / valid_all.sum().clamp(min=1).to(torch.float32)
        needs_grad = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if needs_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad[1] else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
            if bias is not None and needs_grad[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for lo in range(0, rows, chunk_rows):
            h = hidden[lo:lo + chunk_rows]
            logits = (h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())).float()
            target = labels[lo:lo + chunk_rows]
            valid = valid_all[lo:lo + chunk_rows]
            safe = target.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            total += torch.where(valid, lse - picked, 0.0).sum()
            if grad_hidden is None and grad_weight is None and grad_bias is None:
                continue
            # d(mean loss)/d(logits) = (softmax - onehot(target)) / count on valid rows, 0 elsewhere
            d_logits = logits.sub_(lse[:, None]).exp_()
            d_logits[torch.arange(d_logits.shape[0], device=d_logits.device), safe] -= 1.0
            d_logits.mul_((valid.to(torch.float32) * scale)[:, None])
            if grad_bias is not None:
                grad_bias += d_logits.sum(0)
            d_logits = d_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[lo:lo + chunk_rows] = d_logits @ weight
            if grad_weight is not None:  # the product in the model dtype, accumulated in fp32
                grad_weight += (d_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_out.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_out).to(ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_out).to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: torch.Tensor | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` (rows labelled -100
    are ignored; 0 when every row is), without materialising the logits or synchronising the host.

    ``hidden`` [rows, hidden_size] (any leading shape is flattened), ``weight`` [vocab, hidden_size]
    in the same dtype, ``labels`` int64 with hidden's leading shape."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels.shape={tuple(labels.shape)} must equal hidden.shape[:-1]="
                         f"{tuple(hidden.shape[:-1])}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight.shape={tuple(weight.shape)} must be [vocab, {hidden.shape[-1]}]")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight.dtype={weight.dtype} must equal hidden.dtype={hidden.dtype}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be >= 1")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels.dtype={labels.dtype} must be an integer type")
    flat_labels = labels.reshape(-1).long()
    # NOTE(tidal): checked where it costs no device synchronisation; on a GPU an out-of-range label
    # trips the gather's device-side assertion instead.
    if flat_labels.device.type == "cpu":
        bad = (flat_labels != IGNORE_INDEX) & ((flat_labels < 0) | (flat_labels >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"labels holds {int(flat_labels[bad][0])}: labels must be in [0, {weight.shape[0]}) "
                             f"or {IGNORE_INDEX}")
    return _FusedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_labels, chunk_rows)
