"""The GPU model runner: what is particular to serving on a CUDA device.

- KV pool sizing: after the weights are loaded, a profiling forward at ``max_num_batched_tokens``
  (plus the logits and sampler of ``max_num_seqs`` rows, and for a vision-language model its encoder
  over as many embedding rows, as a step's new images go) measures peak activation memory; the pool
  takes ``kv_cache_memory_fraction`` of the card minus the weights, that peak, the memory outside
  torch's allocator and what the CUDA graphs will hold.
- Step inputs: the scheduler's arrays are packed (numpy, vectorised) into one pinned host buffer and
  sent with one non-blocking copy into a persistent device buffer; the model reads views of it.
  Among them the order in which the attention kernels take the sequences (as scheduled, or
  longest context first with ``LONGEST_FIRST``).
- CUDA graphs: pure decode steps replay graphs captured at start-up for padded batch sizes 1, 2, 4,
  8, then multiples of 8 up to ``max_num_seqs`` (forward and logits); ``enforce_eager=True`` turns
  them off. A captured graph reads its inputs from fixed offsets of the device buffer and its block
  tables from a persistent table, so replay needs no re-capture. A step that computes prompt
  log-probs runs eagerly (a one-token prompt chunk among decodes looks like a decode step).
- Tensor parallelism (a model split by tidal.models.tensor_parallel): every rank builds this runner
  the same way, so start-up's collectives line up; the ranks agree on the smallest KV pool; rank 0
  then hands each step's staged inputs to the others (tidal.serve.tensor_parallel), which replay the
  same graph (its all-reduces captured in it, over NCCL) or run the same eager forward
  (:meth:`follow_step`).
"""

import gc
import math
from dataclasses import dataclass

import numpy as np
import torch

from tidal.models.attention import AttentionMetadata
from tidal.serve.config import EngineConfig
from tidal.serve.model_runner import (KVPool, MemoryBaseline, TokenFill, allocate_kv_caches,
                                      kv_cache_bytes_per_block, kv_cache_dtype, min_kv_blocks, multimodal_inputs)
from tidal.serve.prompt_logprobs import PendingPromptLogprobs, PromptRows, compute_prompt_logprobs
from tidal.serve.sampler import PendingSample, SequenceSampling, sample, sample_async
from tidal.serve.sampling_params import SamplingParams

_GIB = 1 << 30
# NOTE(tidal): the order in which the attention grid takes a step's sequences. With contexts as
# different as S1's (inputs and outputs uniform in [100, 1024]) a batch's blocks differ up to ~10x in
# length; simulated at S1's batches on 132 SMs x 3 resident blocks, longest first would cut the
# attention makespan from 1.12-1.22x its lower bound to 1.03-1.10x. Measured on an H100 (S1, three
# runs each, bench/RESULTS.md) it moved nothing beyond the run-to-run spread (17,797 against 17,851
# tok/s), so steps take their sequences as scheduled; True (bench/serve.py --attention-order
# longest-first) turns the ordering on.
LONGEST_FIRST = False


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Padded decode batch sizes that get a CUDA graph: 1, 2, 4, 8, 16, 24, ... and max_num_seqs."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


@dataclass
class _Layout:
    """Element offsets of one step's inputs in the staging buffers: int64 area (input ids,
    positions, slot mapping, rows to sample), then int32 area (cu_seqlens_q, seq_lens, the attention
    order, the narrow block table). A function of the padded sizes only, so a graph's views stay
    valid."""

    num_tokens: int  # padded
    num_seqs: int    # padded
    num_sample: int
    table_elems: int

    @property
    def i64_elems(self) -> int:
        return 3 * self.num_tokens + self.num_sample

    @property
    def nbytes(self) -> int:
        return 8 * self.i64_elems + 4 * (3 * self.num_seqs + 1 + self.table_elems)


@dataclass
class _StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    sample_rows: torch.Tensor | None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    size: int


def _format_gib(n: float) -> str:
    return f"{n / _GIB:.2f} GiB"


