"""SamplingParams(prompt_logprobs=k) equals log_softmax of transformers' fp32 logits over the prompt,
for the prompt token and the top k, for every model family: prompts chunked across steps, a batch in
which one request asks (and alone costs logits), preemption mid-prompt (recomputed positions add no
entry), the prefix cache (such a request computes its whole prompt; the others still hit), n > 1,
one-token prompt chunks among decodes (on a GPU: the eager path, not a decode graph), bad values.
After every scenario the KV pool is whole."""

import functools
import random

import pytest
import torch

import tidal
from conftest import DEVICES, cuda_param
from tidal.serve import gpu_model_runner, model_runner, prompt_logprobs
from tiny_models import FAMILIES, VOCAB_SIZE, assert_pool_whole, build_model

BLOCK = 4


def random_prompts(lengths, seed=0, vocab=300):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(n)] for n in lengths]


def reference(hf, prompt: list[int]) -> torch.Tensor:
    """log_softmax of transformers' fp32 logits: row p is the distribution of the token at p + 1."""
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)


def assert_prompt_logprobs(hf, prompt, got, k, device="cpu"):
    """``got`` holds, past its first None, the prompt token and the top ``k`` at each position, with
    transformers' values; on a GPU a top token may be one within the tolerance of the k-th."""
    want, tol = reference(hf, prompt), (1e-4 if device == "cpu" else 2e-3)
    assert got is not None and len(got) == len(prompt) and got[0] is None
    for p in range(1, len(prompt)):
        row, entry = want[p - 1], got[p]
        top = torch.topk(row, k)
        if device == "cpu":
            assert set(entry) == set(top.indices.tolist()) | {prompt[p]}, (p, entry, top)
        assert prompt[p] in entry and k <= len(entry) <= k + 1, (p, entry)
        if k:
            ours = sorted(entry, key=entry.get, reverse=True)[:k]
            assert all(row[t].item() >= top.values[-1].item() - tol for t in ours), (p, entry, top)
        for token, value in entry.items():
            assert abs(value - row[token].item()) < tol, (p, token, value, row[token].item())


def greedy(max_tokens=4, **kw):
    return tidal.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(f"plp_{request.param}"))
    return path, build_model(path, request.param)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("plp"))
    return path, build_model(path, "llama")


@pytest.fixture()
def count_rows(monkeypatch):
    """Rows whose logits compute_prompt_logprobs was asked for, over the test."""
    rows = []
    original = prompt_logprobs.compute_prompt_logprobs

    def counted(model, hidden, prompt_rows, *args, **kwargs):
        rows.append(len(prompt_rows.rows))
        return original(model, hidden, prompt_rows, *args, **kwargs)

    monkeypatch.setattr(model_runner, "compute_prompt_logprobs", counted)
    monkeypatch.setattr(gpu_model_runner, "compute_prompt_logprobs", counted)
    return rows


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [0, 3])
def test_prompt_logprobs_equal_transformers(family_model, k, device):
    path, hf = family_model
    prompts = random_prompts([1, BLOCK - 1, BLOCK, BLOCK + 1, 14, 23], seed=k)
    # a token budget that chunks the longer prompts across steps, and fewer seqs than prompts
    llm = tidal.LLM(path, device=device, block_size=BLOCK, num_kv_blocks=64, max_num_seqs=3,
                    max_num_batched_tokens=8)
    outputs = llm.generate(prompts, greedy(prompt_logprobs=k), use_tqdm=False)
    plain = llm.generate(prompts, greedy(), use_tqdm=False)
    for prompt, out, base in zip(prompts, outputs, plain):
        assert_prompt_logprobs(hf, prompt, out.prompt_logprobs, k, device)
        assert out.outputs[0].token_ids == base.outputs[0].token_ids
        assert base.prompt_logprobs is None
    assert_pool_whole(llm)


def test_only_the_request_that_asks_computes_them(model, count_rows):
    path, hf = model
    prompts = random_prompts([9, 17, 22, 6], seed=1)
    llm = tidal.LLM(path, block_size=BLOCK, num_kv_blocks=64, max_num_batched_tokens=10)
    params = [greedy(), greedy(logprobs=2), greedy(prompt_logprobs=3), greedy()]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_logprobs is None for o in outputs] == [True, True, False, True]
    assert_prompt_logprobs(hf, prompts[2], outputs[2].prompt_logprobs, 3)
    assert sum(count_rows) == len(prompts[2]) - 1  # the rows of that prompt, each once
    assert len(count_rows) > 1  # over several steps: the prompt was chunked
    assert_pool_whole(llm)


def test_rows_in_several_slices(model, monkeypatch):
    path, hf = model
    monkeypatch.setattr(model_runner, "compute_prompt_logprobs",
                        functools.partial(prompt_logprobs.compute_prompt_logprobs, rows_per_slice=5))
    prompts = random_prompts([23, 12], seed=8)
    llm = tidal.LLM(path, block_size=BLOCK, num_kv_blocks=64)  # one step: 33 rows, in 7 slices
    outputs = llm.generate(prompts, [greedy(prompt_logprobs=4), greedy(prompt_logprobs=1)], use_tqdm=False)
    assert_prompt_logprobs(hf, prompts[0], outputs[0].prompt_logprobs, 4)
    assert_prompt_logprobs(hf, prompts[1], outputs[1].prompt_logprobs, 1)
    assert_pool_whole(llm)


