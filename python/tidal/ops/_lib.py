"""The ``tidal`` op library and the helpers every op module uses to call the native core.

The ``Library`` object lives as long as the process: the ops it defines are unregistered when it is
garbage collected.
"""

import torch
from torch.utils.dlpack import to_dlpack

from tidal import _core

lib = torch.library.Library("tidal", "DEF")
native = _core.ops


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def is_eager_call(*tensors: torch.Tensor) -> bool:
    """Whether a public op may call its implementation directly instead of going through
    ``torch.ops.tidal``: no autograd to record (grad disabled, e.g. under ``torch.inference_mode``),
    no ``torch.compile`` tracing, and plain tensors only (no fake or functional tensor subclasses).

    NOTE(tidal): the dispatcher round trip to a Python implementation costs tens of microseconds,
    several times what the kernels of a small decode step take; the serving loop makes ~25 such calls
    per step. Anything that needs the dispatcher (autograd, compile, fake tensors) still gets it.
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    return all(type(t) in _PLAIN_TENSOR_TYPES for t in tensors)


def capsule(t: torch.Tensor):
    """A DLPack capsule viewing ``t`` (no copy)."""
    return to_dlpack(t.detach())


def stream_of(t: torch.Tensor) -> int:
    """The handle of torch's current stream on ``t``'s device; 0 for CPU tensors."""
    if t.device.type == "cpu":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


def as_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` as [num_tokens, hidden_size] with a contiguous last dim; a view whenever possible."""
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension, got a 0-d tensor")
    rows = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    if rows.shape[-1] > 1 and rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows
