"""Communicators with one interface over two backends: NCCL held by tidal's core (loaded at run time
from torch's CUDA wheel or the system, bootstrapped through a torch.distributed store) for CUDA
tensors, and Gloo through torch.distributed for CPU tensors.

    store = torch.distributed.TCPStore(host, port, size, is_master=rank == 0)
    comm = tidal.comm.Communicator("nccl", rank, size, store, device=torch.device("cuda", rank))
    comm.all_reduce_(x)              # enqueued on torch's current stream, returns at once
    comm.synchronize()               # waits; raises CollectiveError on failure or timeout

Every collective is asynchronous on the NCCL backend (on the caller's current CUDA stream, so CUDA
graphs can capture it) and completes before returning on Gloo. A collective that fails, or does not
complete within ``timeout_s`` (``TIDAL_COLLECTIVE_TIMEOUT_S``, default 300 s), raises
:class:`CollectiveError` naming the collective and the rank, instead of hanging: on NCCL a watchdog
thread in the core aborts the communicator and the next call raises.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist

from tidal import _core
from tidal.ops._lib import capsule, stream_of
from tidal.train.comm import CollectiveError, seconds_from_env

__all__ = ["Communicator", "CollectiveError", "nccl_library_path", "nccl_version"]

_OPS = ("sum", "prod", "max", "min", "avg")
_DEFAULT_TIMEOUT_S = 300.0


def nccl_library_path() -> str | None:
    """The libnccl.so.2 of torch's CUDA wheel (the ``nvidia-nccl`` package beside it), if installed."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(root) / "nccl" / "lib" / "libnccl.so.2"
        if candidate.is_file():
            return str(candidate)
    return None


def nccl_version() -> tuple[int, int, int]:
    """NCCL's (major, minor, patch), loading it as a communicator would; raises tidal.Error naming
    every place searched when it is not found, or when this build of tidal has no CUDA."""
    _point_core_at_nccl()
    code = _core.comm.nccl_version()
    if code >= 10000:  # NCCL_VERSION(X, Y, Z) from 2.9 on
        return code // 10000, code // 100 % 100, code % 100
    return code // 1000, code // 100 % 10, code % 100


def _point_core_at_nccl() -> None:
    """torch's copy of NCCL for the core to load, unless TIDAL_NCCL_LIBRARY names one."""
    path = None if os.environ.get("TIDAL_NCCL_LIBRARY") else nccl_library_path()
    if path is not None:
        _core.comm.set_nccl_library_path(path)


