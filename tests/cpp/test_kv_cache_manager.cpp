// SPDX-License-Identifier: Apache-2.0
// Tests of KVCacheManager: accounting after every scenario, prefix hits and misses, tail-first
// freeing, eviction of stale parents, verified hits under forced collisions, allocate-false leaving
// the state unchanged, and the type and message of every argument error.
#include <numeric>
#include <stdexcept>
#include <vector>

#include "check.h"
#include "tidal/kv/kv_cache_manager.h"
#include "tidal/status.h"

using tidal::kv::ComputedBlocks;
using tidal::kv::KVCacheManager;
using Ids = std::vector<int32_t>;

namespace {

Ids iota(int32_t n, int32_t start) {
  Ids v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), start);
  return v;
}

void check_accounting(const KVCacheManager& m) {
  CHECK(m.num_blocks_free() + m.num_blocks_used() == m.num_blocks_total());
  Ids free_ids = m.free_block_ids();
  CHECK(static_cast<int32_t>(free_ids.size()) == m.num_blocks_free());
  for (int32_t id : free_ids) CHECK(m.ref_count(id) == 0);
}

// Runs a request through lookup -> allocate -> cache_full_blocks, as the scheduler will.
ComputedBlocks admit(KVCacheManager& m, int64_t rid, const Ids& tokens) {
  ComputedBlocks hit = m.lookup(std::span(tokens).first(tokens.size() - 1));
  CHECK(m.allocate(rid, static_cast<int32_t>(tokens.size()), &hit));
  m.cache_full_blocks(rid, tokens, static_cast<int32_t>(tokens.size()));
  return hit;
}

void test_prefix_hit_and_tail_first_free() {
  KVCacheManager m(8, 4, true);
  const Ids a = iota(10, 100);  // 2 full blocks + 2 tokens
  ComputedBlocks miss = admit(m, 1, a);
  CHECK(miss.num_tokens == 0 && miss.block_ids.empty());
  CHECK((m.block_table(1) == Ids{0, 1, 2}));
  CHECK(m.num_blocks_cached() == 2);
  CHECK(m.is_cached(0) && m.is_cached(1) && !m.is_cached(2));
  CHECK((m.cached_tokens(1) == Ids{104, 105, 106, 107}));

  Ids b = iota(8, 100);  // shares both full blocks
  b.push_back(7);
  ComputedBlocks hit = admit(m, 2, b);
  CHECK(hit.num_tokens == 8);
  CHECK((hit.block_ids == Ids{0, 1}));
  CHECK((m.block_table(2) == Ids{0, 1, 3}));
  CHECK(m.ref_count(0) == 2 && m.ref_count(1) == 2);
  check_accounting(m);

  m.free(1);
  CHECK((m.free_block_ids() == Ids{4, 5, 6, 7, 2}));
  m.free(2);
  // Tail first: 3 (uncached partial), then 1, then 0, so the shared head is evicted last.
  CHECK((m.free_block_ids() == Ids{4, 5, 6, 7, 2, 3, 1, 0}));
  CHECK(m.num_blocks_cached() == 2);  // kept after free
  CHECK(!m.has_request(1));

  // A hit on free blocks takes them out of the list; a new allocation cannot evict them.
  ComputedBlocks again = m.lookup(std::span(a).first(9));
  CHECK((again.block_ids == Ids{0, 1}));
  CHECK(m.allocate(3, 8 * 4, &again));  // 8 blocks: 2 cached + 6 new = all 8
  CHECK((m.block_table(3) == Ids{0, 1, 4, 5, 6, 7, 2, 3}));
  CHECK(m.num_blocks_free() == 0);
  CHECK(m.stats().evictions == 0);
  m.free(3);
  check_accounting(m);

  tidal::kv::KVCacheStats s = m.stats();
  CHECK(s.prefix_cache_queries == 3);
  CHECK(s.prefix_cache_query_tokens == 9 + 8 + 9);
  CHECK(s.prefix_cache_hit_tokens == 0 + 8 + 8);
}

