"""Tensor-parallel serving (``tidal.LLM(model, tensor_parallel_size=N)``) on the CPU: the engine's
process is rank 0 and runs the scheduler, the sampler and its slice of the model; N - 1 worker
processes, started here, hold the other slices (tidal.models.tensor_parallel) and their own KV
caches, and follow rank 0 step by step.

Each step rank 0 broadcasts a fixed header and the step's tensors (token ids, positions, slot mapping,
block tables, sequence lengths, query offsets): no pickled Python crosses per step. Every rank runs the
forward (the row-parallel layers all-reduce inside it); for each set of logits rank 0 needs, it
broadcasts the hidden rows and all ranks gather the vocabulary slices. The ranks talk over a Gloo
process group of their own, with a timeout: a worker that dies or stops answering makes rank 0's
next collective raise, so the step's requests end with an error instead of hanging.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os

import torch
import torch.distributed as dist

from tidal.models.attention import AttentionMetadata
from tidal.models.tensor_parallel import TensorParallelGroup, shard_
from tidal.serve.kv_transfer import free_port
from tidal.train.comm import seconds_from_env

_SHUTDOWN, _INIT, _STEP, _LOGITS = 0, 1, 2, 3
_HEADER = 8
_DEFAULT_TIMEOUT_S = 60.0
TIMEOUT_ENV = "TIDAL_TP_TIMEOUT_S"


def _group(rank: int, size: int, port: int, timeout_s: float) -> TensorParallelGroup:
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, size, is_master=rank == 0, timeout=timeout)
    return TensorParallelGroup(rank, size, dist.ProcessGroupGloo(store, rank, size, timeout))


def _header(*values: int) -> torch.Tensor:
    header = torch.zeros(_HEADER, dtype=torch.int64)
    header[: len(values)] = torch.tensor(values, dtype=torch.int64)
    return header


class TensorParallelDriver:
    """Rank 0's side: starts the workers, joins their group and tells them what to run."""

    def __init__(self, model_path: str, dtype: str, size: int, max_model_len: int, quantization: str | None = None):
        self.timeout_s = seconds_from_env(TIMEOUT_ENV, _DEFAULT_TIMEOUT_S)
        port = free_port("127.0.0.1")
        ctx = multiprocessing.get_context("spawn")
        spec = dict(model=model_path, dtype=dtype, max_model_len=max_model_len, quantization=quantization)
        self.workers = [ctx.Process(target=_worker_main, args=(rank, size, port, spec, self.timeout_s), daemon=True,
                                    name=f"tidal-tp-{rank}") for rank in range(1, size)]
        for worker in self.workers:
            worker.start()
        self.tp = _group(0, size, port, self.timeout_s)
        self.tp.driver = self
        self.closed = False

    def shard(self, model) -> None:
        shard_(model, self.tp)

    def init_caches(self, num_blocks: int, block_size: int, fp8: bool) -> None:
        self.tp.broadcast_(_header(_INIT, num_blocks, block_size, int(fp8)))

    def announce_step(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> None:
        self._check_workers()
        tables = attn.block_tables
        self.tp.broadcast_(_header(_STEP, input_ids.shape[0], tables.shape[0], tables.shape[1], attn.max_seqlen_q,
                                   attn.max_seqlen_k, positions.dim()))
        for t in (input_ids.to(torch.int64), positions.to(torch.int64), attn.slot_mapping.to(torch.int64),
                  tables.to(torch.int32), attn.seq_lens.to(torch.int32), attn.cu_seqlens_q.to(torch.int32)):
            self.tp.broadcast_(t.contiguous())

    def announce_logits(self, hidden: torch.Tensor) -> None:
        self.tp.broadcast_(_header(_LOGITS, hidden.shape[0]))
        self.tp.broadcast_(hidden.contiguous())

    def _check_workers(self) -> None:
        dead = [w.name for w in self.workers if not w.is_alive()]
        if dead:
            raise RuntimeError(f"tensor-parallel worker(s) {', '.join(dead)} exited (exit codes "
                               f"{[w.exitcode for w in self.workers if not w.is_alive()]}); the engine cannot run")

    def close(self) -> None:
        """Stops the workers (idempotent): a shutdown message if they listen, then terminate."""
        if self.closed:
            return
        self.closed = True
        try:
            if all(w.is_alive() for w in self.workers):
                self.tp.broadcast_(_header(_SHUTDOWN))
        except Exception:  # noqa: BLE001 - a broken group: the workers are terminated below
            pass
        for worker in self.workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=5)


def _worker_main(rank: int, size: int, port: int, spec: dict, timeout_s: float) -> None:
    """A worker process: its slice of the model, its KV caches, and rank 0's steps until shutdown."""
    from tidal.models import load_model
    from tidal.serve.model_runner import allocate_kv_caches

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    tp = _group(rank, size, port, timeout_s)
    model, _ = load_model(spec["model"], dtype=spec["dtype"], device="cpu", quantization=spec["quantization"])
    shard_(model, tp)
    model.ensure_rope_positions(spec["max_model_len"])
    caches = None
    with torch.inference_mode():
        while True:
            header = tp.broadcast_(_header())
            cmd = int(header[0])
            if cmd == _SHUTDOWN:
                return
            if cmd == _INIT:
                num_blocks, block_size, fp8 = (int(v) for v in header[1:4])
                caches = allocate_kv_caches(model, num_blocks, block_size, "cpu", torch.uint8 if fp8 else None)
            elif cmd == _STEP:
                num_tokens, num_seqs, width, max_q, max_k, pos_dims = (int(v) for v in header[1:7])
                ids = tp.broadcast_(torch.empty(num_tokens, dtype=torch.int64))
                positions = tp.broadcast_(torch.empty(*([3] if pos_dims == 2 else []), num_tokens,
                                                      dtype=torch.int64))
                slots = tp.broadcast_(torch.empty(num_tokens, dtype=torch.int64))
                tables = tp.broadcast_(torch.empty(num_seqs, width, dtype=torch.int32))
                seq_lens = tp.broadcast_(torch.empty(num_seqs, dtype=torch.int32))
                cu = tp.broadcast_(torch.empty(num_seqs + 1, dtype=torch.int32))
                attn = AttentionMetadata(slot_mapping=slots, block_tables=tables, seq_lens=seq_lens, cu_seqlens_q=cu,
                                         max_seqlen_q=max_q, max_seqlen_k=max_k)
                model(ids, positions, attn, caches)  # the same hidden states as rank 0's
            elif cmd == _LOGITS:
                rows = tp.broadcast_(torch.empty(int(header[1]), model.config.hidden_size, dtype=model.dtype))
                model.compute_logits(rows)
            else:
                raise RuntimeError(f"tensor-parallel worker {rank}: unknown command {cmd}")