class Communicator:
    """One rank's communicator.

    Parameters
    ----------
    backend : "nccl" or "gloo"
        NCCL (tidal's core) for CUDA tensors on ``device``; Gloo (torch.distributed) for CPU tensors.
    rank, size : int
        This rank and the number of ranks.
    store : torch.distributed.Store
        Shared by the ranks (a TCPStore, FileStore, or the default group's store); rank 0 publishes
        NCCL's unique id under ``f"{prefix}/nccl_id"``.
    device : torch.device, optional
        NCCL: the CUDA device (default: the current one).
    timeout_s : float, optional
        How long joining and each collective may take.
    prefix : str
        Keys of this communicator in the store (several communicators may share one store).
    """

    def __init__(self, backend: str, rank: int, size: int, store, device: torch.device | None = None,
                 timeout_s: float | None = None, prefix: str = "tidal.comm"):
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"backend={backend!r} must be 'nccl' or 'gloo'")
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"rank={rank} must be in [0, size={size})")
        if timeout_s is None:
            timeout_s = seconds_from_env("TIDAL_COLLECTIVE_TIMEOUT_S", _DEFAULT_TIMEOUT_S)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s!r} must be > 0")
        self.backend, self.rank, self.size, self.timeout_s = backend, rank, size, float(timeout_s)
        self._nccl = self._gloo = None
        self._aborted: str | None = None
        if backend == "gloo":
            self.device = torch.device("cpu")
            try:
                self._gloo = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size,
                                                   datetime.timedelta(seconds=timeout_s))
            except RuntimeError as e:
                raise CollectiveError(f"joining the Gloo communicator as rank {rank} of {size} failed: {e}") from e
            return
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"device={self.device} must be a CUDA device for backend='nccl'")
        key = f"{prefix}/nccl_id"
        _point_core_at_nccl()
        if rank == 0:
            unique_id = _core.comm.nccl_unique_id()
            store.set(key, unique_id)
        else:
            store.wait([key], datetime.timedelta(seconds=timeout_s))
            unique_id = store.get(key)
        try:
            self._nccl = _core.comm.NcclCommunicator(unique_id, rank, size, self.device.index, self.timeout_s)
        except _core.Error as e:
            raise CollectiveError(str(e)) from e

    # ---- collectives ---------------------------------------------------------------------------

    def all_reduce_(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``x`` (contiguous) reduced over the ranks, in place."""
        self._check(x, "x")
        if self._nccl is not None:
            self._call("all_reduce", capsule(x), capsule(x), self._op(op), stream_of(x))
        else:
            opts = dist.AllreduceOptions()
            opts.reduceOp = self._gloo_op(op)
            self._wait("all_reduce", self._gloo.allreduce([x], opts))
            if op == "avg":
                x.div_(self.size) if x.is_floating_point() else x.floor_divide_(self.size)
        return x

    def reduce_scatter(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """This rank's ``x.numel() / size`` elements (a contiguous piece, in rank order, flattened) of
        ``x`` reduced over the ranks."""
        self._check(x, "x")
        if x.numel() % self.size:
            raise ValueError(f"x.numel()={x.numel()} must be a multiple of size={self.size}")
        out = torch.empty(x.numel() // self.size, dtype=x.dtype, device=x.device)
        if self._nccl is not None:
            self._call("reduce_scatter", capsule(out), capsule(x), self._op(op), stream_of(x))
            return out
        # NOTE(tidal): Gloo has no reduce-scatter of flat tensors: an all-reduce of a copy, then this
        # rank's piece (the same result, size times the traffic; the CPU path is for tests and CI)
        full = self.all_reduce_(x.reshape(-1).clone(), op)
        return out.copy_(full[self.rank * out.numel():(self.rank + 1) * out.numel()])

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` (the same shape on each), concatenated along a new first dimension
        ``[size, *x.shape]`` in rank order."""
        self._check(x, "x")
        out = torch.empty((self.size, *x.shape), dtype=x.dtype, device=x.device)
        if self._nccl is not None:
            self._call("all_gather", capsule(out), capsule(x), stream_of(x))
        else:
            self._wait("all_gather", self._gloo.allgather([list(out.unbind(0))], [x]))
        return out

    def broadcast_(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``x`` (contiguous) overwritten with rank ``src``'s, in place."""
        self._check(x, "x")
        self._check_rank(src, "src")
        if self._nccl is not None:
            self._call("broadcast", capsule(x), src, stream_of(x))
        else:
            opts = dist.BroadcastOptions()
            opts.rootRank, opts.rootTensor = src, 0
            self._wait("broadcast", self._gloo.broadcast([x], opts))
        return x

    def send(self, x: torch.Tensor, dst: int) -> None:
        """``x`` to rank ``dst`` (matched by its :meth:`recv_`)."""
        self._check(x, "x")
        self._check_rank(dst, "dst")
        if self._nccl is not None:
            self._call("send", capsule(x), dst, stream_of(x))
        else:
            self._wait("send", self._gloo.send([x], dst, 0))

    def recv_(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """``x`` overwritten with what rank ``src`` sends."""
        self._check(x, "x")
        self._check_rank(src, "src")
        if self._nccl is not None:
            self._call("recv", capsule(x), src, stream_of(x))
        else:
            self._wait("recv", self._gloo.recv([x], src, 0))
        return x

    def synchronize(self) -> None:
        """Waits until every collective issued so far has completed (NCCL; Gloo's already have);
        raises :class:`CollectiveError` for the failure or timeout that ended one."""
        if self._nccl is not None:
            self._call("synchronize")

    def abort(self, why: str = "aborted by the caller") -> None:
        """Ends the communicator: collectives in flight end without completing, later calls raise."""
        if self._nccl is not None:
            self._nccl.abort(why)
        self._aborted = why

    def close(self) -> None:
        """Frees the communicator (NCCL: waits for nothing; pending work is aborted)."""
        self._nccl = None
        self._gloo = None

    # ---- helpers -------------------------------------------------------------------------------

    def _check(self, x: torch.Tensor, name: str) -> None:
        if self._nccl is None and self._gloo is None:
            raise CollectiveError(f"the communicator of rank {self.rank} was closed")
        if self._aborted is not None and self._gloo is not None:
            raise CollectiveError(f"the communicator of rank {self.rank} was aborted: {self._aborted}")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device} but the {self.backend} communicator is on {self.device}")
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous")

    def _check_rank(self, r: int, name: str) -> None:
        if not 0 <= r < self.size:
            raise ValueError(f"{name}={r} must be in [0, size={self.size})")

    def _op(self, op: str):
        if op not in _OPS:
            raise ValueError(f"op={op!r} must be one of {_OPS}")
        return getattr(_core.comm.ReduceOp, op.upper())

    def _gloo_op(self, op: str):
        if op not in _OPS:
            raise ValueError(f"op={op!r} must be one of {_OPS}")
        return {"sum": dist.ReduceOp.SUM, "prod": dist.ReduceOp.PRODUCT, "max": dist.ReduceOp.MAX,
                "min": dist.ReduceOp.MIN, "avg": dist.ReduceOp.SUM}[op]

    def _call(self, name: str, *args):
        try:
            return getattr(self._nccl, name)(*args)
        except _core.Error as e:
            raise CollectiveError(str(e)) from e

    def _wait(self, name: str, work) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            raise CollectiveError(f"{name} on rank {self.rank} of {self.size} failed: {e}") from e

    def __repr__(self) -> str:
        return f"Communicator(backend={self.backend!r}, rank={self.rank}, size={self.size}, device={self.device})"
