"""Tensor-parallel serving (``tidal.LLM(model, tensor_parallel_size=N)``). On the CPU: the engine's
process is rank 0 and runs the scheduler, the sampler and its slice of the model; N - 1 worker
processes, started here, hold the other slices (tidal.models.tensor_parallel) and their own KV
caches, and follow rank 0 step by step.

Each step rank 0 broadcasts a fixed header and the step's tensors (token ids, positions, slot mapping,
block tables, sequence lengths, query offsets): no pickled Python crosses per step. Every rank runs the
forward (the row-parallel layers all-reduce inside it); for each set of logits rank 0 needs, it
broadcasts the hidden rows and all ranks gather the vocabulary slices. The ranks talk over a Gloo
process group of their own, with a timeout: a worker that dies or stops answering makes rank 0's
next collective raise, so the step's requests end with an error instead of hanging.

On GPUs (:class:`GPUTensorParallelDriver`, below): one worker process per GPU over NCCL, the same
runner on every rank, and one broadcast of the step's staged input bytes per step.
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


def _local_store(rank: int, size: int, port: int, timeout_s: float):
    """The rendezvous of ranks this process starts: a TCPStore on this host, served by rank 0."""
    return dist.TCPStore("127.0.0.1", port, size, is_master=rank == 0, timeout=datetime.timedelta(seconds=timeout_s))


def _group(rank: int, size: int, store, timeout_s: float) -> TensorParallelGroup:
    timeout = datetime.timedelta(seconds=timeout_s)
    return TensorParallelGroup(rank, size, dist.ProcessGroupGloo(store, rank, size, timeout))


# ---- loading a rank's slice ----------------------------------------------------------------------

_LOAD_TIMEOUT_S = 3600.0
TURNS_ENV = "TIDAL_TP_LOAD_IN_TURNS"


def _load_in_turns(model_path: str, size: int) -> bool:
    """Whether the ranks must read the checkpoint one after another: when ``size`` host copies of it
    would not fit in 80% of the host memory available now (``TIDAL_TP_LOAD_IN_TURNS=1`` forces it)."""
    if os.environ.get(TURNS_ENV) == "1":
        return True
    from tidal.models.loader import safetensors_files

    needed = size * sum(f.stat().st_size for f in safetensors_files(model_path))
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return False
    return needed > 0.8 * available


def load_slice(rank: int, size: int, tp: TensorParallelGroup, store, model_path: str, dtype, device: torch.device,
               quantization: str | None):
    """This rank's slice of the checkpoint at ``model_path`` on ``device``: the whole model is read into
    host memory, split there, and only the slice moves to a GPU (no GPU ever holds the whole model); a
    quantized model is read on the device, then split. When the ranks' host copies would not fit
    together (:func:`_load_in_turns`) they read one after another. The ranks then wait for each
    other through ``store``, with a timeout long enough for any checkpoint, so that none enters its
    first collective while another is still reading."""
    from tidal.models import load_model
    from tidal.models.config import ModelConfig
    from tidal.quant.config import resolve

    timeout = datetime.timedelta(seconds=_LOAD_TIMEOUT_S)
    turns = _load_in_turns(model_path, size)
    if turns and rank > 0:
        store.wait([f"tidal.tp.loaded/{rank - 1}"], timeout)
    float_model = resolve(quantization, ModelConfig.from_pretrained(model_path).hf_config) is None
    read_on = torch.device("cpu") if float_model else device
    model, _ = load_model(model_path, dtype=dtype, device=read_on, quantization=quantization)
    shard_(model, tp)
    if read_on != device:
        model = model.to(device)
    store.set(f"tidal.tp.loaded/{rank}", "1")
    store.wait([f"tidal.tp.loaded/{r}" for r in range(size)], timeout)
    return model


# ---- started by torchrun -------------------------------------------------------------------------
#
# Beyond one host the ranks are started by torchrun, each running the same command
# (``torchrun --nnodes M --nproc-per-node K -m tidal serve MODEL --tensor-parallel-size M*K``): rank 0
# runs the engine and its front end, every other rank becomes a worker (run_torchrun_worker) on
# ``cuda:LOCAL_RANK``, and the ranks meet through torchrun's store (MASTER_ADDR:MASTER_PORT).


def torchrun_rank(size: int) -> int | None:
    """This process's rank among the ``size`` ranks of a tensor-parallel engine that torchrun started,
    or None when torchrun did not start this process (or ``size`` is 1)."""
    if size <= 1 or "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != size:
        raise ValueError(f"tensor_parallel_size={size} but torchrun started WORLD_SIZE={world} processes: start "
                         f"one process per rank (--nnodes x --nproc-per-node = {size})")
    return int(os.environ["RANK"])


def _torchrun_store(rank: int, size: int, timeout_s: float):
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    # torchrun's agent hosts the store when it says so; otherwise rank 0 does, as with env://
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(host, port, size, is_master=rank == 0 and not agent,
                          timeout=datetime.timedelta(seconds=timeout_s))
    return dist.PrefixStore("tidal.tp", store)


def run_torchrun_worker(config) -> int:
    """A rank > 0 under torchrun: its slice of ``config``'s model (an EngineConfig), followed step by
    step until rank 0 shuts down. Returns the exit status (0)."""
    from tidal.models.config import ModelConfig
    from tidal.serve.config import resolve_device

    size = config.tensor_parallel_size
    rank = torchrun_rank(size)
    timeout_s = seconds_from_env(TIMEOUT_ENV, _DEFAULT_TIMEOUT_S)
    store = _torchrun_store(rank, size, timeout_s)
    max_model_len = config.max_model_len or ModelConfig.from_pretrained(config.model).max_position_embeddings
    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        spec = dict(config=config, max_model_len=max_model_len, device=device, backend=tensor_parallel_backend())
        _gpu_worker_loop(rank, size, store, spec, timeout_s, device)
    else:
        spec = dict(model=config.model, dtype=str(config.dtype).removeprefix("torch."), max_model_len=max_model_len,
                    quantization=config.quantization)
        _cpu_worker_loop(rank, _group(rank, size, store, timeout_s), store, spec)
    return 0


def _header(*values: int) -> torch.Tensor:
    header = torch.zeros(_HEADER, dtype=torch.int64)
    header[: len(values)] = torch.tensor(values, dtype=torch.int64)
    return header


class _Driver:
    """What rank 0's drivers share: reading its slice, watching the workers it started, stopping them."""

    workers: list
    closed: bool

    def load(self, model_path: str, dtype, device: torch.device, quantization: str | None):
        """Rank 0's slice of the model (see :func:`load_slice`)."""
        return load_slice(0, self.tp.size, self.tp, self.store, model_path, dtype, device, quantization)

    def _check_workers(self) -> None:
        dead = [w.name for w in self.workers if not w.is_alive()]
        if dead:
            raise RuntimeError(f"tensor-parallel worker(s) {', '.join(dead)} exited (exit codes "
                               f"{[w.exitcode for w in self.workers if not w.is_alive()]}); the engine cannot run")

    def _shutdown(self) -> None:
        """Tells the workers to return."""
        raise NotImplementedError

    def close(self) -> None:
        """Stops the workers (idempotent): a shutdown message if they listen, then terminate."""
        if self.closed:
            return
        self.closed = True
        try:
            if all(w.is_alive() for w in self.workers):
                self._shutdown()
        except Exception:  # noqa: BLE001 - a broken group: the workers are terminated below
            pass
        for worker in self.workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=5)