class GPUModelRunner:
    """Runs the model on one CUDA device with persistent inputs and CUDA graphs for decode."""

    # Paged attention merges its key splits inside the decode kernel (False: in a second kernel). Off
    # until measured on a GPU: bench/serve.py --split-merge kernel|separate times the two.
    merge_splits_in_kernel = False

    def __init__(self, model, config: EngineConfig, max_model_len: int, device: torch.device,
                 memory_baseline: MemoryBaseline):
        self.model, self.config, self.device = model, config, device
        self.memory_baseline = memory_baseline
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.max_num_seqs = config.max_num_seqs
        self.max_num_tokens = max(config.max_num_batched_tokens, config.max_num_seqs)
        self.max_blocks_per_seq = math.ceil(max_model_len / config.block_size)
        self.vocab_size = model.config.vocab_size
        self.tp = getattr(model, "tp", None)
        self.tp_driver = None if self.tp is None else self.tp.driver  # on rank 0 of several
        model.ensure_rope_positions(max_model_len)
        rope = model.config.rope_scaling
        dynamic_rope = rope is not None and rope.get("rope_type") == "dynamic"
        # NOTE(tidal): dynamic NTK past max_position_embeddings builds per-token tables on the host
        # (a synchronisation), which a graph cannot hold; such engines run eagerly.
        # Over Gloo (tests of tensor parallelism on one GPU) collectives cannot be captured either.
        self.use_graphs = not config.enforce_eager and not (
            dynamic_rope and max_model_len > model.config.max_position_embeddings) and not (
            self.tp is not None and self.tp.size > 1 and self.tp.comm is None)

        self.cache_dtype = kv_cache_dtype(model, config)
        if self.cache_dtype == torch.uint8 and (model.dtype not in (torch.float16, torch.bfloat16)
                                                or model.head_dim not in (64, 128, 256)):
            raise ValueError(f"kv_cache_dtype='fp8' on the GPU needs a float16 or bfloat16 model with head_dim 64, 128 "
                             f"or 256 (the tensor-core attention kernels read FP8 caches); this model has "
                             f"dtype={model.dtype}, head_dim={model.head_dim}: use kv_cache_dtype='auto'")
        per_block = kv_cache_bytes_per_block(model, config.block_size, self.cache_dtype)
        self.num_kv_blocks = config.num_kv_blocks or self._profile_num_blocks(per_block)
        if self.tp is not None and self.tp.size > 1:  # every rank's pool as small as the smallest
            fewest = torch.tensor([-self.num_kv_blocks], dtype=torch.int64, device=device)
            self.num_kv_blocks = -int(self.tp.all_reduce_max_(fewest).item())
        floor = min_kv_blocks(max_model_len, config.block_size)
        if self.num_kv_blocks < floor:
            raise ValueError(
                f"the KV cache holds {self.num_kv_blocks} blocks of {config.block_size} tokens, fewer than the "
                f"{floor} one request of max_model_len={max_model_len} needs; raise num_kv_blocks or "
                f"kv_cache_memory_fraction, or lower max_model_len")
        self.kv_pool = KVPool(model, self.num_kv_blocks, config.block_size, device, self.cache_dtype)
        self.kv_caches = self.kv_pool.caches

        # The largest step: max_num_tokens tokens of max_num_seqs sequences with full block tables.
        biggest = _Layout(self.max_num_tokens, self.max_num_seqs, self.max_num_seqs,
                          self.max_num_seqs * self.max_blocks_per_seq)
        self._stage = torch.empty(biggest.nbytes, dtype=torch.uint8, device=device)
        self._graph_tables = torch.zeros(self.max_num_seqs, self.max_blocks_per_seq, dtype=torch.int32, device=device)
        # paged attention's in-kernel merge of key splits (flash-decoding in one kernel): zeros that each
        # call leaves at zero; one set serves every layer and graph, as they run one after another
        self._split_counters = torch.zeros(self.max_num_seqs * model.num_heads, dtype=torch.int32, device=device) \
            if self.merge_splits_in_kernel else None
        # NOTE(tidal): decode logits stay in the model's dtype; the sampler widens only the rows that
        # need more than an argmax (the argmax of bf16 logits is that of their exact fp32 widening).
        # Writing fp32 cost a conversion and a copy of [256, 151936]: 0.19 ms of an S1 step (H200).
        self._logits = torch.empty(self.max_num_seqs, self.vocab_size, dtype=model.dtype, device=device)
        self._graphs: dict[int, _Graph] = {}
        self._graph_sizes: list[int] = []
        if self.use_graphs:
            self._capture_graphs()
        if self.tp_driver is not None:  # start-up is over: from now on the workers follow rank 0
            self.tp_driver.silent = False

    # ---- KV pool sizing ----------------------------------------------------------------------------

    def _profile_num_blocks(self, per_block: int) -> int:
        device, cfg = self.device, self.config
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = self.memory_baseline
        weights = torch.cuda.memory_allocated(device) - base.allocated  # this engine's weights
        num_tokens = self.max_num_tokens
        lengths = [min(self.max_model_len, num_tokens - start) for start in range(0, num_tokens, self.max_model_len)]
        lengths = lengths[: self.max_num_seqs]
        num_tokens = sum(lengths)
        # NOTE(tidal): a one-block cache per layer; every block table entry is 0 and no slot is
        # written, so the forward reads valid memory and measures activations alone.
        caches = allocate_kv_caches(self.model, 1, self.block_size, device, self.cache_dtype)
        width = math.ceil(max(lengths) / self.block_size)
        cu = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
        positions = np.concatenate([np.arange(n) for n in lengths]).astype(np.int64)
        attn = AttentionMetadata(
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
            block_tables=torch.zeros(len(lengths), width, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(lengths, dtype=torch.int32, device=device),
            cu_seqlens_q=torch.from_numpy(cu).to(device), max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
        rows = min(self.max_num_seqs, num_tokens)
        with torch.inference_mode():
            ids = torch.randint(0, self.vocab_size, (num_tokens,), device=device)
            hidden = self.model(ids, torch.from_numpy(positions).to(device), attn, caches)
            logits = self.model.compute_logits(hidden[-rows:])
            del hidden
            params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=0)
            sample(logits, [SequenceSampling(params, [0], [], seed=i) for i in range(rows)])
            del logits
            if hasattr(self.model, "dummy_multimodal_input"):  # the engine encodes a step's new items at once
                self.model.encode_multimodal(*self.model.dummy_multimodal_input(num_tokens))
        del caches, attn
        torch.cuda.synchronize(device)
        activations = torch.cuda.max_memory_allocated(device) - base.allocated - weights
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        # What this engine added outside torch's allocator since it started (libraries, workspaces);
        # other processes and engines are not charged to it.
        outside = max((base.free - free) - (torch.cuda.memory_reserved(device) - base.reserved), 0)
        graphs = 0
        if self.use_graphs:  # the decode graphs' pool: activations of max_num_seqs rows, plus slack
            graphs = 2 * self.max_num_seqs * self.vocab_size * 4 + _GIB // 2
        budget = cfg.kv_cache_memory_fraction * total - weights - activations - outside - graphs
        # NOTE(tidal): the fraction is this engine's share; whatever other processes hold, the pool
        # never takes more than is free now (keeping the graphs' pool and a margin).
        budget = min(budget, free - graphs - _GIB // 4)
        num_blocks = int(max(budget, 0) // per_block)
        floor = min_kv_blocks(self.max_model_len, self.block_size)
        if num_blocks < floor:
            per_token = per_block // self.block_size
            raise ValueError(
                f"max_model_len={self.max_model_len} does not fit on {torch.cuda.get_device_name(device)}: one "
                f"request needs {_format_gib(floor * per_block)} of KV cache ({per_token} bytes per token), but of "
                f"kv_cache_memory_fraction={cfg.kv_cache_memory_fraction} x {_format_gib(total)} only "
                f"{_format_gib(max(budget, 0))} is left after the weights ({_format_gib(weights)}), peak "
                f"activations at max_num_batched_tokens={cfg.max_num_batched_tokens} ({_format_gib(activations)}), "
                f"CUDA graphs ({_format_gib(graphs)}) and this process's memory outside torch "
                f"({_format_gib(outside)}; {_format_gib(free)} free now); lower max_model_len or "
                f"max_num_batched_tokens, or raise kv_cache_memory_fraction")
        return num_blocks

    # ---- step inputs -------------------------------------------------------------------------------

    def _stage_inputs(self, batch, padded: int | None) -> _StepInputs:
        """Packs the step's arrays into one pinned buffer, copies it to the device once, and returns
        views. ``padded`` (a graph size) pads a decode batch with sequences that write nothing."""
        n, num_tokens = batch.num_seqs, len(batch.input_ids)
        width = batch.max_num_blocks
        seqs = padded or n
        tokens = padded or num_tokens
        needs = batch.needs_sample
        sample_rows = None if padded else (batch.cu_seqlens_q[1:] - 1)[needs]
        layout = _Layout(tokens, seqs, 0 if padded else len(sample_rows), n * width)
        host = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=True)
        h64 = host[: 8 * layout.i64_elems].numpy().view(np.int64)
        h32 = host[8 * layout.i64_elems:].numpy().view(np.int32)
        h64[:num_tokens] = batch.input_ids
        h64[num_tokens:tokens] = 0
        h64[tokens:tokens + num_tokens] = batch.positions
        h64[tokens + num_tokens:2 * tokens] = 0
        h64[2 * tokens:2 * tokens + num_tokens] = batch.slot_mapping
        h64[2 * tokens + num_tokens:3 * tokens] = -1  # padding writes no cache slot
        if sample_rows is not None:
            h64[3 * tokens:] = sample_rows
        h32[:n + 1] = batch.cu_seqlens_q
        h32[n + 1:seqs + 1] = num_tokens + np.arange(1, seqs - n + 1, dtype=np.int32)  # one token per padded seq
        h32[seqs + 1:seqs + 1 + n] = batch.seq_lens
        h32[seqs + 1 + n:2 * seqs + 1] = 1
        lens = h32[seqs + 1:2 * seqs + 1]
        h32[2 * seqs + 1:3 * seqs + 1] = np.argsort(-lens, kind="stable") if LONGEST_FIRST else np.arange(seqs)
        h32[3 * seqs + 1:] = batch.block_tables.reshape(-1)
        stage = self._stage[: layout.nbytes]
        stage.copy_(host, non_blocking=True)
        if self.tp_driver is not None:
            self.tp_driver.announce_step(stage, padded or 0, layout, batch.max_seqlen_q, batch.max_seqlen_k, n, width)
        return self._views(layout, batch.max_seqlen_q, batch.max_seqlen_k, n, width, padded is not None)

    def _views(self, layout: _Layout, max_seqlen_q: int, max_seqlen_k: int, n: int, width: int,
               graph: bool) -> _StepInputs:
        tokens, seqs = layout.num_tokens, layout.num_seqs
        d64 = self._stage[: 8 * layout.i64_elems].view(torch.int64)
        d32 = self._stage[8 * layout.i64_elems: layout.nbytes].view(torch.int32)
        table = d32[3 * seqs + 1: 3 * seqs + 1 + n * width].view(n, width)
        if graph:
            self._graph_tables[:n, :width].copy_(table)
            table = self._graph_tables[:seqs]
        attn = AttentionMetadata(
            slot_mapping=d64[2 * tokens:3 * tokens], block_tables=table,
            seq_lens=d32[seqs + 1:2 * seqs + 1], cu_seqlens_q=d32[:seqs + 1],
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, split_counters=self._split_counters,
            seq_order=d32[2 * seqs + 1:3 * seqs + 1] if LONGEST_FIRST else None)
        rows = None if graph else d64[3 * tokens:3 * tokens + layout.num_sample]
        return _StepInputs(d64[:tokens], d64[tokens:2 * tokens], attn, rows)

    # ---- CUDA graphs -------------------------------------------------------------------------------

    def _graph_size(self, batch) -> int | None:
        if not self._graph_sizes or batch.max_seqlen_q != 1 or batch.num_seqs > self._graph_sizes[-1]:
            return None
        for size in self._graph_sizes:
            if size >= batch.num_seqs:
                return size
        return None

    def _dummy_decode(self, size: int) -> _StepInputs:
        """Inputs of a decode step of ``size`` sequences of length 1 that write no cache slot."""
        layout = _Layout(size, size, 0, 0)
        host = torch.zeros(layout.nbytes, dtype=torch.uint8)
        h64 = host[: 8 * layout.i64_elems].numpy().view(np.int64)
        h32 = host[8 * layout.i64_elems:].numpy().view(np.int32)
        h64[2 * size:3 * size] = -1
        h32[:size + 1] = np.arange(size + 1)
        h32[size + 1:2 * size + 1] = 1
        h32[2 * size + 1:3 * size + 1] = np.arange(size)
        self._stage[: layout.nbytes].copy_(host)
        # max_seqlen_k at its largest: the split-K plan then holds for any context up to max_model_len
        return self._views(layout, 1, self.max_model_len, 0, 0, True)

    def _capture_graphs(self) -> None:
        sizes = capture_sizes(self.max_num_seqs)
        pool = torch.cuda.graph_pool_handle()
        # NOTE(tidal): a garbage collection inside a capture can free an earlier engine's pinned
        # buffers, whose release touches CUDA events: an operation a capturing process may not do,
        # which invalidates the capture (seen as the next kernel's launch failing). Collect first and
        # keep the collector off while capturing.
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        # NOTE(tidal): an engine built on a stream of its own captures there (torch would otherwise
        # capture on a side stream of its own): a graph captured on a stream of an SM group
        # (tidal.serve.disagg_local.SmGroups) runs its kernels on that group's SMs when replayed.
        current = torch.cuda.current_stream(self.device)
        capture_stream = None if current == torch.cuda.default_stream(self.device) else current
        try:
            with torch.inference_mode():
                for size in reversed(sizes):  # largest first: the smaller ones reuse its pool memory
                    inputs = self._dummy_decode(size)
                    self._forward_logits(inputs, size)  # warm-up outside the graph (cuBLAS handles, workspaces)
                    torch.cuda.synchronize(self.device)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=capture_stream):
                        self._forward_logits(inputs, size)
                    self._graphs[size] = _Graph(graph, size)
        finally:
            if gc_was_enabled:
                gc.enable()
        torch.cuda.synchronize(self.device)
        self._graph_sizes = sizes

    def follow_step(self, layout: _Layout, graph_size: int, max_seqlen_q: int, max_seqlen_k: int, num_seqs: int,
                    width: int) -> None:
        """A tensor-parallel worker's step, its inputs already received into the staging buffer:
        the graph of ``graph_size`` replayed, or (0) the eager forward; logits follow as announced."""
        inputs = self._views(layout, max_seqlen_q, max_seqlen_k, num_seqs, width, graph_size > 0)
        if graph_size:
            self._graphs[graph_size].graph.replay()
        else:
            self.model(inputs.input_ids, inputs.positions, inputs.attn, self.kv_caches)

    def _forward_logits(self, inputs: _StepInputs, size: int) -> None:
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.attn, self.kv_caches)
        self.model.compute_logits(hidden, out=self._logits[:size])

    # ---- the step ----------------------------------------------------------------------------------

    def execute(self, batch, sampling: list[SequenceSampling], mm=None,
                prompt_rows: PromptRows | None = None, fill: TokenFill | None = None) -> PendingSample | None:
        if not sampling and not batch.needs_sample.any():
            _, prompt = self._run_eager(batch, mm, prompt_rows, fill)
            return None if prompt is None else PendingSample.of_prompt_logprobs(prompt)
        # image rows and 3-D positions, or prompt log-probs (logits of more rows than a graph has): eager
        size = None if mm is not None or prompt_rows is not None else self._graph_size(batch)
        prompt = None
        with torch.inference_mode():
            if size is not None:
                self._fill_tokens(self._stage_inputs(batch, size), fill)
                self._graphs[size].graph.replay()
                n = batch.num_seqs
                needs = batch.needs_sample
                if needs.all():
                    logits = self._logits[:n]
                else:
                    rows = torch.from_numpy(np.nonzero(needs)[0]).pin_memory().to(self.device, non_blocking=True)
                    logits = self._logits.index_select(0, rows)
            else:
                logits, prompt = self._run_eager(batch, mm, prompt_rows, fill)
                if logits is None:
                    return None if prompt is None else PendingSample.of_prompt_logprobs(prompt)
            pending = sample_async(logits, sampling)
            pending.prompt_logprobs = prompt
            return pending

    def _fill_tokens(self, inputs: _StepInputs, fill: TokenFill | None) -> None:
        """The placeholders among the staged input ids, from the previous step's sampled ids (queued
        after that step on the stream: the host never waits for them)."""
        if fill is None:
            return
        k = len(fill.rows)
        index = torch.from_numpy(np.concatenate((fill.rows, fill.src))).pin_memory().to(self.device, non_blocking=True)
        inputs.input_ids.index_copy_(0, index[:k], fill.tokens.index_select(0, index[k:]))

    def _run_eager(self, batch, mm=None, prompt_rows: PromptRows | None = None, fill: TokenFill | None = None
                   ) -> tuple[torch.Tensor | None, PendingPromptLogprobs | None]:
        """(logits of the rows to sample or None, the prompt log-probs of ``prompt_rows`` or None)."""
        with torch.inference_mode():
            inputs = self._stage_inputs(batch, None)
            self._fill_tokens(inputs, fill)
            positions, inputs_embeds = inputs.positions, None
            if mm is not None:
                positions, inputs_embeds = multimodal_inputs(self.model, inputs.input_ids, positions, mm)
            hidden = self.model(inputs.input_ids, positions, inputs.attn, self.kv_caches, inputs_embeds=inputs_embeds)
            prompt = None
            if prompt_rows is not None:
                prompt = compute_prompt_logprobs(self.model, hidden, prompt_rows, rows_per_slice=self.max_num_seqs)
            if inputs.sample_rows is None or inputs.sample_rows.numel() == 0:
                return None, prompt
            return self.model.compute_logits(hidden.index_select(0, inputs.sample_rows)), prompt
