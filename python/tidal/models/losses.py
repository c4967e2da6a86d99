"""The language-model head and its cross-entropy loss fused, for training.

``fused_linear_cross_entropy(hidden, weight, labels)`` equals
``F.cross_entropy((hidden @ weight.T + bias).float(), labels, ignore_index=-100)`` (the mean over the
rows whose label is not ignored) without ever holding the ``[rows, vocab]`` logits: the rows go
through in chunks, and each chunk's gradients with respect to ``hidden`` and ``weight`` are computed
in the same pass as its loss (the softmax minus the one-hot target, scaled by ``1 / valid rows``),
so the backward pass only scales them by the incoming gradient. One kernel
(``tidal.ops.softmax_cross_entropy_``) turns a chunk's logits into its losses and overwrites them with
their gradient, in fp32 arithmetic from the stored logits. Peak extra memory is one chunk of logits
in the model dtype plus the weight's fp32 gradient (accumulated over the chunks by the GEMM itself on a
GPU), instead of the full logits, their fp32 copy and
the softmax saved for the backward pass.
"""

import torch

from tidal import ops

IGNORE_INDEX = -100
# NOTE(tidal): 8192 rows x a 128k vocabulary of fp32 is 4 GiB; 2048 rows keeps a chunk at 1 GiB for
# the largest vocabularies and large enough for the chunk's GEMMs to run near their peak.
DEFAULT_CHUNK_ROWS = 2048


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``acc += a @ b`` (``acc = a @ b`` when ``first``: ``acc`` may hold garbage) with ``acc`` fp32
    and ``a``, ``b`` in the model dtype. On a GPU one GEMM writes or accumulates into ``acc`` in fp32
    (no product rounded to the model dtype, no fp32 temporary of the weight's size); elsewhere the
    product is computed in the model dtype and widened."""
    if acc.is_cuda and a.dtype != torch.float32:
        if first:
            torch.mm(a, b, out_dtype=torch.float32, out=acc)
        else:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif first:
        acc.copy_(a @ b)
    else:
        acc += (a @ b).float()


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_rows: int):
        rows = hidden.shape[0]
        valid_all = labels != IGNORE_INDEX
        # 1 / valid rows, kept on the device: no host synchronisation in the step
        scale = 1.0 / valid_all.sum().clamp(min=1).to(torch.float32)
        needs_grad = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if needs_grad[0] else None
        alloc = torch.empty if rows else torch.zeros  # the first chunk writes every element
        grad_weight = alloc(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad[1] else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
            if bias is not None and needs_grad[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        write_grad = grad_hidden is not None or grad_weight is not None or grad_bias is not None
        for lo in range(0, rows, chunk_rows):
            h = hidden[lo:lo + chunk_rows]
            logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
            # one kernel: the rows' losses, and d(mean loss)/d(logits) = (softmax - onehot(target)) / count
            # written over the logits (zero on ignored rows), in fp32 from the stored logits
            total += ops.softmax_cross_entropy_(logits, labels[lo:lo + chunk_rows], scale, IGNORE_INDEX,
                                                write_grad).sum()
            if not write_grad:
                continue
            d_logits = logits
            if grad_bias is not None:
                grad_bias += d_logits.float().sum(0)
            if grad_hidden is not None:
                torch.mm(d_logits, weight, out=grad_hidden[lo:lo + chunk_rows])
            if grad_weight is not None:
                _accumulate_product(grad_weight, d_logits.t(), h, first=lo == 0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_out.to(grad_hidden.dtype)
        if grad_weight is not None:  # scaled and rounded in one pass: no second fp32 copy
            grad_weight = torch.mul(grad_weight, grad_out,
                                    out=torch.empty(grad_weight.shape, dtype=ctx.weight_dtype, device=grad_weight.device))
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
