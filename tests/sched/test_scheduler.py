# SPDX-License-Identifier: Apache-2.0
"""tidal._core.sched.Scheduler through the binding: the step's flat batch (dtypes, shapes and every
value checked against the requests), chunked prefill mixed with decodes, the token budget and seat
limit, preemption by recompute (FCFS and priority), prefix hits and share_prompt_with, every stop
condition, abort in each state, invalid transitions, argument errors that name the argument and
value, and a randomized simulation that checks the pool and the request ledger after every step."""
import random
import threading

import numpy as np
import pytest

from tidal._core import sched

S = sched.RequestStatus


def make(num_kv_blocks=32, block_size=4, max_num_batched_tokens=64, max_model_len=64, **kw):
    config = sched.SchedulerConfig(num_kv_blocks=num_kv_blocks, block_size=block_size,
                                   max_num_batched_tokens=max_num_batched_tokens,
                                   max_model_len=max_model_len, **kw)
    return sched.Scheduler(config)


def check_pool(s):
    st = s.stats()
    assert st["kv_blocks_free"] + st["kv_blocks_used"] == st["kv_blocks_total"]
    assert st["kv_blocks_free"] == s.kv_cache.num_blocks_free


def check_pool_whole(s):
    s.schedule()  # removes the finished requests
    check_pool(s)
    assert not s.has_unfinished_requests()
    assert s.kv_cache.num_blocks_free == s.kv_cache.num_blocks_total


