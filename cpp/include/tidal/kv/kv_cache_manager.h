// SPDX-License-Identifier: Apache-2.0
// KVCacheManager: per-request block tables over one BlockPool, with prefix caching. It answers
// "how much of this prompt is cached", grows append-only block tables, registers full blocks in the
// prefix cache once their tokens are computed, and frees requests tail-first.
#pragma once

#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "tidal/kv/block_pool.h"

namespace tidal::kv {

/// The result of KVCacheManager::lookup: a verified chain of cached full blocks.
struct ComputedBlocks {
  std::vector<int32_t> block_ids;  // [num_tokens / block_size], position order
  std::vector<uint64_t> epochs;    // [num_tokens / block_size], each block's cache epoch at lookup
  int32_t num_tokens = 0;          // tokens covered: block_ids.size() * block_size
};

/// Prefix-cache counters since construction.
struct KVCacheStats {
  int64_t prefix_cache_queries = 0;       // lookup() calls
  int64_t prefix_cache_query_tokens = 0;  // sum of token_ids.size() over lookups
  int64_t prefix_cache_hit_tokens = 0;    // sum of ComputedBlocks::num_tokens over lookups
  int64_t evictions = 0;                  // cached blocks whose hash was dropped for reuse
};

class KVCacheManager {
 public:
  /// A pool of `num_blocks` (>= 1) blocks of `block_size` (>= 1) tokens. `hash_bits` (1..64) masks
  /// block hashes; below 64 it is only for tests that force collisions (see BlockPool).
  KVCacheManager(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching = true,
                 int hash_bits = 64);

  /// The longest verified prefix of FULL blocks of `token_ids` held in the prefix cache (free or
  /// used blocks). `extra_keys` is empty (all 0) or holds at least one key per full block of
  /// `token_ids`; extra entries are ignored. Counts one query, token_ids.size() query tokens and
  /// the hit tokens. Takes no reference: pass the result to allocate() before anything else
  /// allocates, or allocate() may find it stale. Empty when prefix caching is disabled.
  ComputedBlocks lookup(std::span<const int32_t> token_ids,
                        std::span<const uint64_t> extra_keys = {});

  /// Grows the block table of `request_id` (created on its first call) so it holds `num_tokens`
  /// tokens in total; never shrinks. On the first call, `computed` (from a lookup just before)
  /// becomes the head of the table: its blocks gain a reference before any new block is popped, so
  /// the new allocation cannot evict them. Returns false and changes nothing when the pool lacks the
  /// blocks (free cached blocks count as available, free blocks in `computed` do not). Throws
  /// std::invalid_argument for num_tokens < 0, `computed` on a request that already has blocks, or
  /// num_tokens < computed->num_tokens; tidal::Error when a computed block was evicted or re-cached
  /// since the lookup.
  bool allocate(int64_t request_id, int32_t num_tokens, const ComputedBlocks* computed = nullptr);

  /// True when `num_new_blocks` (>= 0) blocks can be allocated now.
  bool can_allocate(int32_t num_new_blocks) const;

  /// Registers, after their KV has been computed, every block of the request that is full within the
  /// first `num_tokens` of `token_ids` (the request's whole token sequence so far) and not yet
  /// hashed. Incremental: each block is hashed once. `extra_keys` as in lookup(), one per full block.
  /// NOTE(tidal): a block whose content is already cached elsewhere is cached too (a duplicate
  /// entry): every cached block's parent is then its own table predecessor, held by the same
  /// request, so the chain stays verifiable while the request lives; lookup() follows all verified
  /// duplicates. No-op when prefix caching is disabled.
  void cache_full_blocks(int64_t request_id, std::span<const int32_t> token_ids, int32_t num_tokens,
                         std::span<const uint64_t> extra_keys = {});

  /// Gives `dst_id` (new) the block table of `src_id`, each block gaining a reference: the blocks
  /// outlive free(src_id) until free(dst_id). std::out_of_range for an unknown `src_id`,
  /// std::invalid_argument for a known `dst_id`.
  void share(int64_t src_id, int64_t dst_id);

  /// Releases the request's blocks last block first, so a prompt's tail is evicted before its shared
  /// head; blocks reaching ref_count 0 go to the free-list tail and keep their hash. Unknown id:
  /// std::out_of_range.
  void free(int64_t request_id);

  /// Drops the hash of every free block. Blocks held by requests keep theirs. Returns true when the
  /// prefix cache is empty afterwards, false when used blocks still hold hashes (call again once
  /// those requests are freed, e.g. after a weight update).
  bool reset_prefix_cache();

  /// The request's block table ([ceil(num_tokens / block_size)] block ids). Unknown id:
  /// std::out_of_range. The reference stays valid until free(request_id).
  const std::vector<int32_t>& block_table(int64_t request_id) const;
  bool has_request(int64_t request_id) const { return requests_.count(request_id) != 0; }

  int32_t num_blocks_free() const { return pool_.num_blocks_free(); }
  int32_t num_blocks_used() const { return pool_.num_blocks_used(); }
  int32_t num_blocks_total() const { return pool_.num_blocks_total(); }
  int32_t num_blocks_cached() const { return pool_.num_blocks_cached(); }
  int32_t block_size() const { return pool_.block_size(); }
  /// The chain hash a sequence's first full block (the first block_size of `token_ids`, with
  /// `extra_key`) is cached under: lets a scheduler see that two prompts start alike before either
  /// is cached.
  uint64_t first_block_hash(std::span<const int32_t> token_ids, uint64_t extra_key = 0) const {
    return pool_.hash_block(kv::kRootHash, token_ids.first(static_cast<size_t>(block_size())), extra_key);
  }
  bool is_prefix_caching_enabled() const { return pool_.is_prefix_caching_enabled(); }
  KVCacheStats stats() const;

  // Introspection for tests; a bad block id throws std::out_of_range.
  int32_t ref_count(int32_t block_id) const { return pool_.block(block_id).ref_count; }
  /// Free blocks in LRU order, next to be allocated first.
  std::vector<int32_t> free_block_ids() const { return pool_.free_block_ids(); }
  bool is_cached(int32_t block_id) const { return pool_.block(block_id).is_cached; }
  /// The token ids a cached block was registered with; empty when not cached.
  std::vector<int32_t> cached_tokens(int32_t block_id) const;

 private:
  struct RequestState {
    std::vector<int32_t> block_table;
    int32_t num_hashed_blocks = 0;  // block_table[0, num_hashed_blocks) are cached
  };

  const RequestState& request(int64_t request_id) const;

  BlockPool pool_;
  std::unordered_map<int64_t, RequestState> requests_;
  KVCacheStats stats_;
};

}  // namespace tidal::kv
