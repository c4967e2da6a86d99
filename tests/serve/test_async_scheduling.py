"""Asynchronous scheduling (tidal.LLM(async_scheduling=True)): each step is planned and launched before
the previous step's tokens reach the host, its placeholder inputs filled from the device. The outputs
must equal synchronous scheduling token for token (greedy and seeded sampling, stop tokens and EOS a
step late, min_tokens, log-probs, n > 1, stop strings, preemption, prefix caching), requests that need
every token first (penalties) must fall back, aborts must free everything, and the pool must end whole."""

import random

import numpy as np
import pytest

import tidal
from tidal import _core

from conftest import DEVICES
from tiny_models import EOS, VOCAB_SIZE, assert_pool_whole, build_model

sched = _core.sched
S = sched.RequestStatus


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("async") / "m")
    build_model(path, "qwen3")
    return path


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(2, VOCAB_SIZE) for _ in range(12)]  # some prompts share a prefix
    return [(shared if i % 3 == 0 else []) + [rng.randrange(2, VOCAB_SIZE) for _ in range(rng.randrange(2, 30))]
            for i in range(n)]


def _params(i: int) -> tidal.SamplingParams:
    """A mix of what requests ask for: greedy and seeded sampling, stop tokens (common ones, so
    requests stop early), EOS, min_tokens, log-probs, several samples."""
    return tidal.SamplingParams(temperature=0.0 if i % 3 else 0.9, seed=1000 + i, max_tokens=4 + (i * 7) % 30,
                                stop_token_ids=[5 + i % 4, 9], min_tokens=i % 4, ignore_eos=i % 5 == 0,
                                logprobs=2 if i % 4 == 0 else None, n=2 if i % 7 == 0 else 1)


def _generate(path, device, async_scheduling, prompts, params, num_kv_blocks=24):
    llm = tidal.LLM(path, device=device, dtype="float32", max_num_seqs=8, max_model_len=96, block_size=4,
                    num_kv_blocks=num_kv_blocks, async_scheduling=async_scheduling)
    engine, resolved = llm.engine, []
    resolve = engine._resolve
    engine._resolve = lambda prev: resolved.append(len(prev.sample_ids)) or resolve(prev)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert (len(resolved) > 10) == async_scheduling, resolved  # steps ran ahead of their tokens, or none did
    assert_pool_whole(llm)
    result = [[(list(c.token_ids), c.finish_reason, c.stop_reason, c.text,
                None if c.logprobs is None else [sorted(d.items()) for d in c.logprobs]) for c in o.outputs]
              for o in outs]
    return result, llm


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_equal_synchronous_scheduling(model_dir, device):
    """24 mixed requests through 8 seats and a pool that forces preemptions: every token, finish
    reason, text and log-prob as under synchronous scheduling."""
    prompts = _prompts(24)
    params = [_params(i) for i in range(len(prompts))]
    sync, llm_sync = _generate(model_dir, device, False, prompts, params)
    asyn, llm_async = _generate(model_dir, device, True, prompts, params)
    for i, (a, b) in enumerate(zip(sync, asyn)):
        for x, y in zip(a, b):
            assert x[:4] == y[:4], (i, x[:4], y[:4])
            if x[4] is not None:  # log-probs: the same tokens, values up to the device's rounding
                assert [[t for t, _ in row] for row in x[4]] == [[t for t, _ in row] for row in y[4]]
                np.testing.assert_allclose([v for row in x[4] for _, v in row], [v for row in y[4] for _, v in row],
                                           rtol=1e-4, atol=1e-4)
    assert llm_sync.stats()["preemptions"] > 0 and llm_async.stats()["preemptions"] > 0
    finish = {c[1] for o in sync for c in o}
    assert finish == {"stop", "length"}, finish  # both kinds of stop happened