def check_batch(s, out):
    """Every array of `out` against the requests' tokens, block tables and the limits."""
    c = s.config
    bs = c.block_size
    n = out.num_seqs
    assert out.request_ids.dtype == np.int64 and out.request_ids.shape == (n,)
    assert out.input_ids.dtype == np.int32 and out.input_ids.shape == (out.num_tokens,)
    assert out.positions.dtype == np.int64 and out.slot_mapping.dtype == np.int64
    assert out.cu_seqlens_q.dtype == np.int32 and out.cu_seqlens_q.shape == (n + 1,)
    assert out.seq_lens.dtype == np.int32 and out.num_computed_tokens.dtype == np.int32
    assert out.needs_sample.dtype == np.bool_ and out.needs_sample.shape == (n,)
    assert out.block_tables.dtype == np.int32 and out.block_tables.shape == (n, out.max_num_blocks)
    assert out.num_tokens <= c.max_num_batched_tokens
    assert s.num_running <= c.max_num_seqs
    assert out.cu_seqlens_q[0] == 0 and out.cu_seqlens_q[-1] == out.num_tokens
    assert len(set(out.request_ids.tolist())) == n
    slots = set()
    for i in range(n):
        r = s.request(int(out.request_ids[i]))
        assert r.status == S.RUNNING
        q0, q1 = int(out.cu_seqlens_q[i]), int(out.cu_seqlens_q[i + 1])
        computed = int(out.num_computed_tokens[i])
        assert q1 > q0 and computed == r.num_computed_tokens
        assert out.seq_lens[i] == computed + (q1 - q0) <= r.num_tokens
        assert bool(out.needs_sample[i]) == (out.seq_lens[i] == r.num_tokens)
        tokens = r.prompt_token_ids + r.output_token_ids
        table = s.kv_cache.block_table(r.request_id)
        nblocks = -(-int(out.seq_lens[i]) // bs)
        assert out.block_tables[i, :nblocks].tolist() == table[:nblocks]
        assert not out.block_tables[i, nblocks:].any()
        pos = np.arange(computed, computed + q1 - q0)
        assert out.positions[q0:q1].tolist() == pos.tolist()
        assert out.input_ids[q0:q1].tolist() == tokens[computed:computed + q1 - q0]
        expected_slots = [table[p // bs] * bs + p % bs for p in pos.tolist()]
        assert out.slot_mapping[q0:q1].tolist() == expected_slots
        slots.update(expected_slots)
    assert len(slots) == out.num_tokens
    check_pool(s)


def step(s, token=7):
    out = s.schedule()
    check_batch(s, out)
    sampled = np.where(out.needs_sample, token, -1).astype(np.int32)
    finished = s.update(out, sampled)
    check_pool(s)
    return out, finished


def drain(s, max_steps=10_000):
    for _ in range(max_steps):
        if not s.has_unfinished_requests():
            break
        step(s)
    check_pool_whole(s)


# ---- scenarios -----------------------------------------------------------------------------------
def test_chunked_prefill_then_decode():
    s = make(num_kv_blocks=16, max_num_batched_tokens=8)
    s.add_request(1, list(range(100, 120)), sched.StopParams(3))
    out, _ = step(s)
    assert out.num_tokens == 8 and not out.needs_sample[0] and out.max_seqlen_q == 8
    out, _ = step(s)
    assert out.positions[0] == 8 and out.num_computed_tokens[0] == 8
    out, _ = step(s)
    assert out.num_tokens == 4 and out.needs_sample[0] and out.seq_lens[0] == 20
    out, _ = step(s, token=42)
    assert out.input_ids.tolist() == [7] and out.positions.tolist() == [20] and out.max_seqlen_q == 1
    out, finished = step(s)
    assert [(f.request_id, f.status, f.num_output_tokens) for f in finished] == [(1, S.FINISHED_LENGTH, 3)]
    assert s.request(1).output_token_ids == [7, 42, 7]  # readable until the next schedule()
    check_pool_whole(s)
    assert not s.has_request(1)


def test_budget_mixed_prefill_decode_and_seats():
    s = make(num_kv_blocks=64, max_num_batched_tokens=10, max_model_len=128, max_num_seqs=2)
    s.add_request(1, [1, 2, 3], sched.StopParams(20))
    step(s)
    s.add_request(2, list(range(50, 80)), sched.StopParams(2))
    s.add_request(3, [9, 9], sched.StopParams(2))
    out, _ = step(s)
    assert out.request_ids.tolist() == [1, 2] and out.cu_seqlens_q.tolist() == [0, 1, 10]
    assert s.num_running == 2 and s.num_waiting == 1 and s.waiting_ids == [3]
    drain(s)


@pytest.mark.parametrize("policy", [sched.Policy.FCFS, sched.Policy.PRIORITY])
def test_preemption_recompute(policy):
    # 6 blocks of 2 tokens; each request grows to 8 tokens = 4 blocks, so both cannot finish together.
    s = make(num_kv_blocks=6, block_size=2, max_model_len=12, policy=policy)
    s.add_request(1, [1, 2, 3, 4], sched.StopParams(4), priority=5)  # least important under PRIORITY
    s.add_request(2, [5, 6, 7, 8], sched.StopParams(4), priority=0)
    victim, survivor = (2, 1) if policy == sched.Policy.FCFS else (1, 2)
    outs = [step(s, token=t)[0] for t in (11, 12, 13)]
    out, finished = step(s, token=14)
    assert out.preempted_ids == [victim] and out.request_ids.tolist() == [survivor]
    assert [f.request_id for f in finished] == [survivor]
    r = s.request(victim)
    assert r.status == S.PREEMPTED and r.num_computed_tokens == 0 and r.num_preemptions == 1
    assert r.output_token_ids == [11, 12, 13]
    assert s.stats()["preemptions"] == 1 and s.num_waiting == 1
    # Readmitted: prompt + outputs recomputed from the last cached block on, at the right positions.
    out, finished = step(s, token=16)
    c = int(out.num_computed_tokens[0])
    full = r.prompt_token_ids + [11, 12, 13]
    assert out.input_ids.tolist() == full[c:] and out.positions.tolist() == list(range(c, 7))
    assert finished[0].request_id == victim and s.request(victim).output_token_ids[-1] == 16
    assert outs[0].request_ids.tolist() == ([1, 2] if policy == sched.Policy.FCFS else [2, 1])
    check_pool_whole(s)


def test_prefix_hit_and_share_prompt_with():
    s = make()
    prompt = list(range(100, 114))  # 3 full blocks + 2 tokens
    s.add_request(1, prompt, sched.StopParams(3))
    s.add_request(2, prompt, sched.StopParams(2), share_prompt_with=1)
    s.add_request(3, [1, 2], sched.StopParams(1))
    out, _ = step(s)
    assert out.request_ids.tolist() == [1, 3] and s.waiting_ids == [2]
    out, _ = step(s)
    assert out.request_ids.tolist() == [1, 2] and out.num_computed_tokens.tolist() == [14, 12]
    assert s.request(2).num_cached_prompt_tokens == 12
    assert s.kv_cache.block_table(1)[:3] == s.kv_cache.block_table(2)[:3]
    drain(s)
    s.add_request(4, prompt, sched.StopParams(1))
    out, _ = step(s)
    assert out.num_computed_tokens.tolist() == [12] and s.request(4).num_cached_prompt_tokens == 12
    st = s.stats()
    assert st["prefix_cache_hit_tokens"] == 24 and st["prefix_cache_queries"] == 4
    check_pool_whole(s)


def test_extra_keys_separate_equal_prompts_with_different_images():
    """A block's extra key (an image hash) joins its hash: equal tokens under different keys share
    nothing, under the same keys everything; blocks after a keyed one differ through the chain."""
    s = make()
    prompt = list(range(100, 114))  # 3 full blocks + 2 tokens: 4 prompt blocks
    keys_a, keys_b = [0, 11, 0, 0], [0, 22, 0, 0]
    s.add_request(1, prompt, sched.StopParams(1), extra_keys=keys_a)
    drain(s)
    s.add_request(2, prompt, sched.StopParams(1), extra_keys=keys_b)
    step(s)
    assert s.request(2).num_cached_prompt_tokens == 4  # only the block before the keyed one
    drain(s)
    s.add_request(3, prompt, sched.StopParams(1), extra_keys=keys_a)
    step(s)
    assert s.request(3).num_cached_prompt_tokens == 12
    drain(s)
    s.add_request(4, prompt, sched.StopParams(1))  # no keys: the unkeyed chain was never cached
    step(s)
    assert s.request(4).num_cached_prompt_tokens == 4
    drain(s)
    with pytest.raises(ValueError, match=r"extra_keys.size\(\)=3 of request_id=5 must be 0 or the 4 blocks"):
        s.add_request(5, prompt, sched.StopParams(1), extra_keys=[1, 2, 3])
    check_pool_whole(s)


def test_disaggregated_hold_reserve_and_computed_requests():
    """Prefill side: a finished request's blocks live on under a hold until released. Decode side:
    reserved blocks become a running request's with its KV computed; it is scheduled from its first
    output token on. Errors name the argument; the pool is whole after each path."""
    s = make(max_num_seqs=2)
    prompt = list(range(100, 110))  # 10 tokens: 3 blocks
    s.add_request(1, prompt, sched.StopParams(1))
    out = s.schedule()
    with pytest.raises(ValueError, match="hold_id=5 must be < 0"):
        s.hold_blocks(1, 5)
    table = s.hold_blocks(1, -1)  # between schedule() and the update() that ends the request
    with pytest.raises(ValueError, match="hold_id=-1 is already in use"):
        s.hold_blocks(1, -1)
    assert len(table) == 3
    s.update(out, np.array([7], dtype=np.int32))
    s.schedule()  # request 1 finished (max_tokens=1): its blocks stay held
    assert s.kv_cache.num_blocks_used == 3 and all(s.kv_cache.ref_count(b) == 1 for b in table)
    s.release_blocks(-1)
    check_pool_whole(s)

    assert s.reserve_blocks(7, 10) and len(s.kv_cache.block_table(7)) == 3
    with pytest.raises(ValueError, match="request_id=7 is already known"):
        s.add_request(7, [1, 2], sched.StopParams(2))
    with pytest.raises(ValueError, match="num_computed_tokens=11 must be in"):
        s.add_computed_request(7, prompt + [5], 10, 11, sched.StopParams(4))
    with pytest.raises(ValueError, match="already has 1 output tokens: max_tokens=1"):
        s.add_computed_request(7, prompt + [5], 10, 10, sched.StopParams(1))
    with pytest.raises(ValueError, match="request_id=8 has no blocks reserved"):
        s.add_computed_request(8, prompt + [5], 10, 10, sched.StopParams(4))
    assert s.add_computed_request(7, prompt + [5], 10, 10, sched.StopParams(3))
    r = s.request(7)
    assert r.status == S.RUNNING and r.num_computed_tokens == 10 and r.num_output_tokens == 1
    out, _ = step(s)
    assert out.request_ids.tolist() == [7] and out.input_ids.tolist() == [5] and out.positions.tolist() == [10]
    assert out.needs_sample.tolist() == [True]
    drain(s)
    assert s.reserve_blocks(9, 4)
    s.release_blocks(9)
    with pytest.raises(IndexError, match="id=9 holds no blocks"):
        s.release_blocks(9)
    assert not s.reserve_blocks(10, 33 * 4)  # more than the pool
    check_pool_whole(s)


@pytest.mark.parametrize(
    "stop, tokens, max_model_len, status, num_out",
    [
        (dict(eos_token_ids=[2]), [5, 2], 64, S.FINISHED_STOPPED, 2),
        (dict(stop_token_ids=[9]), [9], 64, S.FINISHED_STOPPED, 1),
        (dict(eos_token_ids=[2], stop_token_ids=[9], ignore_eos=True), [2, 2, 9], 64, S.FINISHED_STOPPED, 3),
        (dict(eos_token_ids=[2], stop_token_ids=[9], min_tokens=3), [2, 9, 2], 64, S.FINISHED_STOPPED, 3),
        (dict(max_tokens=4, eos_token_ids=[2]), [5, 5, 5, 5, 5], 64, S.FINISHED_LENGTH, 4),
        (dict(max_tokens=1, eos_token_ids=[2]), [2], 64, S.FINISHED_STOPPED, 1),  # stop beats length
        (dict(max_tokens=100), [5] * 10, 6, S.FINISHED_LENGTH, 3),  # 3 prompt + 3 = max_model_len
    ],
)
def test_stop_conditions(stop, tokens, max_model_len, status, num_out):
    s = make(max_model_len=max_model_len)
    stop = dict(stop)
    max_tokens = stop.pop("max_tokens", 10)
    s.add_request(1, [1, 2, 3], sched.StopParams(max_tokens, **stop))
    finished = []
    for t in tokens:
        if not s.has_unfinished_requests():
            break
        finished += step(s, token=t)[1]
    assert [(f.status, f.num_output_tokens) for f in finished] == [(status, num_out)]
    assert s.request(1).output_token_ids == tokens[:num_out]
    check_pool_whole(s)


def test_abort_in_each_state():
    s = make(num_kv_blocks=6, block_size=2, max_model_len=12)
    for rid, prompt in ((1, [1, 2, 3, 4]), (2, [5, 6, 7, 8]), (3, [9])):
        s.add_request(rid, prompt, sched.StopParams(8))
    step(s)
    s.add_request(4, [3, 3], sched.StopParams(2))
    assert s.abort_request(4) and s.request(4).status == S.FINISHED_ABORTED  # waiting
    assert not s.abort_request(4) and not s.abort_request(99)  # finished, unknown
    out = None
    while s.stats()["preemptions"] == 0:
        out, _ = step(s)
    victim = out.preempted_ids[0]
    assert s.request(victim).status == S.PREEMPTED
    assert s.abort_request(victim) and s.request(victim).status == S.FINISHED_ABORTED  # preempted
    out = s.schedule()
    running = int(out.request_ids[0])
    free = s.kv_cache.num_blocks_free
    before = s.request(running)
    assert s.abort_request(running)  # running, between schedule() and update()
    assert s.kv_cache.num_blocks_free > free
    s.update(out, np.full(out.num_seqs, 7, np.int32))
    after = s.request(running)
    assert after.status == S.FINISHED_ABORTED and after.output_token_ids == before.output_token_ids
    drain(s)


def test_finish_request_and_invalid_transitions():
    s = make()
    s.add_request(1, [1, 2], sched.StopParams(8))
    s.add_request(2, [1, 2], sched.StopParams(8))
    with pytest.raises(RuntimeError, match="request_id=1: invalid transition WAITING -> FINISHED_LENGTH"):
        s.finish_request(1, S.FINISHED_LENGTH)
    with pytest.raises(ValueError, match="status=RUNNING"):
        s.finish_request(1, S.RUNNING)
    with pytest.raises(IndexError, match="request_id=5"):
        s.finish_request(5, S.FINISHED_STOPPED)
    s.finish_request(2, S.FINISHED_ERROR)
    step(s)
    s.finish_request(1, S.FINISHED_STOPPED)
    with pytest.raises(RuntimeError, match="FINISHED_STOPPED -> FINISHED_ABORTED"):
        s.finish_request(1, S.FINISHED_ABORTED)
    assert sched.is_finished(S.FINISHED_ERROR) and not sched.is_finished(S.PREEMPTED)
    check_pool_whole(s)


# ---- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(num_kv_blocks=0), "num_kv_blocks=0 must be >= 1"),
        (dict(block_size=0), "block_size=0"),
        (dict(max_num_seqs=-1), "max_num_seqs=-1"),
        (dict(max_num_batched_tokens=0), "max_num_batched_tokens=0 must be >= 1"),
        (dict(max_model_len=1), "max_model_len=1"),
        (dict(num_kv_blocks=4, block_size=4, max_model_len=17),
         "num_kv_blocks=4 \\* block_size=4 = 16 tokens cannot hold one request of max_model_len=17"),
    ],
)
def test_config_errors(kw, needle):
    with pytest.raises(ValueError, match=needle):
        make(**kw)


@pytest.mark.parametrize(
    "args, kw, needle",
    [
        ((1, [1], sched.StopParams(1)), {}, "request_id=1 is already known"),
        ((-2, [1], sched.StopParams(1)), {}, "request_id=-2 must be >= 0"),
        ((2, [], sched.StopParams(1)), {}, "prompt_token_ids of request_id=2 is empty"),
        ((2, list(range(16)), sched.StopParams(1)), {}, "prompt length=16 of request_id=2 must be < max_model_len=16"),
        ((2, [1, -5], sched.StopParams(1)), {}, "prompt_token_ids\\[1\\]=-5"),
        ((2, [1], sched.StopParams(0)), {}, "max_tokens=0 must be >= 1"),
        ((2, [1], sched.StopParams(2, min_tokens=3)), {}, "min_tokens=3 must be in \\[0, max_tokens=2\\]"),
        ((2, [1], sched.StopParams(2)), dict(share_prompt_with=2), "share_prompt_with=2"),
    ],
)
def test_add_request_errors(args, kw, needle):
    s = make(num_kv_blocks=4, max_model_len=16)
    s.add_request(1, [1], sched.StopParams(1))
    with pytest.raises(ValueError, match=needle):
        s.add_request(*args, **kw)
    assert s.num_waiting == 1


def test_update_errors():
    s = make()
    s.add_request(1, [1, 2], sched.StopParams(2))
    out = s.schedule()
    with pytest.raises(ValueError, match="sampled_token_ids.size\\(\\)=2 must equal num_seqs=1"):
        s.update(out, [1, 2])
    with pytest.raises(ValueError, match="sampled_token_ids\\[0\\]=-1 for request_id=1"):
        s.update(out, [-1])
    with pytest.raises(ValueError, match="sampled_token_ids.ndim=2"):
        s.update(out, [[1]])
    again = s.schedule()  # discards `out`; nothing advanced
    assert again.num_computed_tokens.tolist() == [0] and again.step == out.step + 1
    with pytest.raises(RuntimeError, match="is not the pending step"):
        s.update(out, [5])
    again.input_ids[:] = 0  # the arrays are the caller's to modify; update() keeps its own plan
    s.update(again, np.array([5], np.int64))
    with pytest.raises(RuntimeError, match="is not the pending step"):
        s.update(again, [5])
    with pytest.raises(IndexError, match="request_id=3"):
        s.request(3)
    drain(s)


def test_output_views_outlive_steps():
    s = make()
    s.add_request(1, [1, 2, 3], sched.StopParams(1))
    ids = s.schedule().input_ids  # the SchedulerOutput lives on through the view
    s.schedule()
    assert ids.tolist() == [1, 2, 3]
    empty = make().schedule()
    assert empty.num_seqs == 0 and empty.block_tables.shape == (0, 0) and empty.cu_seqlens_q.tolist() == [0]


def test_concurrent_abort_while_stepping():
    s = make(num_kv_blocks=64, max_num_batched_tokens=32, max_model_len=256)
    for rid in range(64):
        s.add_request(rid, [rid % 5] * 20, sched.StopParams(50))
    stop = threading.Event()

    def aborter():
        for rid in range(0, 64, 2):
            s.abort_request(rid)
        stop.set()

    t = threading.Thread(target=aborter)
    t.start()
    while s.has_unfinished_requests():  # no check_batch: requests may be aborted mid-step
        out = s.schedule()
        s.update(out, np.where(out.needs_sample, 7, -1))
        check_pool(s)
    t.join()
    assert stop.is_set()
    check_pool_whole(s)


# ---- randomized simulation -----------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(12))
def test_random_simulation(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    max_model_len = rng.randint(8, 40)
    s = make(
        num_kv_blocks=-(-max_model_len // block_size) + rng.randint(0, 12),
        block_size=block_size,
        max_num_batched_tokens=rng.randint(1, 48),
        max_model_len=max_model_len,
        max_num_seqs=rng.randint(1, 8),
        enable_prefix_caching=rng.random() < 0.7,
        policy=rng.choice([sched.Policy.FCFS, sched.Policy.PRIORITY]),
    )
    live = {}  # request id -> the output tokens we sampled for it
    prompts = []
    next_id = 0
    for it in range(400):
        if it < 300 and rng.random() < 0.35:
            if prompts and rng.random() < 0.4:  # share a prefix with an earlier prompt
                base = rng.choice(prompts)
                prompt = base[: rng.randint(1, len(base))] + [rng.randint(0, 3) for _ in range(rng.randint(0, 4))]
            else:
                prompt = [rng.randint(0, 3) for _ in range(rng.randint(1, 20))]
            prompt = prompt[: max_model_len - 1]
            prompts.append(prompt)
            max_tokens = rng.randint(1, 16)
            stop = sched.StopParams(max_tokens, min_tokens=rng.randint(0, max_tokens), eos_token_ids=[3])
            share = rng.choice(list(live)) if live and rng.random() < 0.2 else -1
            s.add_request(next_id, prompt, stop, priority=rng.randint(-2, 2), share_prompt_with=share)
            live[next_id] = []
            next_id += 1
        if live and rng.random() < 0.08:
            rid = rng.choice(list(live))
            assert s.abort_request(rid)
            del live[rid]
        out = s.schedule()
        check_batch(s, out)
        sampled = np.array([rng.randint(0, 40) if need else -1 for need in out.needs_sample], np.int32)
        for rid, tok in zip(out.request_ids.tolist(), sampled.tolist()):
            if tok >= 0:
                live[rid].append(tok)
        finished = s.update(out, sampled)
        for f in finished:
            assert live[f.request_id] == s.request(f.request_id).output_token_ids
            assert f.num_output_tokens == len(live.pop(f.request_id))
        # No request lost or duplicated; every live request's outputs are exactly what we sampled.
        running, waiting = s.running_ids, s.waiting_ids
        assert len(running) + len(waiting) == len(set(running) | set(waiting)) == len(live)
        assert set(running) | set(waiting) == set(live)
        for rid in running:
            assert s.request(rid).output_token_ids == live[rid]
        st = s.stats()
        assert st["kv_blocks_free"] + st["kv_blocks_used"] == st["kv_blocks_total"]
        assert st["num_requests_running"] == len(running) and st["num_requests_waiting"] == len(waiting)
    drain(s)
    assert s.stats()["kv_blocks_free"] == s.stats()["kv_blocks_total"]


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_prompts_sharing_a_first_block_wait_one_step_for_the_cache(enable_prefix_caching):
    """A burst of prompts with one shared prefix: the first computes it, the others are admitted
    the next step and take it from the cache (only with prefix caching); unrelated prompts in the
    same burst are not held back."""
    s = make(block_size=4, enable_prefix_caching=enable_prefix_caching)
    shared = [7, 8, 9, 10, 11, 12, 13, 14]  # two full blocks
    s.add_request(1, shared + [1, 2], sched.StopParams(2))
    s.add_request(2, shared + [3], sched.StopParams(2))
    s.add_request(3, [20, 21, 22, 23, 24], sched.StopParams(2))  # another first block
    s.add_request(4, [7, 8, 9], sched.StopParams(2))  # shorter than a block: nothing to share
    out = s.schedule()
    expected_first = [1, 3, 4] if enable_prefix_caching else [1, 2, 3, 4]
    assert out.request_ids.tolist() == expected_first
    check_batch(s, out)
    s.update(out, np.full(out.num_seqs, 5, np.int32))
    out = s.schedule()
    check_batch(s, out)
    if enable_prefix_caching:
        row = out.request_ids.tolist().index(2)
        assert out.num_computed_tokens[row] == 8  # both shared blocks from the cache
        assert s.request(2).num_cached_prompt_tokens == 8
    while s.has_unfinished_requests():
        s.update(out, np.full(out.num_seqs, 5, np.int32))
        out = s.schedule()
    check_pool_whole(s)
