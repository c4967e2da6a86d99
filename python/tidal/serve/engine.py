"""The serving engine: the C++ scheduler and KV cache manager, the model runner, and the per-request
bookkeeping (sampling state, detokenization, stop strings, outputs) around them.

Each ``step()`` asks the scheduler for one flat batch (chunked prefills mixed with decodes under one
token budget), runs the model over it with paged attention, samples the rows that reached the end
of their known tokens, hands the tokens back to the scheduler (which applies token stop conditions
and frees finished requests' blocks), and returns the outputs that changed.
"""

import itertools
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from tidal import _core
from tidal.models.loader import load_model, resolve_dtype
from tidal.serve.config import EngineConfig, resolve_device
from tidal.serve.disagg import KVTransfers
from tidal.serve.host_memory import HostMemoryTrimmer
from tidal.serve.model_runner import TokenFill, device_memory_baseline, make_model_runner
from tidal.serve.multimodal import (EncoderCache, MultiModalItem, MultiModalProcessor, MultiModalPrompt,
                                    gather_step_inputs)
from tidal.serve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tidal.serve.prompt_logprobs import PromptLogprobs, isolated_cache_keys, plan_prompt_rows
from tidal.serve.sampler import PendingSample, SequenceSampling
from tidal.serve.sampling_params import SamplingParams
from tidal.tokenizer import IncrementalDetokenizer, Tokenizer

_sched = _core.sched
_Status = _sched.RequestStatus
_FINISH_REASONS = {
    _Status.FINISHED_STOPPED: "stop",
    _Status.FINISHED_LENGTH: "length",
    _Status.FINISHED_ABORTED: "abort",
    _Status.FINISHED_ERROR: "error",
}


@dataclass
class _Sequence:
    """One sample of one request, as the engine tracks it."""

    seq_id: int
    index: int
    request: "_Request"
    sampling: SequenceSampling
    detokenizer: IncrementalDetokenizer | None
    logprobs: list[dict[int, float]] | None
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_processed: int = 0  # output tokens whose text, log-probs and stop strings are processed

    def output(self) -> CompletionOutput:
        tokens = self.sampling.output_token_ids[:self.num_processed]
        return CompletionOutput(self.index, self.text, tokens, self.finish_reason,
                                self.stop_reason, None if self.logprobs is None else list(self.logprobs))


@dataclass
class ProcessedPrompt:
    """A prompt ready to queue (what :meth:`LLMEngine.process_prompt` returns and ``add_request``
    also takes): its text if it had one, its token ids (placeholders expanded), and a multimodal
    prompt's state."""

    text: str | None
    token_ids: list[int]
    multimodal: MultiModalPrompt | None = None


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    seqs: list[_Sequence] = field(default_factory=list)
    error: str | None = None
    multimodal: MultiModalPrompt | None = None
    remote_decode: bool = False  # prefill role: hold the blocks for a decode engine
    kv_hold: str | None = None  # the transfer id of those held blocks
    kv_transfer_params: dict | None = None  # prefill role: what the decode engine needs
    prompt_logprobs: PromptLogprobs | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_token_ids),
                             [s.output() for s in self.seqs], self.finished, self.metrics, self.error,
                             self.metrics.num_cached_tokens,
                             self.kv_transfer_params if self.finished else None,
                             None if self.prompt_logprobs is None else self.prompt_logprobs.output())


@dataclass
class _InFlight:
    """Asynchronous scheduling: a step launched and applied with placeholder tokens (update_pending),
    whose sampled tokens are still on their way from the device."""

    batch: object  # the scheduler's output (keeps its arrays alive)
    sample_ids: list[int]  # the sequences that sample, in the order of the step's sampled rows
    pending: PendingSample
    finished: dict[int, str]  # seq id -> finish reason of the length stops update_pending applied


def _shared_model(model: torch.nn.Module, config: EngineConfig):
    """A tidal model served in place (its parameters shared with whoever else holds it, such as a
    training engine): checked, not copied."""
    model_config = getattr(model, "config", None)
    if model_config is None or not hasattr(model, "compute_logits"):
        raise ValueError(f"model={type(model).__name__} is not a tidal model (tidal.models.load_model builds one)")
    params = list(model.parameters())
    if any(p.device.type == "meta" or (p.numel() == 0) for p in params):
        raise ValueError("model's parameters are not materialised (a ZeRO-3 engine frees them between uses); "
                         "serve a stage 0-2 engine's module, or a checkpoint")
    devices, dtypes = {p.device for p in params}, {p.dtype for p in params}
    if len(devices) != 1 or len(dtypes) != 1:
        raise ValueError(f"model's parameters must share one device and one dtype, got {sorted(map(str, devices))} "
                         f"and {sorted(map(str, dtypes))}")
    device, dtype = devices.pop(), dtypes.pop()
    if config.device != "auto" and resolve_device(config.device) != device:
        raise ValueError(f"device={config.device!r} but the model's parameters are on {device}")
    if config.dtype != "auto" and resolve_dtype(config.dtype, model_config) != dtype:
        raise ValueError(f"dtype={config.dtype!r} but the model's parameters are {dtype}")
    return model, model_config


