"""Tensor-parallel serving over Gloo on the CPU (tidal.LLM(tensor_parallel_size=N)): N = 2 and 4 give
the greedy tokens of N = 1 and its prompt and sampled log-probs within fp32's reordering of the
all-reduced sums, for each model family (GQA with a KV head per rank and KV heads replicated across
ranks, Qwen3's q/k norm, Mistral's sliding window, Qwen2's qkv bias, tied embeddings, a vocabulary the
ranks do not divide), an FP8 KV cache on every rank included; the pool stays whole; a worker that dies fails the requests of the step with
an error instead of hanging; shapes the split cannot take are refused by name."""

import time

import pytest
import torch

import tidal
from tidal.models.tensor_parallel import TensorParallelGroup, kv_heads_of_rank
from tiny_models import assert_pool_whole, build_model

# hidden 64, 4 query heads over 2 KV heads, intermediate 96 (divisible by 2 and 4)
CASES = {
    "llama": dict(family="llama"),
    "qwen3": dict(family="qwen3"),
    "mistral": dict(family="mistral"),
    "qwen2": dict(family="qwen2"),
    "llama_tied_odd_vocab": dict(family="llama", tie=True, vocab_size=301),
}
PROMPTS = [[5, 9, 33, 41, 7, 12, 90, 3, 18, 27, 44, 61, 2 + 70, 88, 19], [200, 4, 61], list(range(10, 40))]


@pytest.fixture(scope="module", params=list(CASES))
def model_dir(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(f"tp_{request.param}"))
    kwargs = dict(CASES[request.param])
    build_model(path, kwargs.pop("family"), **kwargs)
    return path


def run(path, tp: int, kv_cache_dtype: str = "auto"):
    params = tidal.SamplingParams(temperature=0.0, max_tokens=12, prompt_logprobs=0, logprobs=3, ignore_eos=True)
    llm = tidal.LLM(path, device="cpu", dtype="float32", tensor_parallel_size=tp, num_kv_blocks=40, block_size=4,
                    max_model_len=128, max_num_batched_tokens=24,  # chunked prefill: the 30-token prompt takes two steps
                    kv_cache_dtype=kv_cache_dtype)
    try:
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        assert_pool_whole(llm)
        return outputs
    finally:
        llm.close()


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_equals_one_rank(model_dir, tp):
    assert_same(run(model_dir, 1), run(model_dir, tp))


def test_tensor_parallel_with_an_fp8_kv_cache(tmp_path):
    """Each rank's keys and values are those of one rank's (whole dot products per head), so their FP8
    codes are too: the workers' FP8 caches give the tokens of an FP8 cache on one rank."""
    path = str(tmp_path / "m")
    build_model(path, "qwen3")
    assert_same(run(path, 1, "fp8"), run(path, 2, "fp8"))


def assert_same(want, got):
    for a, b in zip(want, got):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].finish_reason == "length"
        for entries_a, entries_b in ((a.prompt_logprobs[1:], b.prompt_logprobs[1:]),
                                     (a.outputs[0].logprobs, b.outputs[0].logprobs)):
            assert len(entries_a) == len(entries_b)
            for ea, eb in zip(entries_a, entries_b):
                assert sorted(ea) == sorted(eb)  # the same tokens (the prompt's or sampled, and the top ones)
                torch.testing.assert_close(torch.tensor([eb[t] for t in sorted(eb)]),
                                           torch.tensor([ea[t] for t in sorted(ea)]), atol=1e-4, rtol=1e-4)


def test_kv_heads_of_each_rank():
    assert [kv_heads_of_rank(8, 4, r, 2) for r in range(2)] == [(0, 2), (2, 2)]
    assert [kv_heads_of_rank(8, 2, r, 4) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [kv_heads_of_rank(8, 1, r, 4) for r in range(4)] == [(0, 1)] * 4  # MQA: one head everywhere


def test_a_dead_worker_fails_the_step_with_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TIDAL_TP_TIMEOUT_S", "20")
    path = str(tmp_path / "m")
    build_model(path, "llama")
    llm = tidal.LLM(path, device="cpu", dtype="float32", tensor_parallel_size=2, num_kv_blocks=40, block_size=4,
                    max_model_len=128)
    try:
        params = tidal.SamplingParams(temperature=0.0, max_tokens=4)
        assert len(llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0].token_ids) == 4
        worker = llm.engine.tp_driver.workers[0]
        worker.kill()
        worker.join(timeout=10)
        start = time.monotonic()
        out = llm.generate(PROMPTS[:2], params, use_tqdm=False)
        assert time.monotonic() - start < 20
        for o in out:
            assert o.outputs[0].finish_reason == "error" and "tidal-tp-1" in o.error, o.error
        assert_pool_whole(llm)
    finally:
        llm.close()
    assert not llm.engine.tp_driver.workers[0].is_alive()


def test_shapes_that_do_not_split_are_named(tmp_path):
    path = str(tmp_path / "m")
    build_model(path, "llama")  # 4 query heads, 2 KV heads, intermediate 96
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide num_attention_heads=4"):
        tidal.LLM(path, device="cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size=0 must be an integer >= 1"):
        tidal.LLM(path, device="cpu", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="quantized layers do not split"):
        tidal.LLM(path, device="cpu", tensor_parallel_size=2, quantization="int8")
    with pytest.raises(ValueError, match="rank=2 must be in"):
        TensorParallelGroup(2, 2)


def test_command_line_flag(tmp_path, capsys):
    from tidal.cli import main

    path = str(tmp_path / "m")
    build_model(path, "llama")
    assert main(["generate", path, "--prompt", "def", "--max-tokens", "4", "--temperature", "0", "--device", "cpu",
                 "--tensor-parallel-size", "2"]) == 0
    capsys.readouterr()
