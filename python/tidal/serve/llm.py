"""``tidal.LLM``: offline batched generation, with vLLM's names so its users feel at home."""

import itertools
import sys

import torch

from tidal.serve.engine import EngineConfig, LLMEngine
from tidal.serve.outputs import RequestOutput
from tidal.serve.sampling_params import SamplingParams


class LLM:
    """A model loaded from a Hugging Face directory, served with continuous batching.

    Parameters
    ----------
    model : str or torch.nn.Module
        Directory holding config.json, *.safetensors and (for text prompts) tokenizer.json; or a
        tidal model already built (``tidal.models.load_model``, or a training engine's ``module`` at
        ZeRO stage 0-2), served in place: its parameters are shared, not copied, so a training step's
        update is what the next generate reads (call :meth:`weights_updated` after it).
    tokenizer : str or None
        Directory with tokenizer.json; default the model's directory (none for a model object,
        which then takes prompts as token ids).
    dtype : str or torch.dtype
        "auto" takes the checkpoint's dtype; or "float32", "bfloat16", "float16".
    device : str
        "auto" (the current CUDA device when there is one, else the CPU), "cpu", or "cuda[:N]".
    block_size : int
        Tokens per KV-cache block.
    num_kv_blocks : int or None
        Size of the KV pool in blocks; None sizes it from ``kv_cache_memory_fraction``.
    kv_cache_memory_fraction : float
        On a GPU, the share of the card that the weights, peak activations (measured by a profiling
        forward at ``max_num_batched_tokens``) and the KV cache may take together; on the CPU, the
        share of available host memory the KV cache may take (capped at 4 GiB).
    gpu_memory_utilization : float or None
        vLLM's name for ``kv_cache_memory_fraction``; overrides it when given.
    max_num_seqs, max_num_batched_tokens : int
        Most sequences running at once; token budget of one step (long prompts are chunked).
    max_model_len : int or None
        Longest prompt + output; defaults to the model's max_position_embeddings.
    enable_prefix_caching : bool
        Reuse the KV blocks of identical prompt prefixes.
    seed : int
        Seeds the samples of requests that carry no seed of their own.
    scheduling_policy : str
        "fcfs" (arrival order) or "priority" (each request's ``priority``, lower first).
    enforce_eager : bool
        Run every step eagerly; by default decode steps on a GPU replay CUDA graphs captured at
        start-up for padded batch sizes 1, 2, 4, 8, 16, ..., ``max_num_seqs``.
    async_scheduling : bool or None
        Plan and launch each step before the previous step's tokens reach the host (vLLM's name):
        a step's inputs take those tokens on the device, so the GPU does not wait on the host
        between steps. None (the default) turns it on on a GPU and off on the CPU, where the model
        runs on the planning thread and there is nothing to overlap. Stop tokens then end a request
        one step late (that step's extra token is discarded, never returned). Steps fall back to
        synchronous ones while a request with repetition, frequency or presence penalties, prompt
        log-probs or images runs, and under tensor parallelism or disaggregated serving.
    encoder_cache_bytes : int
        For a vision-language model: the bound of the cache of image and video embeddings, keyed by
        content hash, so an image seen again skips the vision encoder.
    quantization : None, "int8", "int4", "fp8", "gptq", "awq" or "compressed-tensors"
        Serve the decoder's linear layers quantized (tidal.quant): "int8" and "int4" (groups of 128,
        with zero points) store weights only, activations stay in ``dtype``; "fp8" stores FP8 E4M3
        weights and quantizes activations per token. A float checkpoint is rounded as it loads; a
        GPTQ, AWQ or compressed-tensors checkpoint is read in its own layout (chosen from its
        ``quantization_config``: None is enough).
    kv_cache_dtype : "auto" or "fp8"
        The KV cache's element type: the model's dtype, or FP8 E4M3 codes (scale 1, rounded to
        nearest even, saturated at +-448; vLLM's ``kv_cache_dtype="fp8"``), which halves the bytes
        of a bf16 cache (a quarter of fp32's): twice the blocks in the same memory, half the bytes
        attention reads. On the GPU it needs a float16 or bfloat16 model with head_dim 64, 128 or
        256 (the tensor-core attention kernels convert the codes in shared memory).
    tensor_parallel_size : int
        Ranks that split the model (vLLM's name; tidal.models.tensor_parallel): this process and
        ``tensor_parallel_size - 1`` worker processes it starts, each with a slice of every layer and
        of the KV cache, over Gloo on the CPU. Llama-family decoders, mixture-of-experts blocks
        (each expert split) and quantized layers included (int4 needs each rank's share of o_proj's
        and down_proj's inputs to be whole groups); the GPU path (NCCL) is not built yet.
        :meth:`close` stops the workers.
    """

    def __init__(self, model: "str | torch.nn.Module", dtype: str | torch.dtype = "auto", device: str = "auto",
                 block_size: int = 16, num_kv_blocks: int | None = None, kv_cache_memory_fraction: float = 0.9,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, seed: int = 0, scheduling_policy: str = "fcfs",
                 enforce_eager: bool = False, gpu_memory_utilization: float | None = None,
                 tokenizer: str | None = None, encoder_cache_bytes: int = 1 << 30, quantization: str | None = None,
                 kv_cache_dtype: str = "auto", tensor_parallel_size: int = 1, async_scheduling: bool | None = None):
        if gpu_memory_utilization is not None:
            kv_cache_memory_fraction = gpu_memory_utilization
        self.engine = LLMEngine(EngineConfig(
            model=model, dtype=dtype, device=device, block_size=block_size, num_kv_blocks=num_kv_blocks,
            kv_cache_memory_fraction=kv_cache_memory_fraction, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching, seed=seed, scheduling_policy=scheduling_policy,
            enforce_eager=enforce_eager, tokenizer=tokenizer, encoder_cache_bytes=encoder_cache_bytes,
            quantization=quantization, kv_cache_dtype=kv_cache_dtype, tensor_parallel_size=tensor_parallel_size,
            async_scheduling=async_scheduling))
        self._ids = itertools.count()

    def close(self) -> None:
        """Stops what runs beside the engine (tensor-parallel workers, KV connector threads). Idempotent."""
        self.engine.close()

    def weights_updated(self) -> None:
        """Tells the engine that the weights of the model it serves changed in place (a training step
        on a shared model): the prefix cache, whose KV blocks the old weights computed, is dropped.
        Call it between generate calls: requests still running would keep blocks of the old weights."""
        if not self.reset_prefix_cache():
            raise RuntimeError("weights_updated() with requests still running: their KV blocks hold the old "
                               "weights' keys and values; call it between generate() calls")

    def sleep(self) -> None:
        """Releases the KV cache's memory until :meth:`wake_up` (vLLM's sleep mode, for a training
        step in the same process): the prefix cache is dropped; the weights, which a shared model
        keeps training in place, and the CUDA graphs stay. Call it between generate calls."""
        self.engine.sleep()

    def wake_up(self) -> None:
        """Takes the KV cache's memory back after :meth:`sleep`; generate works again."""
        self.engine.wake_up()

    @property
    def is_sleeping(self) -> bool:
        return self.engine.is_sleeping

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: list[int] | None = None) -> list[RequestOutput]:
        """Generates for every prompt and returns the finished outputs in input order.

        ``prompts`` is a string, a list of token ids, a dict (vLLM's shape: ``{"prompt": ...}`` or
        ``{"prompt_token_ids": ...}``, with ``"multi_modal_data": {"image": ...}`` for a
        vision-language model), or a list of these. ``sampling_params`` is
        one SamplingParams for all prompts or a list with one per prompt; ``priority`` one int per
        prompt (used with ``scheduling_policy="priority"``).
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params has {len(params)} entries but there are {len(prompts)} prompts")

        if priority is None:
            priority = [0] * len(prompts)
        elif len(priority) != len(prompts):
            raise ValueError(f"priority has {len(priority)} entries but there are {len(prompts)} prompts")
        request_ids = []
        try:
            for prompt, p, rank in zip(prompts, params, priority):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt, p, rank)
                request_ids.append(request_id)
        except Exception:
            for request_id in request_ids:  # a bad prompt leaves nothing queued behind it
                self.engine.abort_request(request_id)
            raise

        bar = _progress_bar(len(request_ids)) if use_tqdm else None
        finished: dict[str, RequestOutput] = {}
        try:
            while len(finished) < len(request_ids):
                for output in self.engine.step(return_unfinished=False):
                    if output.finished:
                        finished[output.request_id] = output
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for request_id in request_ids:
                if request_id not in finished:
                    self.engine.abort_request(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[r] for r in request_ids]

    def reset_prefix_cache(self) -> bool:
        """Forgets the cached prefixes of finished requests (e.g. after a weight update). Returns
        False when running requests still hold cached blocks; those are kept."""
        return self.engine.scheduler.reset_prefix_cache()

    def stats(self) -> dict:
        """KV pool and scheduler counters: kv_blocks_total, kv_blocks_free, prefix_cache_query_tokens,
        prefix_cache_hit_tokens, preemptions, num_requests_running, num_requests_waiting, ..."""
        return self.engine.stats()


def _progress_bar(total: int):
    if not sys.stderr.isatty():  # quiet when the output is not a terminal
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="generate", unit="req", dynamic_ncols=True)