def _start_tensor_parallel(config: EngineConfig, device: torch.device):
    """The workers of a tensor-parallel engine, started before rank 0 loads its own copy."""
    size = config.tensor_parallel_size
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"tensor_parallel_size={size} runs on CUDA GPUs (NCCL) or the CPU (Gloo), not on {device}")
    from tidal.models.config import ModelConfig
    from tidal.models.tensor_parallel import check_config_shardable
    from tidal.serve import tensor_parallel

    model_config = ModelConfig.from_pretrained(config.model)
    check_config_shardable(model_config, size)
    max_model_len = config.max_model_len or model_config.max_position_embeddings
    rank = tensor_parallel.torchrun_rank(size)
    if rank is not None and rank > 0:
        raise ValueError(f"under torchrun only rank 0 builds the engine; this is rank {rank}: call "
                         f"tidal.serve.tensor_parallel.run_torchrun_worker(config) there (as `tidal serve` and "
                         f"`tidal generate` do)")
    if device.type == "cuda":
        backend = tensor_parallel.tensor_parallel_backend()
        first, count = device.index or 0, torch.cuda.device_count()
        if backend == "nccl" and rank is None and first + size > count:
            raise ValueError(f"tensor_parallel_size={size} needs one GPU per rank, cuda:{first} to "
                             f"cuda:{first + size - 1}, but this machine has {count}")
        return tensor_parallel.GPUTensorParallelDriver(config, size, max_model_len, device)
    return tensor_parallel.TensorParallelDriver(config.model, str(config.dtype).removeprefix("torch."), size,
                                                max_model_len, config.quantization)


