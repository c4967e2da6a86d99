"""Model runners: what the engine calls once per step to turn the scheduler's flat batch into sampled
tokens. The engine stays device-neutral; each runner owns its device's KV caches and inputs.

- :class:`CPUModelRunner` (here): KV pool sized from host memory, inputs as tensors over the
  scheduler's own numpy arrays, eager forward.
- :class:`tidal.serve.gpu_model_runner.GPUModelRunner`: KV pool sized by a profiling forward,
  persistent device inputs filled by one pinned copy per step, CUDA graphs for decode steps.

Both expose ``num_kv_blocks``, ``kv_pool`` (a :class:`KVPool`, released while the engine sleeps),
``kv_caches`` (its ``(key_cache, value_cache)`` per layer) and ``execute(batch, sampling, mm=None,
prompt_rows=None) -> PendingSample | None`` (launched; ``.result()`` waits); ``mm`` is a step's
multimodal inputs (tidal.serve.multimodal.MultiModalStep), which both runners apply with
:func:`multimodal_inputs`; ``prompt_rows`` (tidal.serve.prompt_logprobs.PromptRows) the rows whose
prompt log-probs the step computes besides the sampled rows' logits, attached to the PendingSample.
"""

import math
import os
from typing import NamedTuple

import numpy as np
import torch

from tidal.models.attention import AttentionMetadata
from tidal.serve.config import EngineConfig
from tidal.serve.prompt_logprobs import PromptRows, compute_prompt_logprobs
from tidal.serve.sampler import PendingSample, SequenceSampling, sample_async

# NOTE(tidal): on the CPU the KV cache competes with everything else in host memory, so the default
# budget is capped (vLLM's CPU backend caps it too); num_kv_blocks overrides it.
_CPU_KV_CACHE_CAP_BYTES = 4 << 30


class TokenFill(NamedTuple):
    """Asynchronous scheduling: the step's input tokens not yet on the host, taken from the previous
    step's sampled ids where they were drawn: ``input_ids[rows] = tokens[src]``."""

    tokens: torch.Tensor  # the previous step's sampled ids (int64, on the runner's device)
    rows: np.ndarray  # int64: token rows of this step whose input id is a placeholder
    src: np.ndarray  # int64: the row of ``tokens`` each takes


