"""Sampling: masks and penalties against transformers' logits processors, seeded sampling that does
not depend on the batch, and every SamplingParams option end to end through tidal.LLM."""

import random

import pytest
import torch
import transformers

import tidal
from tidal.serve.sampler import SequenceSampling, apply_penalties, apply_top_k_top_p_min_p
from tiny_models import assert_pool_whole, build_model, hf_greedy

NEG = -1e30


def hf_warp(logits, top_k, top_p, min_p):
    """transformers' own warpers, in generate's order."""
    out = logits.clone()
    if top_k > 0:
        out = transformers.TopKLogitsWarper(top_k)(None, out)
    if top_p < 1.0:
        out = transformers.TopPLogitsWarper(top_p)(None, out)
    if min_p > 0.0:
        out = transformers.MinPLogitsWarper(min_p)(None, out)
    return out


@pytest.mark.parametrize("top_k,top_p,min_p", [
    (1, 1.0, 0.0), (5, 1.0, 0.0), (-1, 0.9, 0.0), (-1, 0.3, 0.0), (-1, 1.0, 0.1), (10, 0.8, 0.05), (3, 0.5, 0.3),
])
def test_masks_match_transformers_warpers(top_k, top_p, min_p):
    g = torch.Generator().manual_seed(top_k + int(top_p * 10))
    logits = torch.randn(16, 64, generator=g) * 3
    vocab = logits.shape[1]
    ours = apply_top_k_top_p_min_p(
        logits, torch.full((16,), top_k if top_k > 0 else vocab), torch.full((16,), top_p), torch.full((16,), min_p))
    want = hf_warp(logits, top_k, top_p, min_p)
    torch.testing.assert_close(ours < NEG, torch.isinf(want))
    kept = ~torch.isinf(want)
    torch.testing.assert_close(ours[kept], logits[kept])


def test_masks_rows_have_their_own_params():
    logits = torch.randn(3, 40)
    ours = apply_top_k_top_p_min_p(logits, torch.tensor([2, 40, 40]), torch.tensor([1.0, 0.5, 1.0]),
                                   torch.tensor([0.0, 0.0, 0.2]))
    for row, (k, p, m) in enumerate([(2, 1.0, 0.0), (-1, 0.5, 0.0), (-1, 1.0, 0.2)]):
        torch.testing.assert_close(ours[row:row + 1] < NEG, torch.isinf(hf_warp(logits[row:row + 1], k, p, m)))


def _seq(prompt, output, **params):
    return SequenceSampling(tidal.SamplingParams(**params), prompt, output)


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(2, 50)
    prompt, output = [3, 7, 7, 12], [12, 40, 3]
    ours = logits.clone()
    apply_penalties(ours, [_seq(prompt, output, repetition_penalty=1.7), _seq(prompt, output)])
    want = transformers.RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + output]), logits[:1].clone())
    torch.testing.assert_close(ours[:1], want)
    torch.testing.assert_close(ours[1], logits[1])  # no penalties: untouched


def test_frequency_and_presence_penalties_match_reference():
    logits = torch.randn(1, 30)
    prompt, output = [1, 2, 2], [5, 5, 5, 9, 2]
    ours = logits.clone()
    apply_penalties(ours, [_seq(prompt, output, frequency_penalty=0.5, presence_penalty=0.25)])
    want = logits.clone()
    for token in set(output):  # only generated tokens count, as in OpenAI's definition
        want[0, token] -= 0.5 * output.count(token) + 0.25
    torch.testing.assert_close(ours, want)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sampling"))
    return path, build_model(path, "llama")


@pytest.fixture(scope="module")
def llm(model):
    return tidal.LLM(model[0], block_size=4, num_kv_blocks=128)


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(2, 300) for _ in range(rng.randrange(3, 15))] for _ in range(n)]




