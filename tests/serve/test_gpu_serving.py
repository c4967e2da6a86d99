"""Serving on the GPU: greedy tokens equal transformers' for every family with CUDA graphs on and off,
chunked prefill, prefix caching and preemption; bf16 within its tolerance; seeded sampling independent
of the batch; the KV pool sized by the profiling forward; device resolution. The engine-agnostic tests
(test_llm_parity, test_engine, test_sampling) run on the GPU too where there is one, since
``device="auto"`` picks it. CPU-only parts (device resolution errors, options) run everywhere."""

import random

import pytest
import torch

import tidal
from conftest import HAS_GPU
from tidal.models import llama
from tidal.serve.config import resolve_device
from tidal.serve.gpu_model_runner import capture_sizes
from tiny_models import EOS, FAMILIES, assert_pool_whole, build_model, hf_greedy

BLOCK = 4


def needs_gpu(fn):
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and a CUDA build")(fn))


def _prompts(lengths, seed=0, vocab=300):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(n)] for n in lengths]


def _greedy(n, **kw):
    return tidal.SamplingParams(temperature=0.0, max_tokens=n, **kw)


# ---- everywhere -----------------------------------------------------------------------------------

def test_capture_sizes():
    assert capture_sizes(256)[:6] == [1, 2, 4, 8, 16, 24] and capture_sizes(256)[-1] == 256
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(1) == [1]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if HAS_GPU else "cpu")
    with pytest.raises(ValueError, match="device='tpu'"):
        resolve_device("tpu")
    if not HAS_GPU:
        with pytest.raises(ValueError, match="device='cuda' but there is no usable CUDA device"):
            resolve_device("cuda")


def test_engine_options_are_checked(tmp_path):
    build_model(str(tmp_path))
    with pytest.raises(ValueError, match="enforce_eager='yes' must be a bool"):
        tidal.LLM(str(tmp_path), enforce_eager="yes", num_kv_blocks=16)
    with pytest.raises(ValueError, match="kv_cache_memory_fraction=1.5"):
        tidal.LLM(str(tmp_path), gpu_memory_utilization=1.5)


# ---- on the GPU -----------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(f"gpu_{request.param}"))
    return request.param, path, build_model(path, request.param)


def test_skinny_default_by_device(monkeypatch):
    """The fused decode path's token limit: none on the CPU, an explicit SKINNY_MAX_TOKENS capped at
    the kernel's rows, and by default 2 on a GPU of sm_90 or later (where the streamed kernel beats
    cuBLAS), 0 before."""
    assert llama.skinny_max_tokens(torch.device("cpu")) == 0
    monkeypatch.setattr(llama, "SKINNY_MAX_TOKENS", 9)
    assert llama.skinny_max_tokens(torch.device("cuda")) == tidal.ops.linear.MAX_ROWS
    monkeypatch.setattr(llama, "SKINNY_MAX_TOKENS", 0)
    assert llama.skinny_max_tokens(torch.device("cuda")) == 0
    if torch.cuda.is_available():
        monkeypatch.setattr(llama, "SKINNY_MAX_TOKENS", None)
        major = torch.cuda.get_device_capability()[0]
        assert llama.skinny_max_tokens(torch.device("cuda")) == (2 if major >= 9 else 0)


@needs_gpu
@pytest.mark.parametrize("skinny,prefetch", [(0, False), (4, False), (4, True)],
                         ids=["cublas", "skinny_linear", "skinny_linear_prefetch"])
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_greedy_matches_transformers_on_gpu(family_model, enforce_eager, skinny, prefetch, monkeypatch):
    """Decode steps of up to 4 tokens through cuBLAS or through ops.skinny_linear (norms, activation
    and residual adds fused into the projections; with or without the L2 prefetch of each next
    weight) give transformers' greedy tokens alike."""
    monkeypatch.setattr(llama, "SKINNY_MAX_TOKENS", skinny)
    monkeypatch.setattr(llama, "SKINNY_PREFETCH", prefetch)
    _, path, hf = family_model
    prompts = _prompts([1, 3, 4, 5, 14, 23, 9, 2])
    expected = [hf_greedy(hf, p, 12) for p in prompts]
    llm = tidal.LLM(path, device="cuda", block_size=BLOCK, num_kv_blocks=96, max_num_seqs=5,
                    max_num_batched_tokens=16, enforce_eager=enforce_eager)
    runner = llm.engine.runner
    assert (len(runner._graphs) > 0) != enforce_eager
    replays = 0
    if not enforce_eager:  # count graph replays: decode steps must take the graphs
        for g in runner._graphs.values():
            original = g.graph.replay

            def counted(original=original):
                nonlocal replays
                replays += 1
                original()
            g.graph.replay = counted
    outputs = llm.generate(prompts, _greedy(12), use_tqdm=False)
    for want, out in zip(expected, outputs):
        assert out.outputs[0].token_ids == want
        assert out.outputs[0].finish_reason == ("stop" if want[-1] == EOS else "length")
    assert (replays > 0) != enforce_eager
    assert_pool_whole(llm)