class TensorParallelDriver(_Driver):
    """Rank 0's side: starts the workers, joins their group and tells them what to run."""

    def __init__(self, model_path: str, dtype: str, size: int, max_model_len: int, quantization: str | None = None):
        self.timeout_s = seconds_from_env(TIMEOUT_ENV, _DEFAULT_TIMEOUT_S)
        self.workers = []
        if torchrun_rank(size) is not None:  # torchrun started the workers
            store = _torchrun_store(0, size, self.timeout_s)
        else:
            port = free_port("127.0.0.1")
            ctx = multiprocessing.get_context("spawn")
            spec = dict(model=model_path, dtype=dtype, max_model_len=max_model_len, quantization=quantization)
            self.workers = [ctx.Process(target=_worker_main, args=(rank, size, port, spec, self.timeout_s),
                                        daemon=True, name=f"tidal-tp-{rank}") for rank in range(1, size)]
            for worker in self.workers:
                worker.start()
            store = _local_store(0, size, port, self.timeout_s)
        self.store = store
        self.tp = _group(0, size, store, self.timeout_s)
        self.tp.driver = self
        self.closed = False

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

    def _shutdown(self) -> None:
        self.tp.broadcast_(_header(_SHUTDOWN))


def _worker_main(rank: int, size: int, port: int, spec: dict, timeout_s: float) -> None:
    """A worker process: its slice of the model, its KV caches, and rank 0's steps until shutdown."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    store = _local_store(rank, size, port, timeout_s)
    _cpu_worker_loop(rank, _group(rank, size, store, timeout_s), store, spec)


def _cpu_worker_loop(rank: int, tp: TensorParallelGroup, store, spec: dict) -> None:
    from tidal.serve.model_runner import allocate_kv_caches

    model = load_slice(rank, tp.size, tp, store, spec["model"], spec["dtype"], torch.device("cpu"),
                       spec["quantization"])
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


# ---- on GPUs -------------------------------------------------------------------------------------
#
# One process per GPU: rank r on cuda:(d + r), d the engine's device, over NCCL (tidal.comm, whose
# collectives CUDA graphs capture). Every rank builds the same GPUModelRunner, so the collectives of
# start-up (the profiling forward, the agreement on the KV pool's size, the graph warm-ups and
# captures) line up without any message. Each step rank 0 broadcasts one fixed header and the step's
# packed input buffer (the bytes its runner already staged on the device); a worker reads the header
# (its one host synchronisation per step), receives the buffer into its own staging area, and replays
# the same decode graph or runs the same eager forward. Logits of eager steps are announced as on the
# CPU. ``TIDAL_TP_BACKEND=gloo`` runs every rank on the engine's device over Gloo instead (eager
# only: Gloo cannot be captured), which is how one GPU tests the protocol.

_GPU_HEADER = 16
BACKEND_ENV = "TIDAL_TP_BACKEND"


def tensor_parallel_backend() -> str:
    backend = os.environ.get(BACKEND_ENV, "nccl")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"{BACKEND_ENV}={backend!r} must be 'nccl' or 'gloo'")
    return backend


def _device_group(rank: int, size: int, store, timeout_s: float, backend: str,
                  device: torch.device) -> TensorParallelGroup:
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "gloo":
        return TensorParallelGroup(rank, size, dist.ProcessGroupGloo(store, rank, size, timeout))
    from tidal.comm import Communicator

    return TensorParallelGroup(rank, size, comm=Communicator("nccl", rank, size, store, device=device,
                                                             timeout_s=timeout_s, prefix="tidal.tp"))


def rank_device(device: torch.device, rank: int, backend: str) -> torch.device:
    """The GPU of ``rank`` when rank 0 runs on ``device``."""
    return device if backend == "gloo" else torch.device("cuda", (device.index or 0) + rank)


class GPUTensorParallelDriver(_Driver):
    """Rank 0's side on GPUs: starts a worker per GPU, joins their group and tells them what to run.
    ``silent`` while the runner starts up (every rank runs the same start-up) and inside graphs."""

    def __init__(self, config, size: int, max_model_len: int, device: torch.device):
        self.backend = tensor_parallel_backend()
        self.timeout_s = seconds_from_env(TIMEOUT_ENV, _DEFAULT_TIMEOUT_S)
        self.device = device
        self.workers = []
        if torchrun_rank(size) is not None:  # torchrun started the workers
            store = _torchrun_store(0, size, self.timeout_s)
        else:
            port = free_port("127.0.0.1")
            ctx = multiprocessing.get_context("spawn")
            spec = dict(config=config, max_model_len=max_model_len, device=device, backend=self.backend)
            self.workers = [ctx.Process(target=_gpu_worker_main, args=(rank, size, port, spec, self.timeout_s),
                                        daemon=True, name=f"tidal-tp-{rank}") for rank in range(1, size)]
            for worker in self.workers:
                worker.start()
            store = _local_store(0, size, port, self.timeout_s)
        self.store = store
        self.tp = _device_group(0, size, store, self.timeout_s, self.backend, device)
        self.tp.driver = self
        self.silent = True
        self.closed = False
        self._header = torch.empty(_GPU_HEADER, dtype=torch.int64, device=device)

    def _send_header(self, *values: int) -> None:
        host = torch.zeros(_GPU_HEADER, dtype=torch.int64)
        host[:len(values)] = torch.tensor(values, dtype=torch.int64)
        self.tp.broadcast_(self._header.copy_(host))

    def announce_step(self, stage: torch.Tensor, graph_size: int, layout, max_seqlen_q: int, max_seqlen_k: int,
                      num_seqs: int, width: int) -> None:
        """The step whose packed inputs ``stage`` (uint8, on the device) holds, as laid out by
        ``layout`` (gpu_model_runner._Layout); ``graph_size`` 0 for an eager step."""
        if self.silent:
            return
        self._check_workers()
        self._send_header(_STEP, graph_size, layout.num_tokens, layout.num_seqs, layout.num_sample,
                          layout.table_elems, max_seqlen_q, max_seqlen_k, num_seqs, width)
        self.tp.broadcast_(stage)

    def announce_logits(self, hidden: torch.Tensor) -> None:
        if self.silent:
            return
        self._send_header(_LOGITS, hidden.shape[0])
        self.tp.broadcast_(hidden.contiguous())

    def _shutdown(self) -> None:
        if not self.silent:  # still starting up, the workers listen to no message: they are terminated
            self._send_header(_SHUTDOWN)
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        was_closed = self.closed
        super().close()
        if not was_closed and self.tp.comm is not None:
            self.tp.comm.abort("the engine closed")


def _gpu_worker_main(rank: int, size: int, port: int, spec: dict, timeout_s: float) -> None:
    """A worker process on its GPU: its slice of the model, the same runner as rank 0's (KV pool,
    graphs), and rank 0's steps until shutdown."""
    device = rank_device(spec["device"], rank, spec["backend"])
    torch.cuda.set_device(device)
    _gpu_worker_loop(rank, size, _local_store(rank, size, port, timeout_s), spec, timeout_s, device)


