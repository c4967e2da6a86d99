// SPDX-License-Identifier: Apache-2.0
// KVCacheManager: prefix lookup (a walk down the verified block chain, following every verified
// duplicate), append-only block-table growth that takes cached blocks before popping new ones,
// incremental full-block hashing, and tail-first freeing.
#include "tidal/kv/kv_cache_manager.h"

#include <algorithm>

#include "tidal/status.h"

namespace tidal::kv {

KVCacheManager::KVCacheManager(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching,
                               int hash_bits)
    : pool_(num_blocks, block_size, enable_prefix_caching, hash_bits) {}

const KVCacheManager::RequestState& KVCacheManager::request(int64_t request_id) const {
  auto it = requests_.find(request_id);
  TIDAL_CHECK_INDEX(it != requests_.end(), "request_id=", request_id, " is not a known request");
  return it->second;
}

ComputedBlocks KVCacheManager::lookup(std::span<const int32_t> token_ids,
                                      std::span<const uint64_t> extra_keys) {
  const int32_t bs = block_size();
  const size_t num_full = token_ids.size() / static_cast<size_t>(bs);
  TIDAL_CHECK(extra_keys.empty() || extra_keys.size() >= num_full, "extra_keys.size()=",
              extra_keys.size(), " must be 0 or >= the ", num_full, " full blocks of token_ids");
  ++stats_.prefix_cache_queries;
  stats_.prefix_cache_query_tokens += static_cast<int64_t>(token_ids.size());
  ComputedBlocks result;
  if (!pool_.is_prefix_caching_enabled()) return result;

  // NOTE(tidal): the same content may be cached in several blocks (duplicates, see
  // cache_full_blocks), each with its own children, so the walk keeps every verified match of the
  // current position (`frontier`, almost always one block) as the accepted parents of the next.
  std::vector<int32_t> frontier{kNoBlock};
  std::vector<int32_t> next;
  uint64_t parent_hash = kRootHash;
  size_t depth = 0;
  for (; depth < num_full; ++depth) {
    std::span<const int32_t> tokens = token_ids.subspan(depth * bs, static_cast<size_t>(bs));
    const uint64_t extra_key = extra_keys.empty() ? 0 : extra_keys[depth];
    const uint64_t hash = pool_.hash_block(parent_hash, tokens, extra_key);
    next.clear();
    pool_.find_cached(hash, tokens, extra_key, frontier, next);
    if (next.empty()) break;
    frontier.swap(next);
    parent_hash = hash;
  }
  // Prefer a used block as the chain's end: its ancestors are used too, so taking the chain does not
  // shrink the free pool.
  int32_t id = frontier.front();
  for (int32_t candidate : frontier) {
    if (candidate != kNoBlock && pool_.block(candidate).ref_count > 0) id = candidate;
  }
  result.block_ids.resize(depth);
  result.epochs.resize(depth);
  for (size_t i = depth; i-- > 0;) {
    const Block& block = pool_.block(id);
    result.block_ids[i] = id;
    result.epochs[i] = block.epoch;
    id = block.parent_id;
  }
  result.num_tokens = static_cast<int32_t>(depth) * bs;
  stats_.prefix_cache_hit_tokens += result.num_tokens;
  return result;
}

bool KVCacheManager::allocate(int64_t request_id, int32_t num_tokens,
                              const ComputedBlocks* computed) {
  TIDAL_CHECK(num_tokens >= 0, "num_tokens=", num_tokens, " must be >= 0");
  const int32_t bs = block_size();
  auto it = requests_.find(request_id);
  int64_t num_have = it == requests_.end() ? 0 : static_cast<int64_t>(it->second.block_table.size());
  int32_t num_available = pool_.num_blocks_free();
  if (computed != nullptr) {
    const size_t n = computed->block_ids.size();
    TIDAL_CHECK(num_have == 0, "computed passed for request_id=", request_id, " which already has ",
                num_have, " blocks");
    TIDAL_CHECK(computed->epochs.size() == n, "computed.epochs.size()=", computed->epochs.size(),
                " must equal computed.block_ids.size()=", n);
    TIDAL_CHECK(computed->num_tokens == static_cast<int64_t>(n) * bs, "computed.num_tokens=",
                computed->num_tokens, " must equal ", n, " blocks * block_size=", bs);
    TIDAL_CHECK(num_tokens >= computed->num_tokens, "num_tokens=", num_tokens,
                " must be >= computed.num_tokens=", computed->num_tokens);
    for (size_t i = 0; i < n; ++i) {
      const int32_t id = computed->block_ids[i];
      TIDAL_CHECK_STATE(pool_.is_current(id, computed->epochs[i]), "computed block ", id,
                        " (position ", i, ", epoch ", computed->epochs[i],
                        ") was evicted or re-cached since the lookup");
      if (pool_.block(id).ref_count == 0) --num_available;
    }
    num_have = static_cast<int64_t>(n);
  }
  const int64_t num_needed = (static_cast<int64_t>(num_tokens) + bs - 1) / bs;
  const int64_t num_new = std::max<int64_t>(0, num_needed - num_have);
  if (num_new > num_available) return false;

  RequestState& state = requests_[request_id];
  if (computed != nullptr) {
    for (int32_t id : computed->block_ids) pool_.add_ref(id);
    state.block_table = computed->block_ids;
    state.num_hashed_blocks = static_cast<int32_t>(computed->block_ids.size());
  }
  const bool ok = pool_.allocate(static_cast<int32_t>(num_new), state.block_table);
  TIDAL_CHECK_STATE(ok, "pool could not supply ", num_new, " blocks it reported available");
  return true;
}

bool KVCacheManager::can_allocate(int32_t num_new_blocks) const {
  TIDAL_CHECK(num_new_blocks >= 0, "num_new_blocks=", num_new_blocks, " must be >= 0");
  return num_new_blocks <= pool_.num_blocks_free();
}

void KVCacheManager::cache_full_blocks(int64_t request_id, std::span<const int32_t> token_ids,
                                       int32_t num_tokens, std::span<const uint64_t> extra_keys) {
  auto it = requests_.find(request_id);
  TIDAL_CHECK_INDEX(it != requests_.end(), "request_id=", request_id, " is not a known request");
  RequestState& state = it->second;
  const int32_t bs = block_size();
  TIDAL_CHECK(num_tokens >= 0 && static_cast<size_t>(num_tokens) <= token_ids.size(),
              "num_tokens=", num_tokens, " must be in [0, token_ids.size()=", token_ids.size(), "]");
  const int64_t capacity = static_cast<int64_t>(state.block_table.size()) * bs;
  TIDAL_CHECK(num_tokens <= capacity, "num_tokens=", num_tokens, " exceeds the ", capacity,
              " tokens allocated for request_id=", request_id);
  const int32_t num_full = num_tokens / bs;
  TIDAL_CHECK(extra_keys.empty() || extra_keys.size() >= static_cast<size_t>(num_full),
              "extra_keys.size()=", extra_keys.size(), " must be 0 or >= the ", num_full,
              " full blocks");
  if (!pool_.is_prefix_caching_enabled()) return;

  // The previous block is always cached here: it is this request's own, hashed earlier (or taken
  // from a lookup), and a used block keeps its hash, so its stored hash is the chain's last hash.
  for (int32_t i = state.num_hashed_blocks; i < num_full; ++i) {
    const int32_t parent_id = i == 0 ? kNoBlock : state.block_table[i - 1];
    const uint64_t parent_hash = i == 0 ? kRootHash : pool_.block(parent_id).hash;
    std::span<const int32_t> tokens = token_ids.subspan(static_cast<size_t>(i) * bs,
                                                        static_cast<size_t>(bs));
    const uint64_t extra_key = extra_keys.empty() ? 0 : extra_keys[i];
    const uint64_t hash = pool_.hash_block(parent_hash, tokens, extra_key);
    pool_.cache_block(state.block_table[i], hash, tokens, extra_key, parent_id);
  }
  state.num_hashed_blocks = std::max(state.num_hashed_blocks, num_full);
}

void KVCacheManager::share(int64_t src_id, int64_t dst_id) {
  const RequestState& src = request(src_id);
  TIDAL_CHECK(requests_.count(dst_id) == 0, "dst_id=", dst_id, " already holds blocks");
  RequestState copy = src;
  for (int32_t id : copy.block_table) pool_.add_ref(id);
  requests_.emplace(dst_id, std::move(copy));
}

void KVCacheManager::free(int64_t request_id) {
  auto it = requests_.find(request_id);
  TIDAL_CHECK_INDEX(it != requests_.end(), "request_id=", request_id, " is not a known request");
  const std::vector<int32_t>& table = it->second.block_table;
  for (auto block = table.rbegin(); block != table.rend(); ++block) pool_.release(*block);
  requests_.erase(it);
}

bool KVCacheManager::reset_prefix_cache() { return pool_.reset_prefix_cache(); }

const std::vector<int32_t>& KVCacheManager::block_table(int64_t request_id) const {
  return request(request_id).block_table;
}

KVCacheStats KVCacheManager::stats() const {
  KVCacheStats stats = stats_;
  stats.evictions = pool_.num_evictions();
  return stats;
}

std::vector<int32_t> KVCacheManager::cached_tokens(int32_t block_id) const {
  std::span<const int32_t> tokens = pool_.cached_tokens(block_id);
  return {tokens.begin(), tokens.end()};
}

}  // namespace tidal::kv