void test_miss_extra_keys_and_disabled() {
  KVCacheManager m(4, 2, true);
  const Ids t{1, 2, 3, 4, 5};
  const std::vector<uint64_t> img{11, 11};
  CHECK(m.allocate(1, 5));
  m.cache_full_blocks(1, t, 5, img);
  CHECK(m.lookup(t).num_tokens == 0);                   // different extra key: miss
  CHECK(m.lookup(t, img).num_tokens == 4);
  CHECK(m.lookup(Ids{1, 2, 9, 9}, img).num_tokens == 2);  // diverges in block 1
  CHECK(m.lookup(Ids{9, 2, 3, 4}, img).num_tokens == 0);
  CHECK(m.lookup(Ids{1}).num_tokens == 0);               // no full block
  m.free(1);
  check_accounting(m);

  KVCacheManager off(4, 2, false);
  CHECK(off.allocate(1, 5));
  off.cache_full_blocks(1, t, 5);
  CHECK(off.num_blocks_cached() == 0);
  CHECK(off.lookup(t).num_tokens == 0);
  CHECK(off.stats().prefix_cache_queries == 1);
  off.free(1);
  check_accounting(off);
}

void test_eviction_and_stale_parent() {
  KVCacheManager m(4, 2, true);
  const Ids a{1, 2, 3, 4};
  admit(m, 1, a);  // blocks 0, 1 cached
  m.free(1);       // free list: 2 3 1 0
  ComputedBlocks hit = m.lookup(Ids{1, 2, 3, 4, 5});
  CHECK(hit.num_tokens == 4);
  // Pop 2 3 1: block 1 (a's tail) is evicted, block 0 (its head) survives.
  CHECK(m.allocate(2, 6));
  CHECK((m.block_table(2) == Ids{2, 3, 1}));
  CHECK(m.stats().evictions == 1);
  CHECK(!m.is_cached(1) && m.is_cached(0));
  CHECK(m.lookup(a).num_tokens == 2);
  CHECK_THROWS(tidal::Error, "evicted or re-cached", m.allocate(3, 4, &hit));
  CHECK(!m.has_request(3));

  // Block 0 is evicted and re-cached with other content: a's head no longer matches.
  CHECK(m.allocate(3, 2));  // pops 0
  CHECK((m.block_table(3) == Ids{0}));
  CHECK(m.stats().evictions == 2);
  m.cache_full_blocks(3, Ids{7, 8}, 2);
  CHECK(m.lookup(a).num_tokens == 0);
  CHECK(m.lookup(Ids{7, 8, 3, 4}).num_tokens == 2);
  m.free(2);
  m.free(3);
  check_accounting(m);
}

void test_collisions_never_cross() {
  for (int hash_bits : {1, 2, 4}) {
    KVCacheManager m(16, 2, true, hash_bits);
    const Ids p{1, 2, 3, 4, 5, 6};
    const Ids q{1, 2, 9, 9, 5, 6};  // shares block 0 only
    CHECK(m.allocate(1, 6));
    m.cache_full_blocks(1, p, 6);
    CHECK(m.allocate(2, 6));
    m.cache_full_blocks(2, q, 6);
    for (int32_t n = 2; n <= 6; n += 2) {
      CHECK(m.lookup(std::span(p).first(n)).num_tokens == n);
      CHECK(m.lookup(std::span(q).first(n)).num_tokens == n);
    }
    ComputedBlocks hq = m.lookup(q);
    // q's own copy of block 0 (block 3) was cached too, and q's chain continues from it.
    CHECK((hq.block_ids == Ids{3, 4, 5}));
    CHECK(m.lookup(Ids{1, 2, 3, 4, 9, 9}).num_tokens == 4);
    CHECK(m.lookup(Ids{3, 4, 5, 6}).num_tokens == 0);  // same blocks at another position
    for (int32_t t = 0; t < 50; ++t) {
      CHECK(m.lookup(Ids{t, t + 1}).num_tokens == ((t == 1) ? 2 : 0));
    }
    m.free(1);
    m.free(2);
    check_accounting(m);
  }
}