def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    prompt = _prompts(1, seed=5)[0]
    params = tidal.SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    others = _prompts(5, seed=6)
    mixed = [tidal.SamplingParams(temperature=0.7, max_tokens=9), tidal.SamplingParams(temperature=0.0, max_tokens=4)]
    batch = llm.generate(others[:2] + [prompt] + others[2:], [mixed[0], mixed[1], params, mixed[0], mixed[1], mixed[0]],
                         use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone
    again = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone
    different = llm.generate([prompt], tidal.SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].token_ids
    assert different != alone
    assert_pool_whole(llm)


def test_top_k_1_is_greedy(llm):
    prompt = _prompts(1, seed=7)[0]
    greedy = llm.generate([prompt], tidal.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    top1 = llm.generate([prompt], tidal.SamplingParams(temperature=1.5, top_k=1, max_tokens=10, ignore_eos=True, seed=3),
                        use_tqdm=False)
    assert greedy[0].outputs[0].token_ids == top1[0].outputs[0].token_ids


def test_stop_strings_are_cut_from_the_text(llm):
    prompt = "def add(a, b):"
    full = llm.generate(prompt, tidal.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    text = full.outputs[0].text
    assert len(text) > 6
    stop = text[4:6]
    cut = llm.generate(prompt, tidal.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop, "\x00"]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.text == text[:text.find(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate(prompt, tidal.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stop,
                                                     include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[:text.find(stop) + len(stop)]
    assert_pool_whole(llm)


def test_stop_token_ids_and_min_tokens_match_transformers(llm, model):
    path, hf = model
    prompt = _prompts(1, seed=8)[0]
    free = hf_greedy(hf, prompt, 12, eos=False)
    stop_id = free[1]
    out = llm.generate([prompt], tidal.SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free[:free.index(stop_id) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # min_tokens: the stop token cannot be drawn before 5 tokens (transformers' min_new_tokens)
    config = hf.generation_config
    config.eos_token_id, config.min_new_tokens, config.do_sample = stop_id, 5, False
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, generation_config=config)[0, len(prompt):].tolist()
    config.min_new_tokens = None
    got = llm.generate([prompt], tidal.SamplingParams(temperature=0, max_tokens=12, min_tokens=5,
                                                      stop_token_ids=[stop_id], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert got == want
    assert stop_id not in got[:5]


def test_repetition_penalty_greedy_matches_transformers(llm, model):
    _, hf = model
    prompt = _prompts(1, seed=9)[0]
    config = hf.generation_config
    config.repetition_penalty, config.do_sample, config.eos_token_id = 1.3, False, None
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=10, generation_config=config)[0, len(prompt):].tolist()
    config.repetition_penalty = 1.0
    got = llm.generate([prompt], tidal.SamplingParams(temperature=0, max_tokens=10, repetition_penalty=1.3,
                                                      ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    assert got == want


def test_n_samples_share_the_prompt_blocks(llm):
    prompt = _prompts(1, seed=10)[0] * 3  # several full blocks
    before = llm.stats()["prefix_cache_hit_tokens"]
    out = llm.generate([prompt], tidal.SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    full_blocks = (len(prompt) - 1) // 4 * 4
    assert llm.stats()["prefix_cache_hit_tokens"] - before >= 3 * full_blocks
    greedy = llm.generate([prompt], tidal.SamplingParams(n=2, temperature=0, max_tokens=6), use_tqdm=False)[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids
    assert_pool_whole(llm)


def test_logprobs_hold_the_sampled_and_top_tokens(llm):
    out = llm.generate([_prompts(1, seed=12)[0]], tidal.SamplingParams(temperature=0.8, seed=1, max_tokens=5, logprobs=3),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 5
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and 3 <= len(entry) <= 4
        assert all(v <= 0.0 for v in entry.values())
        top3 = sorted(entry.values(), reverse=True)[:3]
        assert entry[token] <= top3[0]


@pytest.mark.parametrize("kwargs,name", [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"), (dict(top_k=-2), "top_k"), (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n"),
    (dict(min_p=2.0), "min_p"), (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(logprobs=-1), "logprobs"),
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(stop=[""]), "stop"),
    # past 32-bit counts and ids or 64-bit seeds: an error here, not an overflow that fails a whole step
    (dict(max_tokens=1 << 31), "max_tokens"), (dict(top_k=1 << 31), "top_k"), (dict(n=1 << 31), "n"),
    (dict(seed=1 << 63), "seed"), (dict(seed=-(1 << 63) - 1), "seed"), (dict(stop_token_ids=[1 << 31]), "stop_token_ids"),
])
def test_bad_sampling_params_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}="):
        tidal.SamplingParams(**kwargs)