@pytest.mark.parametrize("device", DEVICES)
def test_stop_strings_and_eos(model_dir, device):
    """Text stop strings (found by the bookkeeping while the next step runs) and EOS end requests
    exactly where they do synchronously."""
    prompts = _prompts(10, seed=3)
    sync_out, _ = _generate(model_dir, device, False, prompts, [tidal.SamplingParams(max_tokens=40)] * 10)
    # stop on a piece of some request's text, and on EOS everywhere else
    text = next(c[3] for o in sync_out for c in o if len(c[3]) > 6)
    params = [tidal.SamplingParams(max_tokens=40, stop=[text[3:6]], stop_token_ids=[EOS]) for _ in prompts]
    a, _ = _generate(model_dir, device, False, prompts, params)
    b, _ = _generate(model_dir, device, True, prompts, params)
    assert [[c[:4] for c in o] for o in a] == [[c[:4] for c in o] for o in b]
    assert any(c[1] == "stop" and c[2] == text[3:6] for o in a for c in o)
    # one request alone: the step after its stop string has no live sequence that samples
    hit = next(i for i, o in enumerate(a) if o[0][2] == text[3:6])
    alone_sync, _ = _generate(model_dir, device, False, [prompts[hit]], [params[hit]])
    llm = tidal.LLM(model_dir, device=device, dtype="float32", max_num_seqs=8, max_model_len=96, block_size=4,
                    num_kv_blocks=24, async_scheduling=True)
    alone = llm.generate([{"prompt_token_ids": prompts[hit]}], [params[hit]], use_tqdm=False)[0].outputs[0]
    assert (list(alone.token_ids), alone.finish_reason, alone.stop_reason, alone.text) == alone_sync[0][0][:4]
    assert alone.finish_reason == "stop"
    assert_pool_whole(llm)


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_fall_back_to_synchronous_steps(model_dir, device):
    """A request with penalties needs every earlier token before it samples: while it runs the engine
    steps synchronously, before and after it asynchronously; outputs equal throughout."""
    prompts = _prompts(12, seed=5)
    params = [tidal.SamplingParams(max_tokens=12 + i, temperature=0.0, repetition_penalty=1.3 if i == 6 else 1.0,
                                   frequency_penalty=0.5 if i == 6 else 0.0) for i in range(12)]
    a, _ = _generate(model_dir, device, False, prompts, params)
    llm = tidal.LLM(model_dir, device=device, dtype="float32", max_num_seqs=4, max_model_len=96, block_size=4,
                    num_kv_blocks=40, async_scheduling=True)
    engine = llm.engine
    modes = []
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
    done = {}
    while engine.has_unfinished_requests():
        modes.append(engine._async_ok())
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out
    b = [[(list(c.token_ids), c.finish_reason) for c in done[i].outputs] for i in range(12)]
    assert [[c[:2] for c in o] for o in a] == b
    assert True in modes and False in modes  # both kinds of step ran
    assert_pool_whole(llm)


@pytest.mark.parametrize("device", DEVICES)
def test_abort_while_a_step_is_in_flight(model_dir, device):
    """Aborting requests between steps (one of them with its token in flight) ends them, frees their
    blocks, and leaves the others' outputs as without the abort."""
    prompts = _prompts(6, seed=7)
    params = tidal.SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    llm = tidal.LLM(model_dir, device=device, dtype="float32", max_num_seqs=8, max_model_len=96, block_size=4,
                    num_kv_blocks=60, async_scheduling=True)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    outputs = {}
    for _ in range(4):
        for out in engine.step():
            outputs[out.request_id] = out
    assert engine._inflight is not None  # a step's tokens are on their way
    assert engine.abort_request("1") and engine.abort_request("4")
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
    assert_pool_whole(llm)
    reference, _ = _generate(model_dir, device, False, [prompts[i] for i in (0, 2, 3, 5)], params, num_kv_blocks=60)
    assert [list(outputs[str(i)].outputs[0].token_ids) for i in (0, 2, 3, 5)] == [o[0][0] for o in reference]
    assert all(len(outputs[str(i)].outputs[0].token_ids) == 20 for i in (0, 2, 3, 5))


