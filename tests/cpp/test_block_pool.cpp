// SPDX-License-Identifier: Apache-2.0
// Tests of BlockPool alone: free-list LRU order, reference counting, eviction counting, verified
// hash lookups (collisions forced with hash_bits=1), epochs, reset, and argument errors.
#include <stdexcept>
#include <vector>

#include "check.h"
#include "tidal/kv/block_pool.h"
#include "tidal/status.h"

using tidal::kv::BlockPool;
using tidal::kv::kNoBlock;
using tidal::kv::kRootHash;
using Ids = std::vector<int32_t>;

namespace {

void check_accounting(const BlockPool& pool) {
  CHECK(pool.num_blocks_free() + pool.num_blocks_used() == pool.num_blocks_total());
  Ids free_ids = pool.free_block_ids();
  CHECK(static_cast<int32_t>(free_ids.size()) == pool.num_blocks_free());
  for (int32_t id : free_ids) CHECK(pool.block(id).ref_count == 0);
}

void test_lru_order() {
  BlockPool pool(4, 2, false);
  CHECK((pool.free_block_ids() == Ids{0, 1, 2, 3}));
  Ids got;
  CHECK(pool.allocate(3, got));
  CHECK((got == Ids{0, 1, 2}));
  CHECK((pool.free_block_ids() == Ids{3}));
  pool.release(1);
  pool.release(0);
  CHECK((pool.free_block_ids() == Ids{3, 1, 0}));  // freed blocks join the tail
  pool.add_ref(1);                                 // a hit on a free block: out of the middle
  CHECK((pool.free_block_ids() == Ids{3, 0}));
  CHECK(pool.block(1).ref_count == 1);
  pool.add_ref(1);
  pool.release(1);
  CHECK(pool.block(1).ref_count == 1);
  CHECK((pool.free_block_ids() == Ids{3, 0}));
  check_accounting(pool);

  Ids before = pool.free_block_ids();
  Ids out{42};
  CHECK(!pool.allocate(3, out));  // only 2 free: nothing changes
  CHECK((out == Ids{42}));
  CHECK(pool.free_block_ids() == before);
  CHECK(pool.allocate(0, out));
  CHECK(pool.allocate(2, out));
  CHECK((out == Ids{42, 3, 0}));
  CHECK(pool.num_blocks_free() == 0);
  check_accounting(pool);
  CHECK_THROWS(tidal::Error, "released while free", {
    pool.release(0);
    pool.release(0);
  });
}

void test_cache_and_evict() {
  BlockPool pool(3, 2, true);
  Ids got;
  CHECK(pool.allocate(2, got));
  const Ids a{1, 2}, b{3, 4};
  uint64_t ha = pool.hash_block(kRootHash, a, 0);
  uint64_t hb = pool.hash_block(ha, b, 0);
  CHECK(ha != hb);
  CHECK(ha == pool.hash_block(kRootHash, a, 0));
  CHECK(ha != pool.hash_block(kRootHash, a, 7));          // the extra key enters the hash
  CHECK(ha != pool.hash_block(kRootHash, Ids{2, 1}, 0));  // order matters
  pool.cache_block(0, ha, a, 0, kNoBlock);
  pool.cache_block(1, hb, b, 0, 0);
  CHECK(pool.num_blocks_cached() == 2);
  CHECK(pool.block(0).epoch == 1);
  CHECK((Ids(pool.cached_tokens(1).begin(), pool.cached_tokens(1).end()) == b));
  CHECK(pool.cached_tokens(2).empty());

  Ids hits;
  const Ids root{kNoBlock};
  pool.find_cached(ha, a, 0, root, hits);
  CHECK((hits == Ids{0}));
  hits.clear();
  pool.find_cached(hb, b, 0, Ids{0}, hits);
  CHECK((hits == Ids{1}));
  hits.clear();
  pool.find_cached(hb, b, 0, root, hits);  // right content, wrong parent
  pool.find_cached(ha, a, 9, root, hits);  // wrong extra key
  CHECK(hits.empty());

  // Tail-first release: block 1 (the tail of the sequence) is evicted before block 0.
  pool.release(1);
  pool.release(0);
  CHECK((pool.free_block_ids() == Ids{2, 1, 0}));
  CHECK(pool.num_blocks_cached() == 2);  // free blocks keep their hash
  CHECK(pool.is_current(0, 1));
  Ids more;
  CHECK(pool.allocate(2, more));
  CHECK((more == Ids{2, 1}));
  CHECK(pool.num_evictions() == 1);
  CHECK(!pool.block(1).is_cached);
  CHECK(!pool.is_current(1, 1));
  CHECK(pool.num_blocks_cached() == 1);
  hits.clear();
  pool.find_cached(hb, b, 0, Ids{0}, hits);
  CHECK(hits.empty());

  // Re-caching bumps the epoch, so a child registered under the old parent epoch is stale.
  pool.cache_block(1, hb, b, 0, 0);
  Ids evict0;
  pool.release(1);
  CHECK(pool.allocate(1, evict0));  // pops 0 (head), dropping its hash
  CHECK((evict0 == Ids{0}));
  CHECK(pool.num_evictions() == 2);
  pool.cache_block(0, ha, a, 0, kNoBlock);
  CHECK(pool.block(0).epoch == 2);
  hits.clear();
  pool.find_cached(hb, b, 0, Ids{0}, hits);  // block 1's parent epoch was 1
  CHECK(hits.empty());
  check_accounting(pool);

  // reset_prefix_cache drops free hashes only.
  CHECK(!pool.reset_prefix_cache());  // block 0 is used and cached; block 1 free and cached
  CHECK(!pool.block(1).is_cached);
  CHECK(pool.block(0).is_cached);
  pool.release(0);
  CHECK(pool.reset_prefix_cache());
  CHECK(pool.num_blocks_cached() == 0);
  check_accounting(pool);
}

void test_collisions() {
  BlockPool pool(4, 1, true, /*hash_bits=*/1);  // 2 hash values: collisions everywhere
  Ids got;
  CHECK(pool.allocate(4, got));
  for (int32_t i = 0; i < 4; ++i) {
    const Ids tokens{i};
    pool.cache_block(i, pool.hash_block(kRootHash, tokens, 0), tokens, 0, kNoBlock);
  }
  for (int32_t i = 0; i < 4; ++i) {
    const Ids tokens{i};
    Ids hits;
    pool.find_cached(pool.hash_block(kRootHash, tokens, 0), tokens, 0, Ids{kNoBlock}, hits);
    CHECK((hits == Ids{i}));
    CHECK(pool.block(i).hash <= 1);
  }
  Ids hits;
  const Ids unseen{9};
  pool.find_cached(pool.hash_block(kRootHash, unseen, 0), unseen, 0, Ids{kNoBlock}, hits);
  CHECK(hits.empty());
}

void test_errors() {
  CHECK_THROWS(std::invalid_argument, "num_blocks=0", BlockPool(0, 16, true));
  CHECK_THROWS(std::invalid_argument, "block_size=-3", BlockPool(4, -3, true));
  CHECK_THROWS(std::invalid_argument, "hash_bits=65", BlockPool(4, 16, true, 65));
  CHECK_THROWS(std::invalid_argument, "hash_bits=0", BlockPool(4, 16, true, 0));
  BlockPool pool(2, 2, true);
  Ids out;
  CHECK_THROWS(std::out_of_range, "block_id=2", pool.block(2));
  CHECK_THROWS(std::out_of_range, "block_id=-1", pool.add_ref(-1));
  CHECK_THROWS(std::invalid_argument, "num_blocks=-1", pool.allocate(-1, out));
  CHECK_THROWS(std::invalid_argument, "token_ids.size()=3", pool.hash_block(kRootHash, Ids{1, 2, 3}, 0));
  CHECK_THROWS(tidal::Error, "must be used", pool.cache_block(0, 0, Ids{1, 2}, 0, kNoBlock));
  BlockPool off(2, 2, false);
  CHECK(off.allocate(1, out));
  CHECK_THROWS(tidal::Error, "disabled", off.cache_block(0, 0, Ids{1, 2}, 0, kNoBlock));
}

}  // namespace

int main() {
  test_lru_order();
  test_cache_and_evict();
  test_collisions();
  test_errors();
  return tidal::test::check_failures();
}
