"""The engine's contract beyond parity: bad input is a ValueError naming it, aborts and failures free
their blocks, the loop keeps serving after a request fails, the async engine serves many callers,
and detokenization never splits a character."""

import asyncio
import random

import pytest
import torch

import tidal
from tidal.serve.async_engine import AsyncLLMEngine
from tidal.tokenizer import IncrementalDetokenizer, Tokenizer
from tiny_models import assert_pool_whole, build_model


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("engine"))
    build_model(p, "qwen3", max_position_embeddings=64)
    return p


@pytest.fixture()
def llm(path):
    return tidal.LLM(path, block_size=4, num_kv_blocks=40)


def prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(2, 300) for _ in range(rng.randrange(2, 12))] for _ in range(n)]




GREEDY = tidal.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def test_bad_prompts_name_the_problem_and_leave_nothing_behind(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[5, 6], []], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 320\)"):
        llm.generate([[5, 320]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len=64"):
        llm.generate([[5] * 64], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate([[5]], tidal.SamplingParams(stop_token_ids=[999]), use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params has 2 entries"):
        llm.generate([[5]], [GREEDY, GREEDY], use_tqdm=False)
    assert llm.engine.num_unfinished_requests == 0
    assert_pool_whole(llm)
    assert llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_kv_blocks=15), "fewer than the 16 one request of max_model_len=64 needs"),
    (dict(max_num_seqs=0), "max_num_seqs=0"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens=0"),
    (dict(block_size=0), "block_size=0"),
    (dict(kv_cache_memory_fraction=1.5), "kv_cache_memory_fraction=1.5"),
    (dict(max_model_len=1000), "max_model_len=1000"),
    (dict(device="tpu"), "device='tpu'"),
])
def test_bad_engine_options(path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tidal.LLM(path, **{"block_size": 4, **kwargs})


def test_abort_mid_generation_frees_blocks(llm):
    engine = llm.engine
    ps = prompts(3, seed=1)
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, tidal.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine.abort_request("r1")
    assert not engine.abort_request("r1")  # already gone
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert set(finished) == {"r0", "r2"}
    assert all(len(o.outputs[0].token_ids) == 20 for o in finished.values())
    assert_pool_whole(llm)


def test_one_failing_request_does_not_stop_the_others(llm, monkeypatch):
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts(4, seed=2), GREEDY, use_tqdm=False)]
    engine = llm.engine
    original = engine._append_token

    def flaky(seq, token_id, *args):
        if seq.request.request_id.endswith("#bad") and len(seq.sampling.output_token_ids) == 2:
            raise RuntimeError("detokenizer exploded")
        return original(seq, token_id, *args)

    monkeypatch.setattr(engine, "_append_token", flaky)
    for i, p in enumerate(prompts(4, seed=2)):
        engine.add_request(f"x{i}" + ("#bad" if i == 1 else ""), p, GREEDY)
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out
    bad = results.pop("x1#bad")
    assert bad.outputs[0].finish_reason == "error" and "detokenizer exploded" in bad.error
    assert [results[f"x{i}"].outputs[0].token_ids for i in (0, 2, 3)] == [expected[i] for i in (0, 2, 3)]
    assert_pool_whole(llm)


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(llm, monkeypatch):
    engine = llm.engine
    calls = {"n": 0}
    original = engine.runner.execute  # the model runner: an eager forward or a CUDA graph replay

    def broken(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", broken)
    outs = llm.generate(prompts(3, seed=3), GREEDY, use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "error" and "device lost" in o.error for o in outs)
    assert_pool_whole(llm)
    monkeypatch.setattr(engine.runner, "execute", original)
    assert llm.generate(prompts(2, seed=4), GREEDY, use_tqdm=False)[1].outputs[0].finish_reason == "length"
    assert_pool_whole(llm)


def test_async_engine_serves_concurrent_callers_and_aborts(llm):
    ps = prompts(12, seed=5)
    expected = [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY, use_tqdm=False)]
    engine = AsyncLLMEngine(llm.engine)

    async def consume(i):
        last = None
        async for out in engine.generate(ps[i], GREEDY, request_id=f"a{i}"):
            assert out.request_id == f"a{i}"
            last = out
        return last

    async def leave_early():
        async for out in engine.generate(ps[0], tidal.SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)):
            if len(out.outputs[0].token_ids) >= 2:
                break  # like a client that disconnects: the request is aborted

    async def main():
        results = await asyncio.gather(*(consume(i) for i in range(12)), leave_early())
        with pytest.raises(ValueError, match="prompt is empty"):
            async for _ in engine.generate([], GREEDY):
                pass
        await engine.shutdown()
        return results

    results = asyncio.run(main())
    assert [r.outputs[0].token_ids for r in results[:12]] == expected
    assert all(r.finished for r in results[:12])
    assert_pool_whole(llm)


def test_incremental_detokenizer_never_splits_a_character(path):
    tok = Tokenizer(path)
    text = "héllo wörld, ça va? 🌊 naïve café 🌊🙂"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [0])
    deltas = [detok.step([t]) for t in ids]
    assert "".join(deltas) == text == detok.text
    assert not any("\ufffd" in d for d in deltas)
    assert len(tok.encode("🌊", add_special_tokens=False)) > 1  # the emoji really spans several tokens


def test_priority_policy_serves_lower_values_first(path):
    llm = tidal.LLM(path, block_size=4, num_kv_blocks=40, max_num_seqs=1, scheduling_policy="priority")
    engine = llm.engine
    order = []
    for name, rank in (("late", 5), ("urgent", -1), ("normal", 0)):
        engine.add_request(name, [7, 8, 9], tidal.SamplingParams(temperature=0, max_tokens=3), priority=rank)
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["urgent", "normal", "late"]
    fcfs = tidal.LLM(path, block_size=4, num_kv_blocks=40, max_num_seqs=1)
    outs = fcfs.generate([[7, 8], [9, 10]], GREEDY, use_tqdm=False, priority=[9, 0])
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "length"]
    with pytest.raises(ValueError, match="scheduling_policy='lifo'"):
        tidal.LLM(path, block_size=4, scheduling_policy="lifo")
    assert_pool_whole(llm)