def kv_cache_bytes_per_block(model, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers: keys and values."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * element


def min_kv_blocks(max_model_len: int, block_size: int) -> int:
    """Blocks one request of max_model_len tokens needs: the pool's floor."""
    return -(-max_model_len // block_size)


def allocate_kv_caches(model, num_blocks: int, block_size: int, device,
                       dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
    dtype = dtype or model.dtype
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(model.num_layers)]


def kv_cache_dtype(model, config: EngineConfig) -> torch.dtype:
    """The KV caches' element type: the model's, or uint8 holding FP8 E4M3 codes
    (``kv_cache_dtype="fp8"``)."""
    return torch.uint8 if config.kv_cache_dtype == "fp8" else model.dtype


class KVPool:
    """The serving KV caches of every layer in one allocation whose memory can be given back while
    the engine sleeps (a training step in the same process) and taken again at wake-up, zeroed.
    On a GPU it is a ``SleepableMemory``: the pages go and come back at the same address, so the
    captured CUDA graphs stay valid. On the CPU the tensors' storage is resized to nothing and back.
    ``dtype``: the caches' element type (the model's by default; uint8 for FP8 codes)."""

    def __init__(self, model, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype | None = None):
        shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
        dtype = dtype or model.dtype
        self.nbytes = 2 * model.num_layers * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        self.device = device
        self._memory = None
        if device.type == "cuda":
            from tidal import _core

            index = device.index if device.index is not None else torch.cuda.current_device()
            self._memory = _core.kv.SleepableMemory(index, self.nbytes)
            flat = torch.as_tensor(self._memory, device=device)
        else:
            flat = torch.zeros(self.nbytes, dtype=torch.uint8)
        self._flat = flat
        caches = flat.view(dtype).view(model.num_layers, 2, *shape)
        self.caches = [(caches[i, 0], caches[i, 1]) for i in range(model.num_layers)]
        self.is_released = False

    @property
    def flat(self) -> torch.Tensor:
        """The whole pool as bytes, ``[num_layers, 2, num_blocks, block_bytes]`` flattened (what a KV
        connector registers)."""
        return self._flat

    def release(self) -> None:
        """Gives the memory back once the device's pending work is done; the contents are lost."""
        if self.is_released:
            return
        if self._memory is not None:
            self._memory.release()
        else:
            self._flat.untyped_storage().resize_(0)
        self.is_released = True

    def remap(self) -> None:
        """Takes the memory again, zeroed; the caches' tensors are the same objects as before."""
        if not self.is_released:
            return
        if self._memory is not None:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # what training left cached in torch's allocator
            self._memory.remap()
        else:
            self._flat.untyped_storage().resize_(self.nbytes)
            self._flat.zero_()
        self.is_released = False


def multimodal_inputs(model, input_ids: torch.Tensor, positions: torch.Tensor, mm) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, inputs_embeds) of a step with multimodal inputs: the token embeddings with the
    items' rows written at their placeholder rows, and 3-D positions where the step has them."""
    embeds = model.model.embed_tokens(input_ids)
    if mm.embeds is not None:
        rows = torch.from_numpy(mm.rows).to(embeds.device, non_blocking=True)
        embeds.index_copy_(0, rows, mm.embeds.to(embeds.device, embeds.dtype))
    if mm.positions is not None:
        model.ensure_rope_positions(int(mm.positions.max()) + 1)
        positions = torch.from_numpy(mm.positions).to(embeds.device, non_blocking=True)
    return positions, embeds


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class CPUModelRunner:
    """Runs the model on the CPU over the scheduler's arrays (zero-copy tensors), eagerly."""

    def __init__(self, model, config: EngineConfig, max_model_len: int, device: torch.device):
        self.model, self.device = model, device
        cache_dtype = kv_cache_dtype(model, config)
        per_block = kv_cache_bytes_per_block(model, config.block_size, cache_dtype)
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        else:
            budget = min(config.kv_cache_memory_fraction * _available_host_memory(), _CPU_KV_CACHE_CAP_BYTES)
            num_blocks = max(int(budget // per_block), 0)
        floor = min_kv_blocks(max_model_len, config.block_size)
        if num_blocks < floor:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {config.block_size} tokens, fewer than the "
                f"{floor} one request of max_model_len={max_model_len} needs; raise num_kv_blocks "
                f"or kv_cache_memory_fraction, or lower max_model_len")
        self.num_kv_blocks = num_blocks
        self.kv_pool = KVPool(model, num_blocks, config.block_size, device, cache_dtype)
        self.kv_caches = self.kv_pool.caches
        tp = getattr(model, "tp", None)
        self.tp_driver = None if tp is None else tp.driver
        if self.tp_driver is not None:  # the other ranks' caches: as many blocks of their own KV heads
            self.tp_driver.init_caches(num_blocks, config.block_size, cache_dtype == torch.uint8)

    def execute(self, batch, sampling: list[SequenceSampling], mm=None,
                prompt_rows: PromptRows | None = None, fill: TokenFill | None = None) -> PendingSample | None:
        cu_seqlens_q = torch.from_numpy(batch.cu_seqlens_q)
        attn = AttentionMetadata(
            slot_mapping=torch.from_numpy(batch.slot_mapping),
            block_tables=torch.from_numpy(batch.block_tables),
            seq_lens=torch.from_numpy(batch.seq_lens),
            cu_seqlens_q=cu_seqlens_q,
            max_seqlen_q=batch.max_seqlen_q,  # computed by the scheduler with the batch
            max_seqlen_k=batch.max_seqlen_k,
        )
        input_ids = torch.from_numpy(batch.input_ids).to(torch.long)
        if fill is not None:
            input_ids = input_ids.clone()
            input_ids[torch.from_numpy(fill.rows)] = fill.tokens[torch.from_numpy(fill.src)]
        positions = torch.from_numpy(batch.positions)
        with torch.inference_mode():
            inputs_embeds = None
            if mm is not None:
                positions, inputs_embeds = multimodal_inputs(self.model, input_ids, positions, mm)
            if self.tp_driver is not None:
                self.tp_driver.announce_step(input_ids, positions, attn)
            hidden = self.model(input_ids, positions, attn, self.kv_caches, inputs_embeds=inputs_embeds)
            prompt = None if prompt_rows is None else compute_prompt_logprobs(self.model, hidden, prompt_rows)
            last_rows = (cu_seqlens_q[1:] - 1)[torch.from_numpy(batch.needs_sample).bool()]
            if last_rows.numel() == 0:
                return None if prompt is None else PendingSample.of_prompt_logprobs(prompt)
            logits = self.model.compute_logits(hidden[last_rows.long()])
            pending = sample_async(logits, sampling)
            pending.prompt_logprobs = prompt
            return pending


class MemoryBaseline(NamedTuple):
    """The card before an engine loads anything (bytes): what KV pool sizing subtracts, so that
    neither other processes nor other engines of this process are charged to this engine."""

    free: int  # free on the card
    reserved: int  # reserved by torch's allocator in this process
    allocated: int  # allocated by torch's allocator in this process


def device_memory_baseline(device: torch.device) -> MemoryBaseline | None:
    """MemoryBaseline of ``device`` now; None off CUDA."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return MemoryBaseline(free, torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device))


def make_model_runner(model, config: EngineConfig, max_model_len: int, device: torch.device,
                      memory_baseline: MemoryBaseline | None):
    """The runner for ``device``: GPUModelRunner on CUDA, CPUModelRunner otherwise.
    ``memory_baseline`` is device_memory_baseline(device), taken before the model was loaded."""
    if device.type == "cuda":
        from tidal.serve.gpu_model_runner import GPUModelRunner

        return GPUModelRunner(model, config, max_model_len, device, memory_baseline)
    return CPUModelRunner(model, config, max_model_len, device)
