# SPDX-License-Identifier: Apache-2.0
"""Stateful property test of tidal._core.kv.KVCacheManager against a plain Python model.

Random programs of admit (with or without a prefix lookup, sometimes with another allocation in
between that may make the lookup stale), append, free, fill-the-pool and reset steps run for
block_size in {1, 4, 16} and hash_bits in {64, 3} (3 bits: 8 hash values, collisions everywhere).
The model keeps each request's tokens and block table and, for every cached block, the full token
prefix (and extra key) it was computed for, so a prefix hit is checked against the real content,
and its length against the longest prefix the model knows to be cached. TIDAL_KV_EXAMPLES raises
the example count for a long local run.
"""
import os
import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from tidal._core import kv

VOCAB = 3  # few distinct tokens: prompts share prefixes by chance as well as on purpose
SETTINGS = settings(
    max_examples=int(os.environ.get("TIDAL_KV_EXAMPLES", "200")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class Request:
    def __init__(self, tokens, key, explicit_keys):
        self.tokens = tokens
        self.key = key  # the extra key of every block (an "image hash"); 0 = none
        self.explicit_keys = explicit_keys  # pass [0] * n instead of [] when key == 0
        self.table = []

    def keys(self, num_tokens, block_size):
        n = num_tokens // block_size
        return [self.key] * n if self.key or self.explicit_keys else []


class KVMachine(RuleBasedStateMachine):
    block_size = 4
    hash_bits = 64
    num_blocks = 12

    def __init__(self):
        super().__init__()
        self.m = kv.KVCacheManager(self.num_blocks, self.block_size, True, self.hash_bits)
        self.requests = {}  # request id -> Request
        self.history = []  # (tokens, key) of every admitted request, running or freed
        self.content = {}  # cached block id -> (token prefix up to and including the block, key)
        self.next_id = 0
        self.queries = self.query_tokens = self.hit_tokens = self.evictions = 0

    # ---- helpers --------------------------------------------------------------------------------
    def new_id(self):
        self.next_id += 1
        return self.next_id if self.next_id % 3 else (1 << 40) + self.next_id  # int64 ids

    def make_tokens(self, src, share, suffix, key, same_key):
        if self.history and share:
            tokens, src_key = self.history[src % len(self.history)]
            return tokens[:share] + suffix, (src_key if same_key else key)
        return list(suffix), key

    def ref_counts(self):
        counts = [0] * self.num_blocks
        for req in self.requests.values():
            for b in req.table:
                counts[b] += 1
        return counts

    def snapshot(self):
        m = self.m
        s = m.stats
        return (
            m.free_block_ids(),
            [m.ref_count(b) for b in range(self.num_blocks)],
            [m.cached_tokens(b) for b in range(self.num_blocks)],
            {rid: m.block_table(rid) for rid in self.requests},
            (s.prefix_cache_queries, s.prefix_cache_query_tokens, s.prefix_cache_hit_tokens, s.evictions),
        )

    def expected_hit_blocks(self, tokens, key):
        bs, j = self.block_size, 0
        cached = set(self.content.values())
        while (j + 1) * bs <= len(tokens) and (tuple(tokens[: (j + 1) * bs]), key) in cached:
            j += 1
        return j

    def lookup(self, req, num_tokens):
        tokens = req.tokens[:num_tokens]
        hit = self.m.lookup(tokens, req.keys(num_tokens, self.block_size))
        self.queries += 1
        self.query_tokens += len(tokens)
        self.hit_tokens += hit.num_tokens
        bs = self.block_size
        assert hit.num_tokens == len(hit.block_ids) * bs == len(hit.epochs) * bs
        assert len(hit.block_ids) == self.expected_hit_blocks(tokens, req.key)
        for i, b in enumerate(hit.block_ids):
            assert self.content[b] == (tuple(tokens[: (i + 1) * bs]), req.key), "hit on foreign content"
            assert self.m.cached_tokens(b) == tokens[i * bs : (i + 1) * bs]
        return hit

    def allocate(self, rid, req, num_tokens, computed=None):
        """m.allocate checked against the model; returns whether it succeeded."""
        bs = self.block_size
        free_before = self.m.free_block_ids()
        before = self.snapshot()
        head = list(computed.block_ids) if computed is not None else []
        table_before = self.m.block_table(rid) if self.m.has_request(rid) else head
        needed = max(0, -(-num_tokens // bs) - len(table_before))
        taken = set(head)
        available = [b for b in free_before if b not in taken]
        assert self.m.can_allocate(needed) == (needed <= len(free_before))
        ok = self.m.allocate(rid, num_tokens, computed)
        assert ok == (needed <= len(available))
        if not ok:
            assert self.snapshot() == before, "failed allocate changed state"
            return False
        table = self.m.block_table(rid)
        assert table[: len(table_before)] == table_before, "block table is not append-only"
        assert table[len(table_before) :] == available[:needed], "new blocks not taken in LRU order"
        for b in available[:needed]:
            if b in self.content:
                del self.content[b]
                self.evictions += 1
        req.table = table
        return True

    def cache(self, rid, num_tokens):
        req, bs = self.requests[rid], self.block_size
        self.m.cache_full_blocks(rid, req.tokens, num_tokens, req.keys(num_tokens, bs))
        for i in range(num_tokens // bs):
            entry = (tuple(req.tokens[: (i + 1) * bs]), req.key)
            assert self.content.setdefault(req.table[i], entry) == entry

    def admit(self, tokens, key, explicit_keys, use_lookup, interleave=None):
        rid, req = self.new_id(), Request(tokens, key, explicit_keys)
        hit = self.lookup(req, len(tokens) - 1) if use_lookup else None
        if hit is not None and interleave:
            # Another allocation between lookup and allocate may evict (and so invalidate) the hit.
            other = Request([random.Random(interleave).randrange(VOCAB) for _ in range(interleave)], 0, False)
            other_id = self.new_id()
            if self.allocate(other_id, other, interleave):
                self.requests[other_id] = other
                self.history.append((other.tokens, 0))
                if not all(b in self.content for b in hit.block_ids):
                    before = self.snapshot()
                    with pytest.raises(RuntimeError, match="evicted or re-cached"):
                        self.m.allocate(rid, len(tokens), hit)
                    assert self.snapshot() == before and not self.m.has_request(rid)
                    return None
        if self.allocate(rid, req, len(tokens), hit):
            self.requests[rid] = req
            self.history.append((tokens, key))
            self.cache(rid, len(tokens))
            return rid
        return None

    def pick(self, index):
        return sorted(self.requests)[index % len(self.requests)]

    # ---- rules ------------------------------------------------------------------------------------
    tokens_st = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40)

    @rule(src=st.integers(0, 1 << 16), share=st.integers(0, 48), suffix=tokens_st,
          key=st.sampled_from([0, 0, 1]), same_key=st.booleans(), explicit_keys=st.booleans(),
          use_lookup=st.booleans(), interleave=st.sampled_from([0, 0, 0, 1, 5, 17]))
    def new_request(self, src, share, suffix, key, same_key, explicit_keys, use_lookup, interleave):
        bs = self.block_size
        tokens, key = self.make_tokens(src, share % (4 * bs + 1), suffix[: 3 * bs + 1], key, same_key)
        self.admit(tokens, key, explicit_keys, use_lookup, interleave)

    @precondition(lambda self: self.requests)
    @rule(index=st.integers(0, 1 << 16), new=st.lists(st.integers(0, VOCAB - 1), max_size=20),
          num_cached=st.integers(0, 20))
    def append_tokens(self, index, new, num_cached):
        rid = self.pick(index)
        req = self.requests[rid]
        num_old, new = len(req.tokens), new[: 2 * self.block_size + 1]
        if self.allocate(rid, req, num_old + len(new)):
            req.tokens = req.tokens + new
            self.cache(rid, num_old + min(num_cached, len(new)))

    @precondition(lambda self: self.requests)
    @rule(index=st.integers(0, 1 << 16))
    def free_request(self, index):
        self.free(self.pick(index))

    def free(self, rid):
        table = self.requests.pop(rid).table
        still_held = set(b for req in self.requests.values() for b in req.table)
        free_before = self.m.free_block_ids()
        self.m.free(rid)
        released = [b for b in reversed(table) if b not in still_held]  # tail first
        assert self.m.free_block_ids() == free_before + released
        assert not self.m.has_request(rid)

    @rule(seed=st.integers(0, 1 << 16), keep=st.booleans())
    def fill_pool(self, seed, keep):
        """Takes every free block, evicting every free cached block."""
        n = self.m.num_blocks_free * self.block_size
        if n == 0:
            return
        rng = random.Random(seed)
        rid = self.admit([rng.randrange(VOCAB) for _ in range(n)], 0, False, use_lookup=False)
        assert rid is not None and self.m.num_blocks_free == 0
        if not keep:
            self.free(rid)

    @precondition(lambda self: self.history)
    @rule(src=st.integers(0, 1 << 16), over=st.booleans())
    def readmit_at_capacity(self, src, over):
        """Re-admits an earlier prompt with a lookup, asking for exactly as many blocks as the pool
        can give (over=False) or one more: the free blocks of the hit do not count as available."""
        bs = self.block_size
        tokens, key = self.history[src % len(self.history)]
        hit = self.lookup(Request(tokens, key, False), len(tokens) - 1)
        free = set(self.m.free_block_ids())
        num_free_hit = sum(b in free for b in hit.block_ids)
        num_tokens = (len(hit.block_ids) + len(free) - num_free_hit + over) * bs
        if num_tokens == 0:
            return
        rid = self.new_id()
        req = Request((tokens + [0] * num_tokens)[:num_tokens], key, False)
        if self.allocate(rid, req, num_tokens, hit):
            self.requests[rid] = req
            self.history.append((req.tokens, key))
            self.cache(rid, num_tokens)

    @rule(src=st.integers(0, 1 << 16), share=st.integers(0, 48), suffix=tokens_st,
          key=st.sampled_from([0, 1]), same_key=st.booleans())
    def lookup_only(self, src, share, suffix, key, same_key):
        tokens, key = self.make_tokens(src, share, suffix, key, same_key)
        self.lookup(Request(tokens, key, False), len(tokens))

    @rule()
    def reset_prefix_cache(self):
        counts = self.ref_counts()
        self.content = {b: c for b, c in self.content.items() if counts[b] > 0}
        assert self.m.reset_prefix_cache() == (not self.content)

    # ---- invariants -------------------------------------------------------------------------------
    @invariant()
    def consistent(self):
        m = self.m
        assert m.num_blocks_free + m.num_blocks_used == m.num_blocks_total == self.num_blocks
        free_ids = m.free_block_ids()
        assert len(free_ids) == len(set(free_ids)) == m.num_blocks_free, "free list duplicates"
        counts = self.ref_counts()
        assert not any(counts[b] for b in free_ids), "a free block is in a block table"
        for b in range(self.num_blocks):
            assert m.ref_count(b) == counts[b]
            assert m.is_cached(b) == (b in self.content)
            if b in self.content:
                prefix = self.content[b][0]
                assert m.cached_tokens(b) == list(prefix[-self.block_size :])
        assert m.num_blocks_cached == len(self.content)
        for rid, req in self.requests.items():
            assert m.block_table(rid) == req.table
            assert len(req.table) * self.block_size >= len(req.tokens)
        s = m.stats
        assert (s.prefix_cache_queries, s.prefix_cache_query_tokens) == (self.queries, self.query_tokens)
        assert (s.prefix_cache_hit_tokens, s.evictions) == (self.hit_tokens, self.evictions)
        assert s.prefix_cache_hit_tokens <= s.prefix_cache_query_tokens


NUM_BLOCKS = {1: 16, 4: 12, 16: 8}


@pytest.mark.parametrize("hash_bits", [64, 3])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_kv_cache_manager_stateful(block_size, hash_bits):
    machine = type(
        f"KVMachine_bs{block_size}_h{hash_bits}",
        (KVMachine,),
        {"block_size": block_size, "hash_bits": hash_bits, "num_blocks": NUM_BLOCKS[block_size]},
    )
    run_state_machine_as_test(machine, settings=SETTINGS)
