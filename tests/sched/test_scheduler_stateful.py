# SPDX-License-Identifier: Apache-2.0
"""Stateful property test of tidal._core.sched.Scheduler against a plain Python ledger.

Random programs of add_request (prompts sharing prefixes, share_prompt_with siblings, priorities,
stop parameters), step (schedule, random sampled tokens, update), schedule-and-discard, abort and
finish_request (valid or not) run on small pools under both policies. After every rule: each step's
batch agrees with the requests, the pool is whole (free + used == total), no request is lost or
duplicated, every live request's outputs are exactly the tokens sampled for it, the stop
conditions match an independent Python model, and an invalid transition raises. At teardown the
remaining requests run to completion and every block is free. TIDAL_SCHED_EXAMPLES raises the
example count for a long local run.
"""
import os

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import pytest

from tidal._core import sched

from test_scheduler import check_batch, check_pool  # noqa: E402  (same directory)

S = sched.RequestStatus
FINISHED = [S.FINISHED_STOPPED, S.FINISHED_LENGTH, S.FINISHED_ABORTED, S.FINISHED_ERROR]
VALID = {
    S.WAITING: {S.RUNNING, S.FINISHED_ABORTED, S.FINISHED_ERROR},
    S.RUNNING: {S.PREEMPTED, *FINISHED},
    S.PREEMPTED: {S.WAITING, S.FINISHED_STOPPED, S.FINISHED_ABORTED, S.FINISHED_ERROR},
}
EOS = 3
SETTINGS = settings(
    max_examples=int(os.environ.get("TIDAL_SCHED_EXAMPLES", "100")),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class Ledger:
    def __init__(self, prompt, max_tokens, min_tokens, stop_ids, ignore_eos):
        self.prompt, self.outputs = prompt, []
        self.max_tokens, self.min_tokens = max_tokens, min_tokens
        self.stop_ids, self.ignore_eos = stop_ids, ignore_eos

    def expected_finish(self, max_model_len):
        """The status after the last appended token, by the stop rules written out again."""
        token, n = self.outputs[-1], len(self.outputs)
        if n >= self.min_tokens and (token in self.stop_ids or (token == EOS and not self.ignore_eos)):
            return S.FINISHED_STOPPED
        if n >= self.max_tokens or len(self.prompt) + n >= max_model_len:
            return S.FINISHED_LENGTH
        return None


class SchedulerMachine(RuleBasedStateMachine):
    policy = sched.Policy.FCFS
    prefix_caching = True

    def __init__(self):
        super().__init__()
        self.max_model_len = 24
        self.s = sched.Scheduler(sched.SchedulerConfig(
            num_kv_blocks=8, block_size=4, max_num_batched_tokens=12, max_model_len=self.max_model_len,
            max_num_seqs=4, enable_prefix_caching=self.prefix_caching, policy=self.policy))
        self.live = {}  # request id -> Ledger
        self.prompts = [[1, 2, 3, 1, 2, 3, 1, 2]]
        self.next_id = 0

    @rule(src=st.integers(0, 50), keep=st.integers(0, 23), suffix=st.lists(st.integers(0, 4), max_size=8),
          max_tokens=st.integers(1, 10), min_frac=st.floats(0, 1), stop_ids=st.lists(st.integers(0, 9), max_size=2),
          ignore_eos=st.booleans(), priority=st.integers(-2, 2), share=st.booleans())
    def add(self, src, keep, suffix, max_tokens, min_frac, stop_ids, ignore_eos, priority, share):
        prompt = (self.prompts[src % len(self.prompts)][:keep] + suffix)[: self.max_model_len - 1] or [0]
        self.prompts.append(prompt)
        min_tokens = int(min_frac * max_tokens)
        sibling = -1
        if share and self.live:
            sibling = sorted(self.live)[src % len(self.live)]
        stop = sched.StopParams(max_tokens, min_tokens=min_tokens, stop_token_ids=stop_ids,
                                eos_token_ids=[EOS], ignore_eos=ignore_eos)
        self.s.add_request(self.next_id, prompt, stop, priority=priority, share_prompt_with=sibling)
        self.live[self.next_id] = Ledger(prompt, max_tokens, min_tokens, stop_ids, ignore_eos)
        self.next_id += 1

    @rule(tokens=st.lists(st.integers(0, 9), min_size=4, max_size=4), discard_first=st.booleans())
    def step(self, tokens, discard_first):
        if discard_first:
            self.s.schedule()  # an engine that failed its step: the next schedule() redoes it
        out = self.s.schedule()
        check_batch(self.s, out)
        for rid in out.preempted_ids:
            assert self.s.request(rid).status == S.PREEMPTED
        sampled = np.full(out.num_seqs, -1, np.int32)
        expected = {}
        for i, (rid, need) in enumerate(zip(out.request_ids.tolist(), out.needs_sample.tolist())):
            if need:
                sampled[i] = tokens[i % 4] if i < 4 else EOS
                ledger = self.live[rid]
                ledger.outputs.append(int(sampled[i]))
                expected[rid] = ledger.expected_finish(self.max_model_len)
        finished = self.s.update(out, sampled)
        got = {f.request_id: f.status for f in finished}
        assert got == {rid: st_ for rid, st_ in expected.items() if st_ is not None}
        for f in finished:
            assert f.num_output_tokens == len(self.live.pop(f.request_id).outputs)

    @precondition(lambda self: self.live)
    @rule(pick=st.integers(0, 1000))
    def abort(self, pick):
        rid = sorted(self.live)[pick % len(self.live)]
        assert self.s.abort_request(rid)
        assert self.s.request(rid).status == S.FINISHED_ABORTED
        del self.live[rid]
        assert not self.s.abort_request(rid)

    @precondition(lambda self: self.live)
    @rule(pick=st.integers(0, 1000), status=st.sampled_from(FINISHED))
    def finish(self, pick, status):
        rid = sorted(self.live)[pick % len(self.live)]
        current = self.s.request(rid).status
        if status in VALID[current]:
            self.s.finish_request(rid, status)
            del self.live[rid]
        else:
            with pytest.raises(RuntimeError, match=f"request_id={rid}: invalid transition {current.name}"):
                self.s.finish_request(rid, status)

    @invariant()
    def ledger_matches(self):
        check_pool(self.s)
        running, waiting = self.s.running_ids, self.s.waiting_ids
        assert len(running) + len(waiting) == len(self.live)
        assert set(running) | set(waiting) == set(self.live)
        for rid, ledger in self.live.items():
            r = self.s.request(rid)
            assert r.output_token_ids == ledger.outputs and r.prompt_token_ids == ledger.prompt
            assert r.status == (S.RUNNING if rid in running else r.status)
            assert (rid in waiting) == (r.status in (S.WAITING, S.PREEMPTED))

    def teardown(self):
        for _ in range(2000):
            if not self.s.has_unfinished_requests():
                break
            out = self.s.schedule()
            self.s.update(out, np.where(out.needs_sample, 5, -1))
        assert not self.s.has_unfinished_requests()
        self.s.schedule()
        kv = self.s.kv_cache
        assert kv.num_blocks_free == kv.num_blocks_total


class PriorityMachine(SchedulerMachine):
    policy = sched.Policy.PRIORITY


class NoPrefixCacheMachine(SchedulerMachine):
    prefix_caching = False


@pytest.mark.parametrize("machine", [SchedulerMachine, PriorityMachine, NoPrefixCacheMachine])
def test_scheduler_stateful(machine):
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(machine, settings=SETTINGS)
