"""tidal.LLM greedy generation equals transformers' generate, token for token, for every model family,
for prompt lengths around block boundaries, batches larger than max_num_seqs, chunked prefill,
prefix caching on and off, and a pool small enough to force preemption. After every scenario the
KV pool is whole."""

import random

import pytest
import torch

import tidal
from tiny_models import assert_pool_whole, EOS, FAMILIES, build_model, hf_greedy

BLOCK_SIZE = 4
PROMPT_LENGTHS = [1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 3 * BLOCK_SIZE + 2, 23]




def random_prompts(lengths, seed=0, vocab=300):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    hf = build_model(path, request.param)
    return request.param, path, hf


def greedy(max_tokens, **kw):
    return tidal.SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def test_greedy_matches_transformers(family_model):
    _, path, hf = family_model
    prompts = random_prompts(PROMPT_LENGTHS)
    expected = [hf_greedy(hf, p, 12) for p in prompts]
    # max_num_seqs < batch, and a token budget that chunks the longer prompts across steps
    llm = tidal.LLM(path, block_size=BLOCK_SIZE, num_kv_blocks=64, max_num_seqs=3, max_num_batched_tokens=8)
    outputs = llm.generate(prompts, greedy(12), use_tqdm=False)
    for prompt, want, out in zip(prompts, expected, outputs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == want
        assert out.outputs[0].finish_reason == ("stop" if want[-1] == EOS else "length")
    assert_pool_whole(llm)


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_prefix_caching_same_tokens_and_hits(family_model, enable_prefix_caching):
    _, path, hf = family_model
    shared = random_prompts([13], seed=1)[0]
    prompts = [shared + tail for tail in random_prompts([1, 5, 9, 3], seed=2)]
    expected = [hf_greedy(hf, p, 8, eos=False) for p in prompts]
    llm = tidal.LLM(path, block_size=BLOCK_SIZE, num_kv_blocks=64, enable_prefix_caching=enable_prefix_caching)
    first = llm.generate(prompts[:1], greedy(8, ignore_eos=True), use_tqdm=False)
    rest = llm.generate(prompts[1:], greedy(8, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first + rest] == expected
    stats = llm.stats()
    if enable_prefix_caching:
        # each later prompt finds the shared 13 tokens' 3 full blocks
        assert stats["prefix_cache_hit_tokens"] >= 3 * 3 * BLOCK_SIZE
        assert all(o.num_cached_tokens == 12 for o in rest)
    else:
        assert stats["prefix_cache_hit_tokens"] == 0
    assert_pool_whole(llm)


def test_preemption_keeps_outputs_exact(family_model):
    _, path, hf = family_model
    prompts = random_prompts([9, 14, 6, 11, 7, 13], seed=3)
    expected = [hf_greedy(hf, p, 20, eos=False) for p in prompts]
    # 14 blocks of 4 tokens: 6 requests growing to ~34 tokens each cannot all stay resident
    llm = tidal.LLM(path, block_size=BLOCK_SIZE, num_kv_blocks=14, max_model_len=48)
    outputs = llm.generate(prompts, greedy(20, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.stats()["preemptions"] > 0
    assert_pool_whole(llm)


def test_prefill_logprobs_equal_transformers_logits(family_model):
    _, path, hf = family_model
    prompts = random_prompts([5, 17], seed=4)
    llm = tidal.LLM(path, block_size=BLOCK_SIZE, num_kv_blocks=32, max_model_len=64)
    outputs = llm.generate(prompts, greedy(1, logprobs=5), use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt])).logits[0, -1]
        want = logits.float().log_softmax(-1)
        got = out.outputs[0].logprobs[0]
        top = torch.topk(want, 5)
        assert set(got) >= set(top.indices.tolist())
        for token, value in got.items():
            assert abs(value - want[token].item()) < 1e-4
    assert_pool_whole(llm)