def test_async_scheduling_must_be_none_or_a_bool(model_dir):
    with pytest.raises(ValueError, match=r"async_scheduling=1 must be None \(on for a GPU\) or a bool"):
        tidal.LLM(model_dir, device="cpu", async_scheduling=1)


@pytest.mark.parametrize("device", DEVICES)
def test_default_is_on_for_a_gpu_and_off_on_the_cpu(model_dir, device):
    """async_scheduling=None (the default) plans ahead where the device runs beside the host, and the
    explicit values win on either device."""
    params = tidal.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for setting, expected in ((None, device == "cuda"), (True, True), (False, False)):
        llm = tidal.LLM(model_dir, device=device, dtype="float32", max_num_seqs=4, max_model_len=96, block_size=4,
                        num_kv_blocks=24, async_scheduling=setting)
        assert llm.engine.async_scheduling is expected
        engine, resolved = llm.engine, []
        resolve = engine._resolve
        engine._resolve = lambda prev: resolved.append(prev) or resolve(prev)
        llm.generate([{"prompt_token_ids": p} for p in _prompts(3, seed=11)], params, use_tqdm=False)
        assert bool(resolved) is expected  # steps ran ahead of their tokens only when it is on
        assert_pool_whole(llm)


# ---- the scheduler's half: update_pending() and resolve_tokens() --------------------------------

def _scheduler(num_blocks=16, max_num_seqs=4, max_model_len=64):
    return sched.Scheduler(sched.SchedulerConfig(num_kv_blocks=num_blocks, block_size=4, max_num_seqs=max_num_seqs,
                                                 max_num_batched_tokens=64, max_model_len=max_model_len,
                                                 enable_prefix_caching=True))


def test_scheduler_plans_over_placeholders():
    """update_pending() appends a placeholder (-1, the next batch's input), resolve_tokens() replaces
    it and applies stop tokens; length stops apply at once; the order of calls is enforced."""
    s = _scheduler()
    s.add_request(1, [3, 4, 5], sched.StopParams(3, stop_token_ids=[7]))
    s.add_request(2, [6, 6], sched.StopParams(2))
    out = s.schedule()
    assert s.update_pending(out) == []
    assert s.has_unresolved_tokens
    assert s.request(1).output_token_ids == [-1]
    nxt = s.schedule()  # planned over the placeholders: each decodes its unknown token
    assert nxt.input_ids.tolist() == [-1, -1] and nxt.positions.tolist() == [3, 2]
    with pytest.raises(RuntimeError, match="cannot be applied before resolve_tokens"):
        s.update_pending(nxt)
    with pytest.raises(ValueError, match=r"sampled_token_ids\[1\]=-1 for request_id=2 must be >= 0"):
        s.resolve_tokens(np.array([8, -1], dtype=np.int32))
    assert s.resolve_tokens(np.array([8, 9], dtype=np.int32)) == []
    assert s.request(1).output_token_ids == [8] and s.request(2).output_token_ids == [9]
    with pytest.raises(RuntimeError, match="resolve_tokens.. without a step"):
        s.resolve_tokens(np.array([1, 1], dtype=np.int32))
    finished = s.update_pending(nxt)  # request 2 reaches max_tokens=2: finished now, token pending
    assert [(f.request_id, f.status, f.num_output_tokens) for f in finished] == [(2, S.FINISHED_LENGTH, 2)]
    third = s.schedule()
    assert third.request_ids.tolist() == [1]
    stopped = s.resolve_tokens(np.array([7, 11], dtype=np.int32))  # request 1 sampled its stop token
    assert [(f.request_id, f.status) for f in stopped] == [(1, S.FINISHED_STOPPED)]
    assert s.request(1).output_token_ids == [8, 7]
    s.update_pending(third)  # the stopped request's extra step is skipped, but still owes its resolve
    assert s.has_unresolved_tokens
    assert s.resolve_tokens(np.array([-1], dtype=np.int32)) == [] and not s.has_unresolved_tokens
    assert s.schedule().num_seqs == 0
    assert s.stats()["kv_blocks_free"] == s.stats()["kv_blocks_total"]


