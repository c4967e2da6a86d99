"""KV-cache transfer between a prefill engine and a decode engine (disaggregated serving).

A prefill engine keeps a finished prompt's blocks (held by the scheduler) until a decode engine has
read them; the decode engine reserves blocks of its own and reads the prefill engine's blocks into
them, all layers' keys and values of all the request's blocks in one transfer. Two connectors behind
one interface:

- :class:`NixlConnector`: NIXL (UCX underneath: GPU memory directly where the hardware allows, host
  memory over TCP or shared memory otherwise). Each engine registers its whole KV pool once; the
  decode engine issues one READ of the request's block segments and the prefill engine learns of
  its end through NIXL's notification carrying the transfer id.
- :class:`TorchConnector`: torch.distributed point-to-point (Gloo) over a two-rank group per engine
  pair, bootstrapped through a TCPStore the prefill engine hosts. The decode engine sends the
  transfer id and block ids; the prefill engine answers with the blocks (GPU blocks staged through
  host memory), or, where both pools are on the same device in one process (one GPU, or the CPU),
  the decode engine copies the blocks itself and the group carries only the request and its
  acknowledgement.
  It is the test reference and the fallback where NIXL is not installed.

Both copy the same bytes: the pool is one allocation ``[num_layers, 2, num_blocks, block_bytes]``
(tidal.serve.model_runner.KVPool), so a block of one layer's keys is one contiguous segment.
Connectors are driven by the engine thread (``start_read``, ``poll_reads``, ``poll_done``);
their own threads only move bytes.
"""

from __future__ import annotations

import atexit
import base64
import datetime
import os
import queue
import socket
import threading
import time
import uuid
import weakref
from dataclasses import dataclass

import numpy as np
import torch

CONNECTORS = ("torch", "nixl")


class KVTransferError(RuntimeError):
    """A transfer failed: the peer is gone, timed out, or no longer holds the blocks."""


@dataclass(frozen=True)
class KVLayout:
    """What both ends must agree on for their blocks to be interchangeable."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @classmethod
    def of(cls, model, block_size: int, dtype: torch.dtype | None = None) -> "KVLayout":
        """``dtype``: the caches' element type (the model's unless the KV cache is FP8)."""
        return cls(model.num_layers, block_size, model.num_kv_heads, model.head_dim, str(dtype or model.dtype))

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.num_kv_heads * self.head_dim * torch.empty((), dtype=_dtype(self.dtype)).element_size()

    def check(self, remote: dict, engine: str) -> None:
        theirs = KVLayout(**remote)
        if theirs != self:
            raise KVTransferError(f"engine {engine!r} has KV layout {theirs}, this engine {self}: serve the same "
                                  f"model with the same dtype and block_size on both")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


_OPEN: "weakref.WeakSet[KVConnector]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Connectors still open at exit end their threads first (all are told, then all are waited
    for, so a prefill engine's thread hears its decode peer leave): a thread still inside a
    torch.distributed call when the interpreter finalizes aborts the process."""
    connectors = list(_OPEN)
    for connector in connectors:
        connector.signal_close()
    for connector in connectors:
        try:
            connector.close()
        except Exception:
            pass


class KVConnector:
    """The interface the engine drives. Prefill side: :meth:`publish`, :meth:`poll_done`,
    :meth:`unpublish`; decode side: :meth:`start_read`, :meth:`poll_reads`; both: :meth:`info`
    (what a peer needs, JSON-able) and :meth:`close`."""

    kind = ""

    def __init__(self, flat: torch.Tensor, layout: KVLayout, num_blocks: int, engine_id: str, timeout: float):
        self.flat, self.layout, self.num_blocks = flat, layout, num_blocks
        self.engine_id, self.timeout = engine_id, timeout
        self._published: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        _OPEN.add(self)

    # ---- prefill side ----
    def publish(self, transfer_id: str, block_ids: list[int]) -> None:
        with self._lock:
            self._published[transfer_id] = list(block_ids)

    def unpublish(self, transfer_id: str) -> None:
        with self._lock:
            self._published.pop(transfer_id, None)

    def poll_done(self) -> list[str]:
        """Transfer ids whose blocks a decode engine has finished reading."""
        raise NotImplementedError

    # ---- decode side ----
    def start_read(self, transfer_id: str, remote: dict, remote_blocks: list[int], local_blocks: list[int]) -> None:
        raise NotImplementedError

    def poll_reads(self) -> list[tuple[str, str | None]]:
        """(transfer id, None or the error) of each read that ended since the last call."""
        raise NotImplementedError

    def info(self) -> dict:
        raise NotImplementedError

    def signal_close(self) -> None:
        """Tells the connector's threads to end (close() then waits for them)."""

    def close(self) -> None:
        pass

    # ---- helpers ----
    def block_view(self) -> torch.Tensor:
        """The pool as ``[2 * num_layers, num_blocks, block_bytes]`` bytes."""
        return self.flat.view(2 * self.layout.num_layers, self.num_blocks, self.layout.block_bytes)