@pytest.mark.parametrize("device", DEVICES)
def test_preemption_mid_prompt_adds_no_entry_twice(model, monkeypatch, device):
    path, hf = model
    recomputed = []
    original = prompt_logprobs.PromptLogprobs.positions_to_compute

    def spy(self, start, num_new):
        if start < len(self.entries) - 1:
            recomputed.append((start, len(self.entries) - 1))
        return original(self, start, num_new)

    monkeypatch.setattr(prompt_logprobs.PromptLogprobs, "positions_to_compute", spy)
    prompts = random_prompts([9, 14, 6, 27, 11, 30], seed=3)
    # 14 blocks of 4 tokens, 8 tokens a step: long prompts are preempted while they are chunked
    llm = tidal.LLM(path, device=device, block_size=BLOCK, num_kv_blocks=14, max_model_len=48,
                    max_num_batched_tokens=8)
    outputs = llm.generate(prompts, greedy(16, prompt_logprobs=2), use_tqdm=False)
    stats = llm.stats()
    assert stats["preemptions"] > 0 and recomputed, stats
    for prompt, out in zip(prompts, outputs):
        assert_prompt_logprobs(hf, prompt, out.prompt_logprobs, 2, device)
    assert_pool_whole(llm)


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_prefix_cache_is_not_read_for_prompt_logprobs(model, enable_prefix_caching):
    path, hf = model
    prompt = random_prompts([21], seed=4)[0]
    llm = tidal.LLM(path, block_size=BLOCK, num_kv_blocks=64, enable_prefix_caching=enable_prefix_caching)
    first = llm.generate([prompt], greedy(), use_tqdm=False)[0]
    asked = llm.generate([prompt], greedy(prompt_logprobs=1), use_tqdm=False)[0]
    again = llm.generate([prompt], greedy(), use_tqdm=False)[0]
    assert asked.num_cached_tokens == 0
    assert_prompt_logprobs(hf, prompt, asked.prompt_logprobs, 1)
    assert asked.outputs[0].token_ids == first.outputs[0].token_ids == again.outputs[0].token_ids
    assert again.num_cached_tokens == (20 if enable_prefix_caching else 0)  # the others still hit
    assert_pool_whole(llm)


def test_samples_of_one_request_share_one_list(model):
    path, hf = model
    prompt = random_prompts([18], seed=5)[0]
    llm = tidal.LLM(path, block_size=BLOCK, num_kv_blocks=64, max_num_batched_tokens=8)
    params = tidal.SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=5, ignore_eos=True, prompt_logprobs=2)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert len(out.outputs) == 3 and all(len(s.token_ids) == 5 for s in out.outputs)
    assert_prompt_logprobs(hf, prompt, out.prompt_logprobs, 2)
    assert_pool_whole(llm)


@pytest.mark.parametrize("device,enforce_eager", [
    pytest.param("cpu", True, id="cpu"), cuda_param("cuda", False, id="cuda-graphs"),
    cuda_param("cuda", True, id="cuda-eager")])
def test_one_token_prompt_chunks_among_decodes(model, device, enforce_eager):
    """Three requests decode while a long prompt gets the step's last token of budget: steps of one
    token per sequence, which on a GPU would look like decode steps a CUDA graph replays."""
    path, hf = model
    decoding = random_prompts([3, 5, 4], seed=6)
    long = random_prompts([26], seed=7)[0]
    llm = tidal.LLM(path, device=device, block_size=BLOCK, num_kv_blocks=64, max_num_seqs=4,
                    max_num_batched_tokens=4, enforce_eager=enforce_eager)
    engine = llm.engine
    for i, p in enumerate(decoding):
        engine.add_request(f"d{i}", p, greedy(40))
    while any(engine.scheduler.request(s).num_output_tokens == 0 for s in engine._seqs):
        engine.step()
    steps = []
    execute = engine.runner.execute

    def recorded(batch, sampling, mm=None, prompt_rows=None):
        steps.append((batch.max_seqlen_q, prompt_rows is not None))
        return execute(batch, sampling, mm, prompt_rows)

    engine.runner.execute = recorded
    engine.add_request("long", long, greedy(2, prompt_logprobs=3))
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert (1, True) in steps  # a step of one token per sequence that computed prompt log-probs
    assert_prompt_logprobs(hf, long, finished["long"].prompt_logprobs, 3, device)
    assert_pool_whole(llm)


@pytest.mark.parametrize("value", [-1, 1.5, "3"])
def test_bad_prompt_logprobs_name_the_argument(value):
    with pytest.raises(ValueError, match=rf"prompt_logprobs={value!r} must be None or an integer >= 0"):
        tidal.SamplingParams(prompt_logprobs=value)


def test_engine_rejects_more_than_the_vocabulary(model):
    path, _ = model
    llm = tidal.LLM(path, block_size=BLOCK, num_kv_blocks=64)
    with pytest.raises(ValueError, match=rf"prompt_logprobs={VOCAB_SIZE + 1} exceeds the vocabulary size {VOCAB_SIZE}"):
        llm.generate([[5, 6, 7]], greedy(prompt_logprobs=VOCAB_SIZE + 1), use_tqdm=False)
    assert llm.engine.num_unfinished_requests == 0
    out = llm.generate([[5, 6, 7]], greedy(prompt_logprobs=VOCAB_SIZE), use_tqdm=False)[0]
    assert all(len(entry) == VOCAB_SIZE for entry in out.prompt_logprobs[1:])
    assert_pool_whole(llm)