@needs_gpu
def test_prefix_caching_and_preemption_on_gpu(family_model):
    _, path, hf = family_model
    shared = _prompts([13], seed=1)[0]
    prompts = [shared + tail for tail in _prompts([1, 5, 9, 3, 7, 2], seed=2)]
    expected = [hf_greedy(hf, p, 20, eos=False) for p in prompts]
    # 24 blocks of 4 tokens: six ~40-token requests cannot all stay resident
    llm = tidal.LLM(path, device="cuda", block_size=BLOCK, num_kv_blocks=24, max_model_len=48)
    first = llm.generate(prompts[:1], _greedy(20, ignore_eos=True), use_tqdm=False)
    rest = llm.generate(prompts[1:], _greedy(20, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first + rest] == expected
    stats = llm.stats()
    assert stats["prefix_cache_hit_tokens"] > 0 and stats["preemptions"] > 0, stats
    assert_pool_whole(llm)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_first_tokens_and_logprobs(tmp_path, dtype):
    # head_dim 64: the tensor-core prefill kernel and the SIMT decode kernel
    hf = build_model(str(tmp_path), "llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    prompts = _prompts([30, 17, 64], seed=3)
    hf = hf.to("cuda", dtype)
    llm = tidal.LLM(str(tmp_path), dtype=dtype, device="cuda", block_size=16, num_kv_blocks=64)
    outs = llm.generate(prompts, _greedy(4, logprobs=5, ignore_eos=True), use_tqdm=False)
    tol = 0.1 if dtype == torch.bfloat16 else 0.02
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            want = hf(torch.tensor([prompt], device="cuda")).logits[0, -1].float().log_softmax(-1).cpu()
        first = out.outputs[0].token_ids[0]
        assert first == int(want.argmax()) or want.max() - want[first] < tol
        for token, value in out.outputs[0].logprobs[0].items():
            assert abs(value - float(want[token])) < tol
    assert_pool_whole(llm)


@needs_gpu
def test_seeded_sampling_does_not_depend_on_the_batch_on_gpu(tmp_path):
    build_model(str(tmp_path))
    llm = tidal.LLM(str(tmp_path), device="cuda", block_size=BLOCK, num_kv_blocks=128)
    prompt = _prompts([6], seed=5)[0]
    params = tidal.SamplingParams(temperature=1.0, top_p=0.9, top_k=40, min_p=0.01, seed=77, max_tokens=16,
                                  ignore_eos=True, repetition_penalty=1.1, frequency_penalty=0.2)
    alone = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    others = _prompts([3, 9, 12, 4], seed=6)
    mixed = [tidal.SamplingParams(temperature=0.7, max_tokens=9), tidal.SamplingParams(temperature=0.0, max_tokens=5)]
    batch = llm.generate(others[:2] + [prompt] + others[2:], [mixed[0], mixed[1], params, mixed[1], mixed[0]],
                         use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone
    assert_pool_whole(llm)


@needs_gpu
def test_kv_pool_is_sized_by_the_profiling_forward(tmp_path):
    build_model(str(tmp_path))
    torch.cuda.empty_cache()
    llm = tidal.LLM(str(tmp_path), device="cuda", kv_cache_memory_fraction=0.05, max_num_seqs=8,
                    max_num_batched_tokens=256)
    runner = llm.engine.runner
    kv_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in runner.kv_caches)
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0 < kv_bytes <= 0.05 * total
    assert runner.num_kv_blocks == llm.stats()["kv_blocks_total"]
    out = llm.generate([[5, 6, 7]], _greedy(3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    del llm, runner
    torch.cuda.empty_cache()
    with pytest.raises(ValueError, match=r"max_model_len=.* does not fit .* bytes per token.*weights"):
        tidal.LLM(str(tmp_path), device="cuda", kv_cache_memory_fraction=1e-6)


@needs_gpu
def test_each_engine_sizes_its_pool_from_its_own_share(tmp_path):
    # Two engines on one card (disaggregated roles do this): the second is charged neither the
    # first's weights nor its KV pool, only its own, and its pool never exceeds what is free.
    build_model(str(tmp_path))
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    first = tidal.LLM(str(tmp_path), device="cuda", kv_cache_memory_fraction=0.3, max_num_seqs=8,
                      max_num_batched_tokens=256, enforce_eager=True)
    second = tidal.LLM(str(tmp_path), device="cuda", kv_cache_memory_fraction=0.3, max_num_seqs=8,
                       max_num_batched_tokens=256, enforce_eager=True)
    pool_bytes = [sum(k.numel() * k.element_size() * 2 for k, _ in llm.engine.runner.kv_caches)
                  for llm in (first, second)]
    # Before each engine counted only itself, the second's budget was 0.3 of the card minus the
    # first's 0.3: no pool at all.
    assert pool_bytes[1] > 0.9 * pool_bytes[0] > 0
    assert sum(pool_bytes) <= 0.6 * total
    for llm in (first, second):
        out = llm.generate([[5, 6, 7]], _greedy(3, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 3
        assert_pool_whole(llm)