# ---- NIXL -------------------------------------------------------------------------------------------


def nixl_available() -> bool:
    try:
        import nixl._api  # noqa: F401
    except Exception:
        return False
    return True


class NixlConnector(KVConnector):
    kind = "nixl"

    def __init__(self, flat, layout, num_blocks, engine_id, timeout):
        super().__init__(flat, layout, num_blocks, engine_id, timeout)
        try:
            from nixl._api import nixl_agent, nixl_agent_config
        except Exception as e:
            raise ImportError(f"kv_connector='nixl' needs NIXL (pip install nixl): {type(e).__name__}: {e}; "
                              f"kv_connector='torch' needs nothing more") from None
        self._agent = nixl_agent(engine_id, nixl_agent_config(backends=["UCX"]))
        self._mem = "VRAM" if flat.is_cuda else "DRAM"
        self._device = (flat.device.index or 0) if flat.is_cuda else 0
        self._agent.register_memory(flat)
        self._remotes: dict[str, str] = {}  # engine id -> agent name
        self._reads: dict[str, tuple[object, float]] = {}  # transfer id -> (handle, deadline)

    def info(self) -> dict:
        return {"kind": "nixl", "engine_id": self.engine_id, "layout": vars(self.layout), "num_blocks": self.num_blocks,
                "base": self.flat.data_ptr(), "device": self._device, "mem": self._mem,
                "metadata": base64.b64encode(self._agent.get_agent_metadata()).decode()}

    def _descs(self, segs: np.ndarray, device: int, mem: str):
        """NIXL descriptors of ``segs`` ([n, 2] address, length) on ``device``."""
        rows = np.column_stack([segs[:, 0], segs[:, 1], np.full(len(segs), device, dtype=np.int64)])
        return self._agent.get_xfer_descs(rows, mem)

    def start_read(self, transfer_id, remote, remote_blocks, local_blocks):
        if len(remote_blocks) != len(local_blocks):
            raise KVTransferError(f"{len(remote_blocks)} remote blocks for {len(local_blocks)} local ones")
        self.layout.check(remote["layout"], remote["engine_id"])
        name = self._remotes.get(remote["engine_id"])
        if name is None:
            name = self._agent.add_remote_agent(base64.b64decode(remote["metadata"]))
            self._remotes[remote["engine_id"]] = name
        # one READ of every (layer, keys or values, block) segment; the two pools differ in size, so
        # each side's addresses follow its own num_blocks
        local = self._block_segments(local_blocks, self.num_blocks, self.flat.data_ptr())
        far = self._block_segments(remote_blocks, int(remote["num_blocks"]), int(remote["base"]))
        handle = self._agent.initialize_xfer(
            "READ", self._descs(local, self._device, self._mem), self._descs(far, int(remote["device"]), remote["mem"]),
            name, transfer_id.encode())
        state = self._agent.transfer(handle)
        if state == "ERR":
            raise KVTransferError(f"NIXL could not start the read of transfer {transfer_id}")
        self._reads[transfer_id] = (handle, time.monotonic() + self.timeout)

    def _block_segments(self, block_ids: list[int], num_blocks: int, base: int) -> np.ndarray:
        """One (address, length) per (plane, block): both sides list them in the same order."""
        bb = self.layout.block_bytes
        ids = np.asarray(block_ids, dtype=np.int64)
        planes = np.arange(2 * self.layout.num_layers, dtype=np.int64)[:, None]
        offsets = (planes * num_blocks + ids[None, :]) * bb + base
        return np.stack([offsets.reshape(-1), np.full(offsets.size, bb, dtype=np.int64)], axis=1)

    def poll_reads(self):
        ended = []
        now = time.monotonic()
        for transfer_id, (handle, deadline) in list(self._reads.items()):
            state = self._agent.check_xfer_state(handle)
            if state == "PROC" and now < deadline:
                continue
            error = None if state == "DONE" else (
                f"NIXL read of transfer {transfer_id} failed" if state == "ERR" else
                f"NIXL read of transfer {transfer_id} timed out after {self.timeout:.0f} s")
            if state in ("DONE", "ERR"):
                self._agent.release_xfer_handle(handle)
            ended.append((transfer_id, error))
            del self._reads[transfer_id]
        return ended

    def poll_done(self):
        done = []
        for messages in self._agent.get_new_notifs().values():
            done.extend(m.decode() for m in messages)
        return done

    def close(self):
        self._reads.clear()


