"""The collectives the training engine uses, over torch.distributed (Gloo on CPU, NCCL on CUDA),
with single-process fallbacks so that one process needs no launcher and no process group.

A collective that cannot complete (a peer died, or stopped answering for longer than the process
group's timeout) raises :class:`CollectiveError` naming the collective, instead of hanging; the
timeout is ``TIDAL_COLLECTIVE_TIMEOUT_S`` seconds (torch's default, 30 minutes, otherwise) or what
``init(timeout_s=...)`` is given. Under torchrun's elastic agent the failed worker exits and the agent
restarts the job from its latest checkpoint.
"""

import atexit
import datetime
import functools
import os

import torch
import torch.distributed as dist

TIMEOUT_ENV = "TIDAL_COLLECTIVE_TIMEOUT_S"


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names it and the process group's size."""


def seconds_from_env(name: str, default: float | None) -> float | None:
    """The number of seconds environment variable ``name`` holds (> 0), or ``default`` when unset."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be a number of seconds") from None
    if not seconds > 0:
        raise ValueError(f"{name}={value!r} must be > 0")
    return seconds


def init(device: torch.device, timeout_s: float | None = None) -> None:
    """Joins the job's process group from the environment (torchrun's env://) if there is one."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL binds each rank's communicator to the current device
        if timeout_s is None:
            timeout_s = seconds_from_env(TIMEOUT_ENV, None)
        kwargs = {}
        if timeout_s is not None:
            if not timeout_s > 0:
                raise ValueError(f"timeout_s={timeout_s!r} must be > 0")
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", **kwargs)
        atexit.register(_destroy)


def _destroy() -> None:
    """The process group tidal created, torn down before the interpreter's own teardown. NOTE(tidal):
    left to the interpreter, a Gloo group whose peers exit first can abort the process at exit
    ("terminate called without an active exception"), which torchrun's agent takes for a failed
    worker and restarts the finished job."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _named(fn):
    """Re-raises a backend error of collective ``fn`` as a CollectiveError naming it."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistError) as e:
            if isinstance(e, CollectiveError):
                raise
            group = kwargs.get("group")
            size = dist.get_world_size(group) if dist.is_initialized() else 1
            raise CollectiveError(f"collective {fn.__name__} over {size} ranks failed: {e}") from e
    return wrapper


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@_named
def broadcast(t: torch.Tensor, src: int = 0, group=None) -> None:
    """``src`` is a global rank (a member of ``group`` when one is given)."""
    if is_distributed():
        dist.broadcast(t, src=src, group=group)


@_named
def all_reduce(t: torch.Tensor, group=None) -> None:
    """Sum over the ranks of ``group`` (all ranks by default), in place."""
    if is_distributed():
        dist.all_reduce(t, group=group)


@_named
def reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group=None) -> None:
    """``out`` = this rank's chunk of the sum over ranks of ``inp`` ([group size, n] flattened)."""
    if is_distributed():
        dist.reduce_scatter_tensor(out, inp.reshape(-1), group=group)
    else:
        out.copy_(inp.reshape(-1))


@_named
def all_gather(out: torch.Tensor, inp: torch.Tensor, group=None) -> None:
    """``out`` = every rank's ``inp`` end to end, in rank order."""
    if is_distributed():
        dist.all_gather_into_tensor(out, inp, group=group)
    else:
        out.copy_(inp)


def new_groups(ranks_per_group: list[list[int]]) -> list:
    """Collective: one process group per list of global ranks (every rank creates every group, in
    the same order, as torch.distributed requires); None entries in a single process."""
    if not is_distributed():
        return [None for _ in ranks_per_group]
    return [dist.new_group(ranks) for ranks in ranks_per_group]


@_named
def any_true(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


@_named
def barrier() -> None:
    if is_distributed():
        dist.barrier()


@_named
def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