class LLMEngine:
    """Continuous batching over the paged KV cache for one model on one device."""

    def __init__(self, config: EngineConfig):
        self.config = config
        # The device's memory before this engine adds to it: the KV pool's budget counts only this
        # process's memory, so several engines (disaggregated roles) can share one GPU.
        self.tp_driver = None
        if isinstance(config.model, torch.nn.Module):
            if config.tensor_parallel_size > 1:
                raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size} needs a checkpoint directory "
                                 f"(each rank loads its slice), not a model object")
            self.model, self.model_config = _shared_model(config.model, config)
            self.device = next(self.model.parameters()).device
            baseline = device_memory_baseline(self.device)
        else:
            self.device = resolve_device(config.device)
            baseline = device_memory_baseline(self.device)
            if config.tensor_parallel_size > 1:
                self.tp_driver = _start_tensor_parallel(config, self.device)
            try:
                if self.tp_driver is not None:  # rank 0's slice, read as every rank reads its own
                    self.model = self.tp_driver.load(config.model, config.dtype, self.device, config.quantization)
                    self.model_config = self.model.config
                else:
                    self.model, self.model_config = load_model(config.model, dtype=config.dtype, device=self.device,
                                                               quantization=config.quantization)
            except BaseException:
                if self.tp_driver is not None:
                    self.tp_driver.close()
                raise
        self.dtype = next(self.model.parameters()).dtype
        # On a GPU the host plans step n+1 while the device computes step n (S1 +5-6% and S2 -2.6% per
        # token on an H100, bench/RESULTS.md); on the CPU the model runs on the planning thread, so
        # there is nothing to overlap and a stop token would cost a wasted step.
        self.async_scheduling = (self.device.type == "cuda" if config.async_scheduling is None
                                 else config.async_scheduling)
        tokenizer_dir = config.tokenizer or (None if isinstance(config.model, torch.nn.Module) else config.model)
        try:
            self.tokenizer: Tokenizer | None = Tokenizer(tokenizer_dir) if tokenizer_dir else None
        except ValueError:
            if config.tokenizer:
                raise
            self.tokenizer = None
        self.vocab_size = self.model_config.vocab_size

        max_positions = self.model_config.max_position_embeddings
        self.max_model_len = config.max_model_len or max_positions
        if self.max_model_len > max_positions and not self.model_config.rope_scaling:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's "
                             f"max_position_embeddings={max_positions}")
        try:
            self.runner = make_model_runner(self.model, config, self.max_model_len, self.device, baseline)
        except BaseException:
            if self.tp_driver is not None:
                self.tp_driver.close()
            raise
        num_blocks = self.num_kv_blocks = self.runner.num_kv_blocks
        self.kv_caches = self.runner.kv_caches
        self.scheduler = _sched.Scheduler(_sched.SchedulerConfig(
            num_kv_blocks=num_blocks, block_size=config.block_size, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=self.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching,
            policy=_sched.Policy.PRIORITY if config.scheduling_policy == "priority" else _sched.Policy.FCFS))
        self._rng = random.Random(config.seed)
        self._seq_ids = itertools.count(1)
        self._requests: dict[str, _Request] = {}
        self._seqs: dict[int, _Sequence] = {}
        self._unscheduled: set[int] = set()  # sequences no step has run yet (their metrics start there)
        self._inflight: _InFlight | None = None  # asynchronous scheduling: the step whose tokens are pending
        self._num_penalized = 0  # unfinished sequences with penalties (they need every token before sampling)
        self._lagged = None  # (sequences with their last tokens, time): bookkeeping for the next step
        self._eos_token_ids = list(self.tokenizer.eos_token_ids) if self.tokenizer else []
        if not self._eos_token_ids and self.model_config.eos_token_ids:
            self._eos_token_ids = list(self.model_config.eos_token_ids)
        self.is_multimodal = bool(getattr(self.model, "modalities", ()))
        self._mm_processor = None
        if self.is_multimodal:
            self._mm_processor = MultiModalProcessor(
                self.model, None if isinstance(config.model, torch.nn.Module) else config.model)
        self.encoder_cache = EncoderCache(config.encoder_cache_bytes)
        self._host_memory = HostMemoryTrimmer()  # RSS stays flat in a long-running server
        self._mm_prompts: dict[int, MultiModalPrompt] = {}  # seq id -> state, of unfinished multimodal requests
        self._prompt_logprobs: dict[int, PromptLogprobs] = {}  # seq id -> its request's, while the prompt computes
        self._cache_salts = itertools.count(1)
        self.transfers: KVTransfers | None = None
        if config.kv_role is not None:
            if self.is_multimodal:
                raise ValueError(f"kv_role={config.kv_role!r}: disaggregated serving of vision-language models is "
                                 f"not supported")
            self.transfers = KVTransfers(self, config)
        self._mm_counts = {"encoder_runs": 0, "encoder_calls": 0, "encoder_cache_hits": 0}

    # ---- requests --------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: "str | list[int] | dict", params: SamplingParams | None = None,
                    priority: int = 0, kv_transfer_params: dict | None = None) -> None:
        """Queues a prompt for generation: text, token ids, or (vLLM's shape) a dict with "prompt" or
        "prompt_token_ids", and for a vision-language model "multi_modal_data" ({"image": an image
        or a list, "video": frames, a file or a list}) and "mm_processor_kwargs" ({"fps": ...,
        "max_frames": ...} for videos read from files). Bad input is a ValueError naming it.

        ``priority`` matters under ``scheduling_policy="priority"``: lower values are served first and
        preempted last (vLLM's convention). ``kv_transfer_params`` (disaggregated serving, see
        tidal.serve.disagg): ``{"do_remote_decode": True}`` on a prefill engine; a prefill engine's
        output ``kv_transfer_params`` on a decode engine."""
        params = params or SamplingParams()
        if kv_transfer_params is not None:
            self.check_transfer_params(kv_transfer_params, params)
        if self.is_sleeping:
            raise RuntimeError("the engine is asleep (its KV cache memory is released); call wake_up() first")
        if request_id in self._requests:
            raise ValueError(f"request_id={request_id!r} is already in use")
        incoming = self.transfers is not None and self.transfers.role == "decode" and kv_transfer_params is not None
        if incoming:  # the prompt's ids are the ones the prefill engine computed
            prompt = ProcessedPrompt(prompt if isinstance(prompt, str) else None,
                                     [int(t) for t in kv_transfer_params["prompt_token_ids"]])
        elif not isinstance(prompt, ProcessedPrompt):
            prompt = self.process_prompt(prompt, params)
        prompt_text, prompt_ids, multimodal = prompt.text, prompt.token_ids, prompt.multimodal
        request = _Request(request_id, prompt_text, prompt_ids, params, RequestMetrics(time.monotonic()),
                           multimodal=multimodal, remote_decode=kv_transfer_params is not None and not incoming)
        extra_keys = multimodal.extra_keys if multimodal else []
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = PromptLogprobs(prompt_ids, params.prompt_logprobs)
            if self.config.enable_prefix_caching:
                salt = (1 << 63) | next(self._cache_salts)
                extra_keys = isolated_cache_keys(len(prompt_ids), self.config.block_size, extra_keys, salt)
        first_seq = -1
        for index in range(params.n):
            seq_id = next(self._seq_ids)
            seed = None
            if incoming and not params.is_greedy:
                seed = kv_transfer_params.get("seed")  # the prefill engine's, so samples continue alike
            elif not params.is_greedy:
                seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
                seed = seed if index == 0 else (seed * 1_000_003 + index) % (1 << 63)
            detokenizer = None
            if self.tokenizer is not None:
                detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
            blocked = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else set(self._eos_token_ids)))
            sampling = SequenceSampling(params, prompt_ids, [], seed, blocked if params.min_tokens else [])
            seq = _Sequence(seq_id, index, request, sampling,
                            detokenizer, [] if params.logprobs is not None else None)
            self._seqs[seq_id] = seq
            self._unscheduled.add(seq_id)
            self._num_penalized += params.has_penalties
            request.seqs.append(seq)
            if multimodal is not None:
                self._mm_prompts[seq_id] = multimodal
            if request.prompt_logprobs is not None and not request.prompt_logprobs.is_complete:
                self._prompt_logprobs[seq_id] = request.prompt_logprobs
            if incoming:
                self.transfers.add(seq, kv_transfer_params, priority)
                continue
            self.scheduler.add_request(seq_id, prompt_ids, self.stop_params(params), priority=priority,
                                       share_prompt_with=first_seq, extra_keys=extra_keys)
            if first_seq < 0:
                first_seq = seq_id
        self._requests[request_id] = request

    def stop_params(self, params: SamplingParams):
        """The scheduler's stop conditions of a request with ``params``."""
        return _sched.StopParams(params.max_tokens, min_tokens=params.min_tokens, stop_token_ids=params.stop_token_ids,
                                 eos_token_ids=self._eos_token_ids, ignore_eos=params.ignore_eos)

    def check_transfer_params(self, kv_transfer_params: dict, params: SamplingParams) -> None:
        """ValueError naming what is wrong with a request's kv_transfer_params for this engine."""
        if not isinstance(kv_transfer_params, dict):
            raise ValueError(f"kv_transfer_params must be an object, got {type(kv_transfer_params).__name__}")
        role = None if self.transfers is None else self.transfers.role
        if role is None:
            raise ValueError("kv_transfer_params given, but this engine serves with no kv_role (start it with "
                             "kv_role='prefill' or 'decode')")
        if params.n != 1:
            raise ValueError(f"n={params.n}: disaggregated serving takes one sample per request")
        if params.prompt_logprobs is not None:
            raise ValueError(f"prompt_logprobs={params.prompt_logprobs}: disaggregated serving does not return "
                             f"prompt log-probs")
        if role == "prefill":
            if kv_transfer_params.get("do_remote_decode") is not True:
                raise ValueError("a prefill engine takes kv_transfer_params={'do_remote_decode': true}")
        else:
            self.transfers.check_params(kv_transfer_params)
            if params.max_tokens < 2:
                raise ValueError(f"max_tokens={params.max_tokens}: the prefill engine's first token ends the request; "
                                 f"a decode engine needs max_tokens >= 2")

    def process_prompt(self, prompt: "str | list[int] | dict", params: SamplingParams) -> ProcessedPrompt:
        """The prompt tokenized (and a multimodal one's items preprocessed, its placeholders
        expanded to their rows), or a ValueError naming what is wrong. A ProcessedPrompt is returned as it is."""
        if isinstance(prompt, ProcessedPrompt):
            return prompt
        data, options = None, None
        if isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data", "mm_processor_kwargs"}
            if unknown or ("prompt" in prompt) == ("prompt_token_ids" in prompt):
                raise ValueError(f"a prompt dict holds 'prompt' or 'prompt_token_ids' (one of them), optionally "
                                 f"'multi_modal_data' and 'mm_processor_kwargs'; got keys {sorted(prompt)}")
            data, options = prompt.get("multi_modal_data"), prompt.get("mm_processor_kwargs")
            prompt = prompt["prompt"] if "prompt" in prompt else prompt["prompt_token_ids"]
            if isinstance(prompt, dict):
                raise ValueError("a prompt dict's 'prompt' must be a string or token ids")
        prompt_text, prompt_ids = self._tokenize(prompt)
        multimodal = None
        if data:
            if not self.is_multimodal:
                raise ValueError(f"multi_modal_data given, but {self.model_config.architecture} is a text-only model")
            multimodal = self._mm_processor.process(prompt_ids, data, self.config.block_size, options)
            prompt_ids = multimodal.token_ids
            if multimodal.mrope is not None and int(multimodal.mrope.max(initial=0)) >= self.max_model_len:
                raise ValueError(f"the prompt's rotary positions reach {int(multimodal.mrope.max())}; they must stay "
                                 f"below max_model_len={self.max_model_len}")
        elif options:
            raise ValueError("mm_processor_kwargs given without multi_modal_data")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; it must be shorter than "
                             f"max_model_len={self.max_model_len}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.vocab_size:
                raise ValueError(f"{name}={value} exceeds the vocabulary size {self.vocab_size}")
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids={bad} holds ids outside the vocabulary (size {self.vocab_size})")
        return ProcessedPrompt(prompt_text, prompt_ids, multimodal)

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt={prompt[:40]!r} is text but the model has no tokenizer.json; "
                                 "pass token ids")
            ids = self.tokenizer.encode(prompt)
            text = prompt
        else:
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise ValueError(f"prompt={prompt!r} must be a string or a list of token ids") from None
            text = None
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:8]} are outside the vocabulary [0, {self.vocab_size})")
        if not ids:
            raise ValueError("prompt is empty: it must hold at least one token")
        return text, ids

    def abort_request(self, request_id: str) -> bool:
        """Ends every sample of the request with finish_reason "abort" and frees its blocks."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        for seq in request.seqs:
            if seq.finish_reason is None:
                self.scheduler.abort_request(seq.seq_id)
                if self.transfers is not None:
                    self.transfers.abort(seq.seq_id)
                self._finish(seq, "abort")
        self._release(request)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    def stats(self) -> dict:
        stats = dict(self.scheduler.stats())
        if self.is_multimodal:  # items encoded, encoder calls, items served from the encoder cache, its size
            stats.update(self._mm_counts, encoder_cache_entries=len(self.encoder_cache),
                         encoder_cache_bytes=self.encoder_cache.bytes)
        return stats

    def _encode_items(self, needs: list[tuple[MultiModalPrompt, int, MultiModalItem]]) -> list[torch.Tensor]:
        """The embeddings of the items one step reads, in order: held by their request, else from the
        encoder cache, else encoded and cached. The step's new items are encoded together: one encoder
        call per modality (and, for a fixed-size encoder, per pixel shape) of at most
        ``max_num_batched_tokens`` embedding rows, an item the step reads twice encoded once (the
        second read counts as a cache hit). stats' encoder_runs counts items encoded, encoder_calls
        the calls. A request holds its items' embeddings until its chunks have consumed them."""
        new: dict[int, MultiModalItem] = {}  # content hash -> the item to encode
        for prompt, index, item in needs:
            if index in prompt.held:
                continue
            embeds = self.encoder_cache.get(item.content_hash)
            if embeds is not None or item.content_hash in new:
                self._mm_counts["encoder_cache_hits"] += 1
                if embeds is not None:
                    prompt.held[index] = embeds
            else:
                new[item.content_hash] = item
        encoded: dict[int, torch.Tensor] = {}
        groups: dict[tuple, list[MultiModalItem]] = {}
        for item in new.values():
            shape = None if item.grid_thw is not None else tuple(item.pixel_values.shape[1:])
            groups.setdefault((item.modality, shape), []).append(item)
        budget = self.config.max_num_batched_tokens
        for (modality, _), items in groups.items():
            start = 0
            while start < len(items):
                end, rows = start + 1, items[start].num_tokens
                while end < len(items) and rows + items[end].num_tokens <= budget:
                    rows += items[end].num_tokens
                    end += 1
                self._encode_batch(modality, items[start:end], encoded)
                start = end
        for prompt, index, item in needs:
            if index not in prompt.held:
                prompt.held[index] = encoded[item.content_hash]
        return [prompt.held[index] for prompt, index, _ in needs]

    def _encode_batch(self, modality: str, items: list[MultiModalItem], encoded: dict[int, torch.Tensor]) -> None:
        """One encoder call over ``items`` (one modality); each item's rows go into ``encoded`` and the
        encoder cache."""
        pixels = torch.cat([item.pixel_values for item in items])
        grids = None if items[0].grid_thw is None else torch.tensor([item.grid_thw for item in items])
        out = self.model.encode_multimodal(modality, pixels, grids)
        if len(out) != len(items):
            raise RuntimeError(f"the encoder gave {len(out)} embeddings for {len(items)} {modality} items")
        for item, embeds in zip(items, out):
            if embeds.shape[0] != item.num_tokens:
                raise RuntimeError(f"the encoder gave {embeds.shape[0]} rows for a {modality} that takes "
                                   f"{item.num_tokens} placeholder tokens")
            # a view into the batch's output would keep all of it alive in the cache
            embeds = embeds.clone() if len(items) > 1 else embeds
            encoded[item.content_hash] = embeds
            self.encoder_cache.put(item.content_hash, embeds)
        self._mm_counts["encoder_runs"] += len(items)
        self._mm_counts["encoder_calls"] += 1

    # ---- sleep ----------------------------------------------------------------------------------

    @property
    def is_sleeping(self) -> bool:
        return self.runner.kv_pool.is_released

    def sleep(self) -> None:
        """Gives the KV cache's memory back (for a training step in the same process): the prefix
        cache is dropped, the weights and captured CUDA graphs stay. Only with no request unfinished."""
        if self._requests:
            raise RuntimeError(f"sleep() with {len(self._requests)} requests unfinished; call it between "
                               "generate() calls")
        if self._inflight is not None:  # every request aborted with a step in flight: let it end first
            self._resolve(self._inflight)
            self._inflight = None
        if not self.scheduler.reset_prefix_cache():
            raise RuntimeError("sleep(): the prefix cache could not be reset (blocks still in use)")
        self.runner.kv_pool.release()

    def wake_up(self) -> None:
        """Takes the KV cache's memory again (zeroed, at the same device address)."""
        self.runner.kv_pool.remap()

    # ---- the step --------------------------------------------------------------------------------

    def step(self, return_unfinished: bool = True) -> list[RequestOutput]:
        """Runs one scheduler step; returns the outputs of every request that changed (with
        ``return_unfinished=False``, only of those that finished: offline generation needs no more).

        NOTE(tidal): the per-request bookkeeping of a step's tokens (log-probs, detokenizing, stop
        strings, outputs) runs during the next step, while the GPU computes it: the scheduler and
        the samplers see every token at once, outputs arrive one step later. A step that finds
        nothing to schedule, or leaves nothing unfinished, flushes what is pending."""
        if self._async_ok():
            return self._step_async(return_unfinished)
        if self._inflight is not None:  # leaving asynchronous scheduling: this step takes the tokens in flight
            changed = self._resolve(self._inflight)
            self._inflight = None
            return self._collect(changed, return_unfinished)
        return self._step_sync(return_unfinished)

    def _step_sync(self, return_unfinished: bool) -> list[RequestOutput]:
        arrived = self.transfers.poll() if self.transfers is not None else set()
        batch = self.scheduler.schedule()
        if batch.num_seqs == 0:
            if arrived == set() and self.transfers is not None and self.transfers.pending:
                time.sleep(0.001)  # waiting on KV transfers alone: do not spin
            outputs = self._collect(self._process_lagged() | arrived, return_unfinished)
            self._host_memory.maybe_trim(idle=not self.scheduler.has_unfinished_requests())
            return outputs
        seq_ids = batch.request_ids.tolist()
        self._mark_scheduled(seq_ids)
        needs_sample = batch.needs_sample
        sample_ids = batch.request_ids[needs_sample].tolist()
        outputs: list[RequestOutput] = []
        changed: set[str] = set()
        collected = False
        try:
            mm = gather_step_inputs(batch, self._mm_prompts, self._encode_items, self.model.uses_mrope) \
                if self._mm_prompts else None
            prompt_rows = plan_prompt_rows(batch, seq_ids, self._prompt_logprobs) if self._prompt_logprobs else None
            pending = self.runner.execute(batch, [self._seqs[s].sampling for s in sample_ids], mm, prompt_rows)
            # NOTE(tidal): the last step's bookkeeping and its outputs run while the device computes
            # this step: between the sampled tokens' arrival and the next launch the device idles,
            # so only what the next step needs (update, schedule, staging) runs there.
            changed = self._process_lagged() | arrived
            outputs = self._collect(changed, return_unfinished)
            collected = True
            result = pending.result() if pending is not None else None
            if prompt_rows is not None:
                self._deliver_prompt_logprobs(prompt_rows, result)
        except Exception as e:  # the whole step failed: each of its sequences ends in error
            changed = set() if collected else changed | self._process_lagged() | arrived
            return self._merge(outputs, changed | self._fail_sequences(seq_ids, e), return_unfinished)

        sampled = np.full(len(seq_ids), -1, dtype=np.int32)
        if result is not None:  # None: only prompt chunks that end before their last token
            sampled[needs_sample] = result.token_ids
            if self.transfers is not None and self.transfers.role == "prefill":
                self._hold_for_decode(sample_ids, result)
        finished = {f.request_id: _FINISH_REASONS[f.status] for f in self.scheduler.update(batch, sampled)}
        kept = []
        for row, seq_id in enumerate(sample_ids):
            seq = self._seqs.get(seq_id)
            if seq is None or seq.finish_reason is not None:  # aborted or stopped since schedule()
                continue
            seq.sampling.output_token_ids.append(result.token_ids[row])  # the next step samples after it
            kept.append((seq, result.token_ids[row], result.logprobs[row], finished.get(seq_id)))
        self._lagged = (kept, time.monotonic())
        idle = not self.scheduler.has_unfinished_requests()
        if idle:
            outputs = self._merge(outputs, self._process_lagged(), return_unfinished)
        self._host_memory.maybe_trim(idle)
        return outputs

    def _mark_scheduled(self, seq_ids: list[int]) -> None:
        """Starts the metrics of sequences that run for the first time."""
        if not self._unscheduled:
            return
        now = time.monotonic()
        for seq_id in self._unscheduled.intersection(seq_ids):
            self._unscheduled.discard(seq_id)
            metrics = self._seqs[seq_id].request.metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
                metrics.num_cached_tokens = self.scheduler.request(seq_id).num_cached_prompt_tokens

    # ---- asynchronous scheduling -----------------------------------------------------------------

    def _async_ok(self) -> bool:
        """Whether the next step may be planned before the last one's tokens are on the host: the
        option is on and nothing needs every token on the host first (penalties count tokens; prompt
        log-probs, images, tensor-parallel workers and KV transfers read the host's step inputs)."""
        return (self.async_scheduling and self._num_penalized == 0 and not self._prompt_logprobs
                and not self._mm_prompts and self.transfers is None and self.tp_driver is None)

    def _step_async(self, return_unfinished: bool) -> list[RequestOutput]:
        """One step under asynchronous scheduling: plan and launch step n+1 (its placeholder inputs
        taken from step n's sampled ids on the device), then wait for step n's tokens and do its
        bookkeeping while the device computes step n+1, then apply step n+1 with placeholders.

        NOTE(tidal): a request that samples a stop token in step n was planned into step n+1
        already; that step computes one token for it, which resolve_tokens() and the bookkeeping
        drop (the scheduler has finished it). Length stops are known ahead and cost nothing."""
        prev, self._inflight = self._inflight, None
        batch = self.scheduler.schedule()
        pending, error, seq_ids, sample_ids = None, None, [], []
        if batch.num_seqs:
            seq_ids = batch.request_ids.tolist()
            self._mark_scheduled(seq_ids)
            sample_ids = batch.request_ids[batch.needs_sample].tolist()
            try:
                fill = self._token_fill(batch, prev)
                pending = self.runner.execute(batch, [self._seqs[s].sampling for s in sample_ids], fill=fill)
            except Exception as e:  # noqa: BLE001 - the step's sequences fail below, after step n's bookkeeping
                error = e
        changed = self._process_lagged()  # a synchronous step's tokens, when this is the first async step
        if prev is not None:
            changed |= self._resolve(prev)
        if error is not None:
            changed |= self._fail_sequences(seq_ids, error)
        elif batch.num_seqs and pending is None:  # prompt chunks only: no token to wait for
            self.scheduler.update(batch, np.full(len(seq_ids), -1, dtype=np.int32))
        elif batch.num_seqs:
            finished = {f.request_id: _FINISH_REASONS[f.status] for f in self.scheduler.update_pending(batch)}
            for seq_id in sample_ids:
                seq = self._seqs.get(seq_id)
                if seq is not None and seq.finish_reason is None:
                    seq.sampling.output_token_ids.append(-1)  # its token's place (samplers count outputs)
            self._inflight = _InFlight(batch, sample_ids, pending, finished)
            if not self.scheduler.has_unfinished_requests():  # the last step: its tokens now
                changed |= self._resolve(self._inflight)
                self._inflight = None
        outputs = self._collect(changed, return_unfinished)
        self._host_memory.maybe_trim(idle=not self.scheduler.has_unfinished_requests())
        return outputs

    def _token_fill(self, batch, prev: _InFlight | None) -> TokenFill | None:
        """Where the step's placeholder input ids come from: each is the last token of a sequence
        that sampled in ``prev``."""
        rows = np.flatnonzero(batch.input_ids < 0)
        if rows.size == 0:
            return None
        owners = batch.request_ids[np.searchsorted(batch.cu_seqlens_q, rows, side="right") - 1]
        prev_ids = np.asarray(prev.sample_ids if prev is not None else [], dtype=np.int64)
        order = np.argsort(prev_ids)
        src = order[np.searchsorted(prev_ids, owners, sorter=order).clip(max=len(order) - 1)] if len(order) else order
        if len(src) != len(owners) or not np.array_equal(prev_ids[src], owners):
            raise RuntimeError(f"placeholder input tokens of sequences {owners.tolist()} that did not sample in the "
                               f"step in flight ({prev_ids.tolist()})")
        return TokenFill(prev.pending.tokens, rows.astype(np.int64), src)

    def _resolve(self, prev: _InFlight) -> set[str]:
        """Waits for ``prev``'s tokens, gives them to the scheduler (stop tokens and EOS apply) and
        does their bookkeeping; returns the ids of the requests it changed."""
        try:
            result = prev.pending.result()
        except Exception as e:  # the step failed on the device: its sequences end in error
            changed = self._fail_sequences(prev.sample_ids, e)
            self.scheduler.resolve_tokens(np.zeros(len(prev.batch.request_ids), dtype=np.int32))  # all finished
            return changed
        sampled = np.full(len(prev.batch.request_ids), -1, dtype=np.int32)
        sampled[prev.batch.needs_sample] = result.token_ids
        finished = dict(prev.finished)
        finished.update((f.request_id, _FINISH_REASONS[f.status]) for f in self.scheduler.resolve_tokens(sampled))
        kept = []
        for row, seq_id in enumerate(prev.sample_ids):
            seq = self._seqs.get(seq_id)
            if seq is None or seq.finish_reason is not None:  # aborted or stopped since the step was planned
                continue
            seq.sampling.output_token_ids[-1] = result.token_ids[row]  # its placeholder
            kept.append((seq, result.token_ids[row], result.logprobs[row], finished.get(seq_id)))
        self._lagged = (kept, time.monotonic())
        return self._process_lagged()

    def _fail_sequences(self, seq_ids: list[int], error: Exception) -> set[str]:
        """Ends the unfinished ones of ``seq_ids`` in error (a step that failed); returns their requests'
        ids. A sequence the scheduler finished already (a length stop whose token was pending) keeps
        that status there."""
        changed = set()
        for seq_id in seq_ids:
            seq = self._seqs.get(seq_id)
            if seq is None or seq.finish_reason is not None:
                continue
            if self.scheduler.has_request(seq_id) and not self.scheduler.request(seq_id).is_finished:
                self.scheduler.finish_request(seq_id, _Status.FINISHED_ERROR)
            self._fail(seq, f"{type(error).__name__}: {error}")
            changed.add(seq.request.request_id)
        return changed

    def _merge(self, outputs: list[RequestOutput], request_ids: set[str], return_unfinished: bool
               ) -> list[RequestOutput]:
        """``outputs`` with the requests of ``request_ids`` collected again (their newer state replaces
        an earlier output of the same step: one output per request and step)."""
        if not request_ids:
            return outputs
        return [o for o in outputs if o.request_id not in request_ids] + self._collect(request_ids, return_unfinished)

    def _deliver_prompt_logprobs(self, prompt_rows, result) -> None:
        if result is None or result.prompt_logprobs is None:
            raise RuntimeError("the model runner returned no prompt log-probs for a step that needs them")
        prompt_rows.deliver(result.prompt_logprobs)
        for seq_id in [s for s, state in self._prompt_logprobs.items() if state.is_complete]:
            del self._prompt_logprobs[seq_id]

    def _hold_for_decode(self, sample_ids: list[int], result) -> None:
        """Prefill role: requests that sampled their first token keep their blocks for a decode
        engine (before update() frees them)."""
        for row, seq_id in enumerate(sample_ids):
            seq = self._seqs.get(seq_id)
            if seq is not None and seq.request.remote_decode and seq.request.kv_hold is None \
                    and seq.finish_reason is None:
                self.transfers.hold(seq, result.token_ids[row], result.logprobs[row])

    def close(self) -> None:
        """Ends what runs beside the engine (its KV connector's threads, its tensor-parallel workers).
        Idempotent."""
        if self.transfers is not None:
            self.transfers.close()
        if self.tp_driver is not None:
            self.tp_driver.close()

    def poll_transfers(self) -> list[RequestOutput]:
        """Advances KV transfers between steps (an engine with held blocks and nothing to run)."""
        if self.transfers is None:
            return []
        return self._collect(self.transfers.poll())

    @property
    def has_pending_transfers(self) -> bool:
        return self.transfers is not None and self.transfers.pending

    def append_first_token(self, seq: _Sequence, token_id: int, logprobs) -> None:
        """Decode role: the prefill engine's first token, as this engine's first output."""
        self._append_token(seq, token_id, logprobs, None, time.monotonic())

    def fail_sequence(self, seq: _Sequence, message: str) -> None:
        self._fail(seq, message)

    def _process_lagged(self) -> set[str]:
        """The bookkeeping of the last step's tokens; returns the ids of the requests it changed."""
        if self._lagged is None:
            return set()
        kept, now = self._lagged
        self._lagged = None
        changed = set()
        for seq, token_id, logprobs, finish_reason in kept:
            if seq.finish_reason is not None:  # aborted meanwhile
                continue
            changed.add(seq.request.request_id)
            try:
                self._append_token(seq, token_id, logprobs, finish_reason, now)
            except Exception as e:  # this request alone fails; the engine goes on
                if finish_reason is None:
                    self.scheduler.finish_request(seq.seq_id, _Status.FINISHED_ERROR)
                self._fail(seq, f"{type(e).__name__}: {e}")
        return changed

    def _append_token(self, seq: _Sequence, token_id: int, logprobs, finish_reason: str | None, now: float) -> None:
        metrics = seq.request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        seq.num_processed += 1
        if seq.logprobs is not None:
            seq.logprobs.append(logprobs)
        params = seq.request.params
        if finish_reason == "stop" and token_id in params.stop_token_ids:
            seq.stop_reason = token_id
        if seq.detokenizer is not None:
            before = len(seq.text)
            seq.text += seq.detokenizer.step([token_id])
            if params.stop_strings and finish_reason in (None, "length"):
                hit = self._find_stop_string(seq.text, before, params)
                if hit is not None:
                    stop, end = hit
                    seq.text = seq.text[:end]
                    seq.stop_reason = stop
                    if finish_reason is None:
                        self.scheduler.finish_request(seq.seq_id, _Status.FINISHED_STOPPED)
                    finish_reason = "stop"
        if finish_reason is not None:
            self._finish(seq, finish_reason)

    @staticmethod
    def _find_stop_string(text: str, new_from: int, params: SamplingParams):
        """(stop string, where the kept text ends) for the earliest stop string in the new text."""
        best = None
        for stop in params.stop_strings:
            start = text.find(stop, max(0, new_from - len(stop) + 1))
            if start >= 0 and (best is None or start < best[1]):
                end = start + len(stop) if params.include_stop_str_in_output else start
                best = (stop, end, start)
        return None if best is None else (best[0], best[1])

    def _finish(self, seq: _Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if self.transfers is not None and seq.request.kv_hold is not None:
            self.transfers.on_finish(seq.request, reason)
        if seq.request.finished:
            seq.request.metrics.finished_time = time.monotonic()

    def _fail(self, seq: _Sequence, message: str) -> None:
        seq.request.error = message
        self._finish(seq, "error")

    def _release(self, request: _Request) -> None:
        """Forgets a finished request (its blocks were freed by the scheduler already)."""
        for seq in request.seqs:
            if self._seqs.pop(seq.seq_id, None) is not None:
                self._num_penalized -= seq.sampling.params.has_penalties
            self._unscheduled.discard(seq.seq_id)
            self._mm_prompts.pop(seq.seq_id, None)
            self._prompt_logprobs.pop(seq.seq_id, None)
        self._requests.pop(request.request_id, None)

    def _collect(self, request_ids, return_unfinished: bool = True) -> list[RequestOutput]:
        outputs = []
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is None:
                continue
            finished = request.finished
            if finished or return_unfinished:
                outputs.append(request.output())
            if finished:
                self._release(request)
        return outputs