# ---- torch.distributed ------------------------------------------------------------------------------


def free_port(host: str) -> int:
    """A TCP port nothing listens on at ``host`` now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TorchConnector(KVConnector):
    """torch.distributed send/recv over one two-rank group per (prefill, decode) engine pair."""

    kind = "torch"
    _OK, _UNKNOWN = 0, 1
    # Engines of one process on one device copy blocks between their pools; False sends them over
    # the group as between processes (what the tests set to cover that path within one process).
    copy_within_process = True

    def __init__(self, flat, layout, num_blocks, engine_id, timeout, host: str = "127.0.0.1", port: int = 0,
                 serve: bool = False):
        super().__init__(flat, layout, num_blocks, engine_id, timeout)
        import torch.distributed as dist

        self._dist = dist
        self.host = host
        self._done: queue.Queue[str] = queue.Queue()
        self._ended: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._pairs: dict[str, _Pair] = {}
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor: threading.Thread | None = None
        self._store = None
        if serve:  # the prefill side hosts the store its decode peers bootstrap through
            self.port = port or free_port(host)
            self._store = dist.TCPStore(host, self.port, is_master=True, wait_for_workers=False,
                                        timeout=datetime.timedelta(seconds=timeout))
            self._store.add("peers", 0)
            self._acceptor = threading.Thread(target=self._accept, name="tidal-kv-accept", daemon=True)
            self._acceptor.start()
        else:
            self.port = 0

    def info(self) -> dict:
        info = {"kind": "torch", "engine_id": self.engine_id, "layout": vars(self.layout),
                "num_blocks": self.num_blocks, "host": self.host, "port": self.port,
                "node": socket.gethostname(), "pid": os.getpid()}
        if self.flat.is_cuda:
            info["device_uuid"] = self._device_uuid()
        return info

    def _device_uuid(self) -> str | None:
        """The pool's GPU, or None for a pool in host memory."""
        return str(torch.cuda.get_device_properties(self.flat.device).uuid) if self.flat.is_cuda else None

    def _same_device_view(self, remote: dict) -> torch.Tensor | None:
        """The remote pool as ``[2 * num_layers, num_blocks, block_bytes]``, when it belongs to an
        engine of this process on this engine's device (the same GPU, or both on the CPU); None
        otherwise (the blocks then come over the group)."""
        # NOTE(tidal): engines of two processes on one card go through host memory: the pools are
        # driver-mapped allocations (sleep mode), which need an exported shareable handle rather
        # than a CUDA IPC handle of torch's allocator.
        if (not self.copy_within_process or remote.get("node") != socket.gethostname()
                or remote.get("pid") != os.getpid() or remote.get("device_uuid") != self._device_uuid()):
            return None
        peer = next((c for c in list(_OPEN) if c.engine_id == remote["engine_id"]), None)
        shape = (2 * self.layout.num_layers, int(remote["num_blocks"]), self.layout.block_bytes)
        return None if peer is None else peer.flat.view(torch.uint8).view(shape)

    def _group(self, store, rank: int):
        # NOTE(tidal): Gloo, with GPU blocks staged through host memory: NCCL refuses two ranks on
        # one GPU (the one-card disaggregated setup); NIXL is the connector that reads GPU memory
        # directly.
        return self._dist.ProcessGroupGloo(self._dist.PrefixStore("g", store), rank, 2,
                                           datetime.timedelta(seconds=self.timeout))

    # ---- prefill side: answer reads ----
    def _accept(self) -> None:
        seen = 0
        while not self._closed.is_set():
            try:
                count = self._store.add("peers", 0)
            except Exception:
                return
            while seen < count:
                seen += 1
                peer = self._store.get(f"peer/{seen}").decode()
                thread = threading.Thread(target=self._serve_peer, args=(peer,), name=f"tidal-kv-{peer}", daemon=True)
                thread.start()
                self._threads.append(thread)
            time.sleep(0.02)

    def _serve_peer(self, peer: str) -> None:
        try:
            group = self._group(self._dist.PrefixStore(f"pair/{peer}", self._store), 0)
            view = self.block_view()
            while not self._closed.is_set():
                header = torch.zeros(3, dtype=torch.int64)
                group.recv([header], 1, 0).wait()
                n, id_len, direct = int(header[0]), int(header[1]), bool(header[2])
                if n < 0:  # the decode engine closed its end
                    break
                ids, name = torch.empty(n, dtype=torch.int64), torch.empty(id_len, dtype=torch.uint8)
                group.recv([ids], 1, 1).wait()
                group.recv([name], 1, 2).wait()
                transfer_id = bytes(name.tolist()).decode()
                with self._lock:
                    blocks = self._published.get(transfer_id)
                reply = torch.tensor([self._OK if blocks is not None and blocks[:n] == ids.tolist() else self._UNKNOWN])
                group.send([reply], 1, 3).wait()
                if int(reply[0]) != self._OK:
                    continue
                if direct:  # the decode engine copies on the device; wait for its acknowledgement
                    group.recv([torch.zeros(1, dtype=torch.int64)], 1, 4).wait()
                else:
                    payload = view[:, ids.to(self.flat.device)].cpu()  # [planes, n, block_bytes]
                    group.send([payload], 1, 4).wait()
                self._done.put(transfer_id)
            del group  # torn down here, while close() waits for this thread
        except Exception:  # the decode engine went away: its reads fail on its side; holds time out here
            return

    def poll_done(self):
        done = []
        while not self._done.empty():
            done.append(self._done.get_nowait())
        return done

    # ---- decode side: read ----
    def start_read(self, transfer_id, remote, remote_blocks, local_blocks):
        if len(remote_blocks) != len(local_blocks):
            raise KVTransferError(f"{len(remote_blocks)} remote blocks for {len(local_blocks)} local ones")
        self.layout.check(remote["layout"], remote["engine_id"])
        pair = self._pairs.get(remote["engine_id"])
        if pair is None or not pair.alive:
            pair = _Pair(self, remote)
            self._pairs[remote["engine_id"]] = pair
        pair.jobs.put((transfer_id, list(remote_blocks), list(local_blocks)))

    def poll_reads(self):
        ended = []
        while not self._ended.empty():
            ended.append(self._ended.get_nowait())
        return ended

    def signal_close(self):
        if not self._closed.is_set():
            self._closed.set()
            for pair in self._pairs.values():
                pair.jobs.put(None)

    def close(self):
        """Ends the decode side's pairs (each tells its prefill engine it is leaving) and stops
        accepting; threads still blocked on a peer that vanished end at the transfer timeout."""
        self.signal_close()
        # NOTE(tidal): a daemon thread that returns from a torch.distributed call after the
        # interpreter began finalizing is unwound by force through C++ frames, which aborts the
        # process; so every thread that calls into the store or a group is joined here.
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
        for pair in self._pairs.values():
            pair.thread.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)


