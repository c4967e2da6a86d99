"""The collectives the training engine uses, over torch.distributed (Gloo on CPU, NCCL on CUDA),
with single-process fallbacks so that one process needs no launcher and no process group."""

import os

import torch
import torch.distributed as dist


def init(device: torch.device) -> None:
    """Joins the job's process group from the environment (torchrun's env://) if there is one."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL binds each rank's communicator to the current device
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def broadcast(t: torch.Tensor, src: int = 0) -> None:
    if is_distributed():
        dist.broadcast(t, src=src)


def all_reduce(t: torch.Tensor) -> None:
    """Sum over ranks, in place."""
    if is_distributed():
        dist.all_reduce(t)


def reduce_scatter(out: torch.Tensor, inp: torch.Tensor) -> None:
    """``out`` = this rank's chunk of the sum over ranks of ``inp`` ([world_size, n] flattened)."""
    if is_distributed():
        dist.reduce_scatter_tensor(out, inp.reshape(-1))
    else:
        out.copy_(inp.reshape(-1))


def all_gather(out: torch.Tensor, inp: torch.Tensor) -> None:
    """``out`` = every rank's ``inp`` end to end, in rank order."""
    if is_distributed():
        dist.all_gather_into_tensor(out, inp)
    else:
        out.copy_(inp)


def any_true(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
