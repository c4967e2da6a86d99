"""tidal.comm.Communicator: on Gloo (CPU, here and in CI) every collective of 2 and 3 ranks against
the values it must produce, bad arguments named, a rank that never joins and a peer that dies ending
in CollectiveError within the timeout instead of a hang; NCCL's loader naming what it searched where
there is no NCCL; on a GPU (device runs) the NCCL communicator of the core: each collective against
the same values, captured in a CUDA graph, a join that times out, an abort."""

import datetime
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tidal
from conftest import gpu_only
from tidal.comm import CollectiveError, Communicator
from tidal.serve.kv_transfer import free_port


def _store(path: str, size: int, timeout_s: float = 30.0):
    store = dist.FileStore(path, size)
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    return store


def _tcp_store(port: int, rank: int, size: int, timeout_s: float = 30.0):
    return dist.TCPStore("127.0.0.1", port, size, is_master=rank == 0, timeout=datetime.timedelta(seconds=timeout_s))


def _collectives(rank: int, size: int, port: int, results) -> None:
    """Every collective of the Gloo backend; puts (rank, {name: tensor}) in `results`."""
    comm = Communicator("gloo", rank, size, _tcp_store(port, rank, size), timeout_s=30)
    out = {}
    x = torch.arange(6, dtype=torch.float32) + 10 * rank
    out["sum"] = comm.all_reduce_(x.clone())
    out["max"] = comm.all_reduce_(x.clone(), "max")
    out["min"] = comm.all_reduce_(x.clone(), "min")
    out["avg"] = comm.all_reduce_(x.clone(), "avg")
    out["int_sum"] = comm.all_reduce_(torch.arange(4, dtype=torch.int64) * (rank + 1))
    out["reduce_scatter"] = comm.reduce_scatter(torch.arange(2 * size, dtype=torch.float32) + rank)
    out["all_gather"] = comm.all_gather(torch.full((2, 3), float(rank)))
    out["broadcast"] = comm.broadcast_(torch.full((5,), float(rank)), src=size - 1)
    # a ring: each rank sends to the next, receives from the one before (even ranks send first)
    mine, got = torch.full((3,), float(rank)), torch.empty(3)
    if rank % 2 == 0:
        comm.send(mine, (rank + 1) % size)
        comm.recv_(got, (rank - 1) % size)
    else:
        comm.recv_(got, (rank - 1) % size)
        comm.send(mine, (rank + 1) % size)
    out["ring"] = got
    comm.synchronize()
    results.put((rank, _to_numpy(out)))


def _to_numpy(out: dict) -> dict:
    """Tensors by value: a tensor put on a queue travels as a file descriptor of shared memory that
    the parent can fetch only while the child lives, and the child exits right after."""
    return {k: v.cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def _from_numpy(value):
    if not isinstance(value, dict):
        return value
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in value.items()}


def _spawn(target, size, *args):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, size, *args, results)) for rank in range(size)]
    for p in procs:
        p.start()
    got = {rank: _from_numpy(value) for rank, value in (results.get(timeout=120) for _ in range(size))}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return got


@pytest.mark.parametrize("size", [2, 3])
def test_gloo_collectives(size):
    got = _spawn(_collectives, size, free_port("127.0.0.1"))
    x = [torch.arange(6, dtype=torch.float32) + 10 * r for r in range(size)]
    for rank in range(size):
        out = got[rank]
        torch.testing.assert_close(out["sum"], sum(x))
        torch.testing.assert_close(out["max"], x[-1])
        torch.testing.assert_close(out["min"], x[0])
        torch.testing.assert_close(out["avg"], sum(x) / size)
        assert torch.equal(out["int_sum"], torch.arange(4, dtype=torch.int64) * sum(range(1, size + 1)))
        total = sum(torch.arange(2 * size, dtype=torch.float32) + r for r in range(size))
        torch.testing.assert_close(out["reduce_scatter"], total[2 * rank:2 * rank + 2])
        assert torch.equal(out["all_gather"], torch.stack([torch.full((2, 3), float(r)) for r in range(size)]))
        assert torch.equal(out["broadcast"], torch.full((5,), float(size - 1)))
        assert torch.equal(out["ring"], torch.full((3,), float((rank - 1) % size)))


def _dies_before_the_collective(rank: int, size: int, port: int, results) -> None:
    comm = Communicator("gloo", rank, size, _tcp_store(port, rank, size), timeout_s=3)
    if rank == 1:
        results.put((rank, None))
        return  # exits without calling all_reduce_
    start = time.monotonic()
    try:
        comm.all_reduce_(torch.ones(4))
        results.put((rank, "no error"))
    except CollectiveError as e:
        results.put((rank, (str(e), time.monotonic() - start)))


def test_gloo_peer_that_dies_fails_the_collective_within_the_timeout():
    got = _spawn(_dies_before_the_collective, 2, free_port("127.0.0.1"))
    message, seconds = got[0]
    assert "all_reduce on rank 0 of 2 failed" in message
    assert seconds < 30