void test_allocate_false_changes_nothing() {
  KVCacheManager m(4, 2, true);
  const Ids a{1, 2, 3, 4};
  admit(m, 1, a);
  m.free(1);  // free list: 2 3 1 0, blocks 0 1 cached
  CHECK(m.allocate(2, 2));
  ComputedBlocks hit = m.lookup(a);
  CHECK(hit.num_tokens == 4);
  const Ids free_before = m.free_block_ids();
  const tidal::kv::KVCacheStats s_before = m.stats();
  // 3 blocks free, 2 of them the computed ones, so 1 is left for new blocks and 8 tokens need 2.
  CHECK(m.can_allocate(3));
  CHECK(!m.allocate(3, 8, &hit));
  CHECK(!m.has_request(3));
  CHECK(m.free_block_ids() == free_before);
  CHECK(m.stats().evictions == s_before.evictions);
  CHECK(m.ref_count(0) == 0 && m.is_cached(0) && m.is_cached(1));
  CHECK(!m.allocate(2, 10));  // existing request: 1 block -> 5 blocks
  CHECK((m.block_table(2) == Ids{2}));
  CHECK(m.allocate(3, 6, &hit));
  CHECK((m.block_table(3) == Ids{0, 1, 3}));
  CHECK(m.allocate(2, 1));  // never shrinks
  CHECK((m.block_table(2) == Ids{2}));
  CHECK(!m.can_allocate(1));
  CHECK(m.can_allocate(0));
  m.free(2);
  m.free(3);
  check_accounting(m);
}

void test_reset_prefix_cache() {
  KVCacheManager m(4, 1, true);
  admit(m, 1, Ids{1, 2});
  admit(m, 2, Ids{5, 6});
  m.free(1);
  CHECK(!m.reset_prefix_cache());  // request 2 still holds cached blocks
  CHECK(m.num_blocks_cached() == 2);
  CHECK(m.lookup(Ids{1, 2}).num_tokens == 0);
  CHECK(m.lookup(Ids{5, 6}).num_tokens == 2);
  m.free(2);
  CHECK(m.reset_prefix_cache());
  CHECK(m.num_blocks_cached() == 0);
  check_accounting(m);
}

void test_errors() {
  CHECK_THROWS(std::invalid_argument, "num_blocks=0", KVCacheManager(0, 16));
  CHECK_THROWS(std::invalid_argument, "block_size=0", KVCacheManager(4, 0));
  CHECK_THROWS(std::invalid_argument, "hash_bits=70", KVCacheManager(4, 16, true, 70));
  KVCacheManager m(4, 2, true);
  CHECK_THROWS(std::invalid_argument, "num_tokens=-1", m.allocate(1, -1));
  CHECK_THROWS(std::invalid_argument, "num_new_blocks=-2", m.can_allocate(-2));
  CHECK_THROWS(std::out_of_range, "request_id=77", m.free(77));
  CHECK_THROWS(std::out_of_range, "request_id=77", m.block_table(77));
  CHECK_THROWS(std::out_of_range, "request_id=77", m.cache_full_blocks(77, Ids{1, 2}, 2));
  CHECK_THROWS(std::out_of_range, "block_id=4", m.ref_count(4));
  CHECK_THROWS(std::out_of_range, "block_id=-1", m.is_cached(-1));
  CHECK_THROWS(std::out_of_range, "block_id=9", m.cached_tokens(9));
  const Ids t{1, 2, 3, 4};
  CHECK(m.allocate(1, 4));
  CHECK_THROWS(std::invalid_argument, "extra_keys.size()=1", m.lookup(t, std::vector<uint64_t>{3}));
  CHECK_THROWS(std::invalid_argument, "num_tokens=5", m.cache_full_blocks(1, t, 5));
  CHECK_THROWS(std::invalid_argument, "num_tokens=-1", m.cache_full_blocks(1, t, -1));
  m.cache_full_blocks(1, t, 4);
  ComputedBlocks hit = m.lookup(t);
  CHECK(hit.num_tokens == 4);
  CHECK_THROWS(std::invalid_argument, "request_id=1", m.allocate(1, 8, &hit));
  CHECK_THROWS(std::invalid_argument, "num_tokens=3", m.allocate(2, 3, &hit));
  ComputedBlocks bad = hit;
  bad.epochs.pop_back();
  CHECK_THROWS(std::invalid_argument, "computed.epochs.size()=1", m.allocate(2, 4, &bad));
  bad = hit;
  bad.block_ids[0] = 12;
  CHECK_THROWS(std::out_of_range, "block_id=12", m.allocate(2, 4, &bad));
  CHECK(!m.has_request(2));
  m.free(1);
  check_accounting(m);
  CHECK(m.num_blocks_free() == 4);
}

}  // namespace

int main() {
  test_prefix_hit_and_tail_first_free();
  test_miss_extra_keys_and_disabled();
  test_eviction_and_stale_parent();
  test_collisions_never_cross();
  test_allocate_false_changes_nothing();
  test_reset_prefix_cache();
  test_errors();
  return tidal::test::check_failures();
}
