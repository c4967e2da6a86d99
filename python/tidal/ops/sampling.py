"""The seeded noise of sampling as a torch op (``torch.ops.tidal.seeded_exponential_``): Exp(1) draws
that depend on (seed, offset, vocabulary index) alone, so ``argmax(probs / noise)`` samples each row
from its own seed whatever the batch around it, on the CPU and the GPU alike (Philox4x32-10)."""

import torch

from tidal.ops._lib import capsule, is_eager_call, lib, native, stream_of

lib.define("seeded_exponential_(Tensor(a!) out, Tensor seeds, Tensor offsets) -> ()")


def _check(out, seeds, offsets) -> None:
    if out.dtype != torch.float32 or out.dim() != 2:
        raise ValueError(f"out must be a 2-D float32 tensor [num_rows, vocab], got {out.dtype} {tuple(out.shape)}")
    for name, t in (("seeds", seeds), ("offsets", offsets)):
        if t.dtype != torch.int64 or t.shape != (out.shape[0],):
            raise ValueError(f"{name} must be int64 [num_rows] = [{out.shape[0]}], got {t.dtype} {tuple(t.shape)}")
        if t.device != out.device:
            raise ValueError(f"{name} is on {t.device} but out is on {out.device}")


def _seeded_exponential_impl(out, seeds, offsets):
    _check(out, seeds, offsets)
    if out.numel() == 0:
        return
    if out.stride(-1) != 1:
        raise ValueError("out must have a contiguous last dimension")
    native.seeded_exponential(capsule(out), capsule(seeds), capsule(offsets), stream_of(out))


for _key in ("CPU", "CUDA"):
    lib.impl("seeded_exponential_", _seeded_exponential_impl, _key)


@torch.library.register_fake("tidal::seeded_exponential_")
def _seeded_exponential_fake(out, seeds, offsets):
    _check(out, seeds, offsets)


def seeded_exponential_(out: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    r"""Fill ``out`` with Exp(1) noise that is a function of (seed, offset, index) alone.

    .. math:: \mathrm{out}[r, v] = -\log u, \qquad u = \mathrm{Philox}(\mathrm{seeds}[r];\ v, \mathrm{offsets}[r]) \in (0, 1)

    ``argmax_v(p[r, v] / out[r, v])`` is then a draw from ``p[r]`` (the exponential race).

    Parameters
    ----------
    out : torch.Tensor
        ``[num_rows, vocab]`` float32, last dim contiguous; ``num_rows <= 65535``.
    seeds, offsets : torch.Tensor
        ``[num_rows]`` int64: a request's seed, and a counter that must differ between its draws
        (the number of tokens generated so far).

    Returns
    -------
    torch.Tensor
        ``out``.
    """
    if is_eager_call(out, seeds, offsets):
        _seeded_exponential_impl(out, seeds, offsets)
    else:
        torch.ops.tidal.seeded_exponential_(out, seeds, offsets)
    return out
