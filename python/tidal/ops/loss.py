"""Softmax cross-entropy with its gradient written over the logits, as a torch op
(``torch.ops.tidal.softmax_cross_entropy_``): the kernel behind the fused LM-head loss
(tidal.models.losses) that never holds fp32 logits.
"""

import torch

from tidal.ops._lib import capsule, lib, native, stream_of

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

lib.define("softmax_cross_entropy_(Tensor(a!) logits, Tensor labels, Tensor scale, int ignore_index, "
           "bool write_grad) -> Tensor")


def _check(logits, labels, scale):
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"logits.dtype={logits.dtype} is not supported; expected float32, float16 or bfloat16")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, vocab], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels.shape={tuple(labels.shape)} must be (rows,) = ({logits.shape[0]},)")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels.dtype={labels.dtype} must be torch.int64")
    if scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError(f"scale must be one float32 element, got shape {tuple(scale.shape)} and {scale.dtype}")
    for name, t in (("labels", labels), ("scale", scale)):
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits is on {logits.device}")


def _impl(logits, labels, scale, ignore_index, write_grad):
    _check(logits, labels, scale)
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    if logits.shape[0] == 0:
        return loss
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits.stride(-1)={logits.stride(1)} must be 1 (it is written in place)")
    native.softmax_cross_entropy(capsule(logits), capsule(loss), capsule(labels.contiguous()), capsule(scale),
                                 ignore_index, write_grad, stream_of(logits))
    return loss


for _key in ("CPU", "CUDA"):
    lib.impl("softmax_cross_entropy_", _impl, _key)


@torch.library.register_fake("tidal::softmax_cross_entropy_")
def _fake(logits, labels, scale, ignore_index, write_grad):
    _check(logits, labels, scale)
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def softmax_cross_entropy_(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                           ignore_index: int = -100, write_grad: bool = True) -> torch.Tensor:
    r"""Per-row cross-entropy of ``logits`` against ``labels``, and its gradient in place.

    For a row :math:`x` with label :math:`y \neq` ``ignore_index``, in fp32 from the stored logits:

    .. math::
        \mathrm{loss} = \log \sum_i e^{x_i} - x_y, \qquad
        x \leftarrow (\mathrm{softmax}(x) - \mathrm{onehot}(y)) \cdot \mathrm{scale}

    (the overwrite only with ``write_grad``; rounded once to the logits' dtype). A row labelled
    ``ignore_index`` has loss 0 and, with ``write_grad``, a zero gradient.

    Parameters
    ----------
    logits : torch.Tensor
        ``[rows, vocab]``, float32 / float16 / bfloat16, last dim contiguous; overwritten with the
        gradient when ``write_grad``.
    labels : torch.Tensor
        ``[rows]`` int64, each in ``[0, vocab)`` or ``ignore_index``. Out of range: ValueError on the
        CPU, a NaN loss on a GPU (checking would synchronise the host).
    scale : torch.Tensor
        One float32 element on the logits' device multiplying the gradient (e.g. ``1 / valid rows``).

    Returns
    -------
    torch.Tensor
        ``[rows]`` float32 losses.
    """
    return torch.ops.tidal.softmax_cross_entropy_(logits, labels, scale, ignore_index, write_grad)