class _Pair:
    """The decode side of one engine pair: a thread that bootstraps the group, then reads in order."""

    def __init__(self, connector: TorchConnector, remote: dict):
        self.connector, self.remote = connector, remote
        self.jobs: queue.Queue = queue.Queue()
        self.alive = True
        self.direct = False  # set by the thread: blocks copied on the GPU rather than sent
        self.thread = threading.Thread(target=self._run, name=f"tidal-kv-read-{remote['engine_id']}", daemon=True)
        self.thread.start()

    def _fail_all(self, message: str, first: str | None = None) -> None:
        self.alive = False
        if first is not None:
            self.connector._ended.put((first, message))
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self.connector._ended.put((job[0], message))

    def _run(self) -> None:
        c, dist = self.connector, self.connector._dist
        me = f"{c.engine_id}-{uuid.uuid4().hex[:8]}"
        try:
            store = dist.TCPStore(self.remote["host"], int(self.remote["port"]), is_master=False,
                                  timeout=datetime.timedelta(seconds=c.timeout))
            n = store.add("peers", 1)
            store.set(f"peer/{n}", me)
            group = c._group(dist.PrefixStore(f"pair/{me}", store), 1)
        except Exception as e:
            self._fail_all(f"cannot reach the prefill engine {self.remote['engine_id']!r} at "
                           f"{self.remote['host']}:{self.remote['port']}: {type(e).__name__}: {e}")
            return
        view = c.block_view()
        remote_view = c._same_device_view(self.remote)
        self.direct = remote_view is not None
        stream = torch.cuda.Stream(c.flat.device) if self.direct and c.flat.is_cuda else None
        while True:
            job = self.jobs.get()
            if job is None:
                try:  # tell the prefill engine's thread for this pair to end
                    group.send([torch.tensor([-1, 0, 0], dtype=torch.int64)], 0, 0).wait()
                except Exception:
                    pass
                return
            transfer_id, remote_blocks, local_blocks = job
            try:
                name = torch.frombuffer(bytearray(transfer_id.encode()), dtype=torch.uint8)
                header = [len(remote_blocks), name.numel(), int(self.direct)]
                group.send([torch.tensor(header, dtype=torch.int64)], 0, 0).wait()
                group.send([torch.tensor(remote_blocks, dtype=torch.int64)], 0, 1).wait()
                group.send([name], 0, 2).wait()
                reply = torch.zeros(1, dtype=torch.int64)
                group.recv([reply], 0, 3).wait()
                if int(reply[0]) != TorchConnector._OK:
                    c._ended.put((transfer_id, f"the prefill engine no longer holds the blocks of transfer "
                                               f"{transfer_id} (it timed out or was released)"))
                    continue
                local = torch.tensor(local_blocks, device=c.flat.device)
                if self.direct:  # one gather and one scatter on the device, then the acknowledgement
                    remote_ids = torch.tensor(remote_blocks, device=c.flat.device)
                    if stream is None:
                        view[:, local] = remote_view[:, remote_ids]
                    else:
                        with torch.cuda.stream(stream):
                            view[:, local] = remote_view[:, remote_ids]
                        stream.synchronize()
                    group.send([torch.zeros(1, dtype=torch.int64)], 0, 4).wait()
                else:
                    payload = torch.empty(view.shape[0], len(remote_blocks), view.shape[2], dtype=torch.uint8)
                    group.recv([payload], 0, 4).wait()
                    view[:, local] = payload.to(c.flat.device)
                c._ended.put((transfer_id, None))
            except Exception as e:
                self._fail_all(f"reading transfer {transfer_id} from the prefill engine "
                               f"{self.remote['engine_id']!r} failed: {type(e).__name__}: {e}", transfer_id)
                return


def make_connector(kind: str, pool, model, block_size: int, engine_id: str, timeout: float, role: str,
                   host: str = "127.0.0.1", port: int = 0) -> KVConnector:
    """The connector ``kind`` ("torch" or "nixl") over the engine's KV pool."""
    if kind not in CONNECTORS:
        raise ValueError(f"kv_connector={kind!r} must be one of {CONNECTORS}")
    layout = KVLayout.of(model, block_size, pool.caches[0][0].dtype)
    num_blocks = pool.caches[0][0].shape[0]
    if kind == "nixl":
        return NixlConnector(pool.flat, layout, num_blocks, engine_id, timeout)
    return TorchConnector(pool.flat, layout, num_blocks, engine_id, timeout, host=host, port=port,
                          serve=role == "prefill")