def _never_joined_and_bad_arguments(rank: int, size: int, path: str, results) -> None:
    """In a child process (no Gloo group ever lives in the test process, whose later tests make their
    own): a rank whose peer never joins, then the argument checks of a one-rank communicator."""
    out = {}
    start = time.monotonic()
    try:
        Communicator("gloo", 0, 2, _store(path + ".a", 2, timeout_s=2), timeout_s=2)
        out["join"] = "no error"
    except CollectiveError as e:
        out["join"] = (str(e), time.monotonic() - start)
    comm = Communicator("gloo", 0, 1, _store(path + ".b", 1))
    checks = [(lambda: Communicator("mpi", 0, 1, None), ValueError, "backend='mpi' must be 'nccl' or 'gloo'"),
              (lambda: Communicator("gloo", 2, 2, None), ValueError, r"rank=2 must be in \[0, size=2\)"),
              (lambda: Communicator("gloo", 0, 1, None, timeout_s=0), ValueError, "timeout_s=0 must be > 0"),
              (lambda: comm.all_reduce_(torch.ones(2), "mean"), ValueError, "op='mean' must be one of"),
              (lambda: comm.all_reduce_(torch.ones(4, 4).t()), ValueError, "x must be contiguous"),
              (lambda: comm.broadcast_(torch.ones(2), src=1), ValueError, r"src=1 must be in \[0, size=1\)")]
    out["checks"] = []
    for fn, kind, pattern in checks:
        try:
            fn()
            out["checks"].append((pattern, "no error"))
        except kind as e:
            out["checks"].append((pattern, str(e)))
    out["identity"] = comm.all_reduce_(torch.ones(3))  # one rank: the identity
    comm.abort("done here")
    try:
        comm.all_reduce_(torch.ones(2))
        out["aborted"] = "no error"
    except CollectiveError as e:
        out["aborted"] = str(e)
    results.put((rank, _to_numpy(out)))


def test_gloo_rank_that_never_joins_and_arguments_named(tmp_path):
    import re

    out = _spawn(_never_joined_and_bad_arguments, 1, str(tmp_path / "store"))[0]
    message, seconds = out["join"]
    assert "joining the Gloo communicator as rank 0 of 2 failed" in message and seconds < 30
    for pattern, message in out["checks"]:
        assert re.search(pattern, message), (pattern, message)
    assert torch.equal(out["identity"], torch.ones(3))
    assert "was aborted: done here" in out["aborted"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the loader's message where there is no NCCL")
def test_nccl_missing_is_named(monkeypatch):
    monkeypatch.setenv("TIDAL_NCCL_LIBRARY", "/nonexistent/libnccl.so.2")
    if tidal.build_info()["cuda"]:
        match = r"NCCL could not be loaded: tried /nonexistent/libnccl\.so\.2"
    else:
        match = r"NCCL communicators need a build of tidal with CUDA"
    with pytest.raises(RuntimeError, match=match):
        tidal.comm.nccl_version()


# ---- NCCL on one GPU (device runs) ----------------------------------------------------------------

@pytest.fixture
def nccl(tmp_path):
    comm = Communicator("nccl", 0, 1, _store(str(tmp_path / "store"), 1), device=torch.device("cuda", 0),
                        timeout_s=30)
    yield comm
    comm.close()


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_nccl_collectives_on_one_rank(nccl, dtype):
    x = (torch.arange(12, device="cuda") - 5).to(dtype)
    assert tidal.comm.nccl_version() >= (2, 12, 0)
    assert torch.equal(nccl.all_reduce_(x.clone()), x)
    assert torch.equal(nccl.all_reduce_(x.clone(), "max"), x)
    assert torch.equal(nccl.reduce_scatter(x), x)
    assert torch.equal(nccl.all_gather(x), x.unsqueeze(0))
    assert torch.equal(nccl.broadcast_(x.clone()), x)
    nccl.synchronize()
    with pytest.raises(ValueError, match="x is on cpu but the nccl communicator is on cuda:0"):
        nccl.all_reduce_(torch.ones(2))


@gpu_only
def test_nccl_in_a_cuda_graph(nccl):
    x = torch.ones(1024, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        nccl.all_reduce_(x)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.mul_(2)
        nccl.all_reduce_(x)
    for _ in range(3):
        graph.replay()
    nccl.synchronize()
    torch.cuda.synchronize()
    assert torch.equal(x, torch.full((1024,), 8.0, device="cuda"))


@gpu_only
def test_nccl_join_that_times_out_and_abort(tmp_path):
    start = time.monotonic()
    with pytest.raises(CollectiveError, match="joining the communicator on rank 0 of 2 did not complete within"):
        Communicator("nccl", 0, 2, _store(str(tmp_path / "a"), 2), device=torch.device("cuda", 0), timeout_s=3)
    assert time.monotonic() - start < 60
    comm = Communicator("nccl", 0, 1, _store(str(tmp_path / "b"), 1), device=torch.device("cuda", 0), timeout_s=30)
    comm.abort("stopping")
    with pytest.raises(CollectiveError, match="aborted: stopping"):
        comm.all_reduce_(torch.ones(4, device="cuda"))
