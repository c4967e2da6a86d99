// SPDX-License-Identifier: Apache-2.0
// The paged KV block pool: every block of the KV cache made once, its reference count, the free list
// that is also the LRU eviction order, and the prefix-cache index from full-block hash to blocks.
// KVCacheManager (kv_cache_manager.h) builds per-request block tables on top of it.
#pragma once

#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

namespace tidal::kv {

inline constexpr int32_t kNoBlock = -1;
/// The "parent hash" of the first block of a sequence.
inline constexpr uint64_t kRootHash = 0x243f6a8885a308d3ULL;

/// One KV block's bookkeeping (the KV data itself lives in the model runner's cache tensors, indexed
/// by `id`). Owned by BlockPool; everything else refers to blocks by id.
struct Block {
  int32_t id = kNoBlock;
  int32_t ref_count = 0;          // block tables holding it; 0 = in the free list
  bool is_cached = false;         // holds a full-block hash and is findable in the prefix cache
  uint64_t hash = 0;              // masked chain hash, valid while is_cached
  uint64_t extra_key = 0;         // e.g. an image hash; 0 = none
  int32_t parent_id = kNoBlock;   // block at the previous position when cached; kNoBlock = first
  uint64_t parent_epoch = 0;      // the parent's epoch at that moment
  uint64_t epoch = 0;             // bumped every time the block is (re)cached
  int32_t prev_free = kNoBlock;   // intrusive free-list links, valid while ref_count == 0
  int32_t next_free = kNoBlock;
};

class BlockPool {
 public:
  /// Makes `num_blocks` (>= 1) blocks of `block_size` (>= 1) tokens, all free, in id order.
  /// `hash_bits` (1..64) masks every block hash to its low bits. It exists so tests can force hash
  /// collisions: lookups stay correct at any width because every hit is verified against the stored
  /// token ids, extra key and parent identity; only the speed of a lookup suffers. Bad values throw
  /// std::invalid_argument naming them.
  BlockPool(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching, int hash_bits = 64);

  int32_t num_blocks_total() const { return static_cast<int32_t>(blocks_.size()); }
  int32_t num_blocks_free() const { return num_blocks_free_; }
  int32_t num_blocks_used() const { return num_blocks_total() - num_blocks_free_; }
  /// Blocks holding a hash, free or used.
  int32_t num_blocks_cached() const { return num_blocks_cached_; }
  int32_t block_size() const { return block_size_; }
  bool is_prefix_caching_enabled() const { return enable_prefix_caching_; }
  /// Cached blocks popped from the free list for reuse (their hash dropped) since construction.
  int64_t num_evictions() const { return num_evictions_; }

  /// Pops `num_blocks` blocks from the head of the free list (least recently freed first), sets their
  /// ref_count to 1 and appends their ids to `out`. A popped block that still holds a hash loses it
  /// and counts one eviction. Returns false and changes nothing when fewer blocks are free.
  bool allocate(int32_t num_blocks, std::vector<int32_t>& out);
  /// Adds a reference to `block_id`; a free block leaves the free list in O(1) (a prefix-cache hit).
  void add_ref(int32_t block_id);
  /// Drops a reference; at 0 the block is appended to the free-list tail and keeps its hash, so it
  /// stays findable until it is popped for reuse. Releasing a free block is a tidal::Error.
  void release(int32_t block_id);

  /// Chain hash of a full block: (parent block's hash or kRootHash, its `block_size` token ids,
  /// `extra_key`), masked to `hash_bits`. Deterministic within a process and across processes.
  uint64_t hash_block(uint64_t parent_hash, std::span<const int32_t> token_ids,
                      uint64_t extra_key) const;
  /// Makes `block_id` (used, not cached) findable under `hash`, storing its `block_size` token ids,
  /// `extra_key` and its parent: `parent_id`, a cached block, at its current epoch, or kNoBlock for
  /// the first block of a sequence. Bumps the block's epoch.
  void cache_block(int32_t block_id, uint64_t hash, std::span<const int32_t> token_ids,
                   uint64_t extra_key, int32_t parent_id);
  /// Appends to `out` every cached block under `hash` whose stored token ids and extra key equal the
  /// given ones and whose parent is one of `parent_ids` at that parent's current epoch (kNoBlock in
  /// `parent_ids` accepts first blocks). Takes no reference.
  void find_cached(uint64_t hash, std::span<const int32_t> token_ids, uint64_t extra_key,
                   std::span<const int32_t> parent_ids, std::vector<int32_t>& out) const;
  /// True when `block_id` is cached and was (re)cached at `epoch`: it still holds the content a
  /// lookup saw.
  bool is_current(int32_t block_id, uint64_t epoch) const;
  /// Drops the hash of every free block. Used blocks keep theirs (their requests may still extend
  /// them; a used block's parent is always used too, so no kept block loses its parent). Returns true
  /// when no block is cached afterwards, false when used blocks still hold hashes.
  bool reset_prefix_cache();

  /// The block's bookkeeping; a bad id throws std::out_of_range.
  const Block& block(int32_t block_id) const;
  /// The token ids stored with a cached block ([block_size]); empty when not cached.
  std::span<const int32_t> cached_tokens(int32_t block_id) const;
  /// Free block ids in LRU order, head (next to be allocated) first. O(num_blocks_free).
  std::vector<int32_t> free_block_ids() const;

 private:
  Block& mut_block(int32_t block_id);
  void unlink_free(Block& block);
  void push_free_tail(Block& block);
  void drop_hash(Block& block);

  std::vector<Block> blocks_;  // [num_blocks], index == id
  // NOTE(tidal): token ids of cached blocks live in one flat array ([num_blocks * block_size],
  // empty when caching is off) rather than a vector per block: one allocation, made once.
  std::vector<int32_t> token_ids_;
  std::unordered_map<uint64_t, std::vector<int32_t>> cached_blocks_;  // hash -> cached block ids
  int32_t block_size_;
  bool enable_prefix_caching_;
  uint64_t hash_mask_;
  int32_t free_head_ = kNoBlock;
  int32_t free_tail_ = kNoBlock;
  int32_t num_blocks_free_ = 0;
  int32_t num_blocks_cached_ = 0;
  int64_t num_evictions_ = 0;
};

}  // namespace tidal::kv