def test_every_pending_step_is_resolved_even_with_nothing_sampled():
    """The engine finished a step's only sampling request before update_pending() (a stop string):
    the step still owes its resolve_tokens(), which changes nothing."""
    s = _scheduler()
    s.add_request(1, [3, 4, 5], sched.StopParams(8))
    s.update(s.schedule(), np.array([6], dtype=np.int32))
    out = s.schedule()
    s.finish_request(1, S.FINISHED_STOPPED)
    assert s.update_pending(out) == [] and s.has_unresolved_tokens
    with pytest.raises(RuntimeError, match="cannot be applied before resolve_tokens"):
        s.update(s.schedule(), np.array([], dtype=np.int32))
    assert s.resolve_tokens(np.array([-1], dtype=np.int32)) == [] and not s.has_unresolved_tokens
    assert s.schedule().num_seqs == 0
    assert s.stats()["kv_blocks_free"] == s.stats()["kv_blocks_total"]


def test_a_stop_token_beats_length_when_it_arrives_late():
    """The last token a request may have (max_tokens) is a stop token: update() would say STOPPED, so
    resolve_tokens() restates update_pending()'s length stop, and the request stays readable until then."""
    s = _scheduler()
    s.add_request(1, [3, 4], sched.StopParams(1, eos_token_ids=[2]))
    out = s.schedule()
    assert [(f.request_id, f.status) for f in s.update_pending(out)] == [(1, S.FINISHED_LENGTH)]
    assert s.schedule().num_seqs == 0  # nothing to plan; the finished request is kept for its token
    assert s.request(1).status == S.FINISHED_LENGTH
    assert [(f.request_id, f.status, f.num_output_tokens) for f in s.resolve_tokens(np.array([2], dtype=np.int32))] \
        == [(1, S.FINISHED_STOPPED, 1)]
    assert s.request(1).status == S.FINISHED_STOPPED and s.request(1).output_token_ids == [2]
    s.schedule()
    assert not s.has_request(1)
    assert s.stats()["kv_blocks_free"] == s.stats()["kv_blocks_total"]


def test_a_preempted_request_may_stop_on_its_late_token():
    """A request preempted by the step planned over its placeholder can still stop when the token
    turns out to be a stop token (PREEMPTED -> FINISHED_STOPPED), freeing nothing twice."""
    s = _scheduler(num_blocks=4, max_num_seqs=2, max_model_len=16)
    s.add_request(1, [1, 2, 3, 4, 5, 6, 7, 8], sched.StopParams(8, stop_token_ids=[9]))
    s.add_request(2, [8, 7, 6, 5, 4, 3, 2, 1], sched.StopParams(8, stop_token_ids=[9]))
    s.update_pending(s.schedule())  # 4 blocks: both prompts fill 2 each
    nxt = s.schedule()  # each placeholder needs a third block: request 2 (the last admitted) is preempted
    assert nxt.preempted_ids == [2] and s.request(2).status == S.PREEMPTED
    victim = 2
    tokens = np.array([9, 9], dtype=np.int32)
    stopped = s.resolve_tokens(tokens)
    assert victim in [f.request_id for f in stopped]
    assert s.request(victim).status == S.FINISHED_STOPPED and s.request(victim).output_token_ids == [9]
    assert s.request(1).status == S.FINISHED_STOPPED  # the running one stops as well
    s.update_pending(nxt)  # both finished: nothing applies
    assert s.schedule().num_seqs == 0
    assert s.stats()["kv_blocks_free"] == s.stats()["kv_blocks_total"]