def _gpu_worker_loop(rank: int, size: int, store, spec: dict, timeout_s: float, device: torch.device) -> None:
    from tidal.serve.gpu_model_runner import GPUModelRunner, _Layout
    from tidal.serve.model_runner import device_memory_baseline

    config = spec["config"]
    baseline = device_memory_baseline(device)
    tp = _device_group(rank, size, store, timeout_s, spec["backend"], device)
    model = load_slice(rank, size, tp, store, config.model, config.dtype, device, config.quantization)
    runner = GPUModelRunner(model, config, spec["max_model_len"], device, baseline)
    header = torch.empty(_GPU_HEADER, dtype=torch.int64, device=device)
    with torch.inference_mode():
        while True:
            values = tp.broadcast_(header).tolist()
            cmd = values[0]
            if cmd == _SHUTDOWN:
                torch.cuda.synchronize(device)
                if tp.comm is not None:
                    tp.comm.close()
                return
            if cmd == _STEP:
                graph_size, tokens, seqs, num_sample, table_elems, max_q, max_k, n, width = values[1:10]
                layout = _Layout(tokens, seqs, num_sample, table_elems)
                tp.broadcast_(runner._stage[:layout.nbytes])
                runner.follow_step(layout, graph_size, max_q, max_k, n, width)
            elif cmd == _LOGITS:
                rows = tp.broadcast_(torch.empty(values[1], model.config.hidden_size, dtype=model.dtype, device=device))
                model.compute_logits(rows)
            else:
                raise RuntimeError(f"tensor-parallel worker {rank}: unknown command {cmd}")
