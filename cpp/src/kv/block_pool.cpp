// SPDX-License-Identifier: Apache-2.0
// BlockPool: the intrusive free list (LRU head = next to allocate, tail = most recently freed),
// reference counting, and the verified prefix-cache index (hash -> block ids, with token ids,
// extra key and parent identity stored per block so a hash collision can never produce a hit).
#include "tidal/kv/block_pool.h"

#include <algorithm>

#include "block_hash.h"
#include "tidal/status.h"

namespace tidal::kv {

BlockPool::BlockPool(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching,
                     int hash_bits)
    : block_size_(block_size), enable_prefix_caching_(enable_prefix_caching) {
  TIDAL_CHECK(num_blocks >= 1, "num_blocks=", num_blocks, " must be >= 1");
  TIDAL_CHECK(block_size >= 1, "block_size=", block_size, " must be >= 1");
  TIDAL_CHECK(hash_bits >= 1 && hash_bits <= 64, "hash_bits=", hash_bits, " must be in [1, 64]");
  hash_mask_ = hash_bits == 64 ? ~0ULL : (1ULL << hash_bits) - 1;
  blocks_.resize(static_cast<size_t>(num_blocks));
  if (enable_prefix_caching) {
    token_ids_.resize(static_cast<size_t>(num_blocks) * static_cast<size_t>(block_size));
  }
  for (int32_t id = 0; id < num_blocks; ++id) {
    blocks_[id].id = id;
    push_free_tail(blocks_[id]);
  }
}

Block& BlockPool::mut_block(int32_t block_id) {
  TIDAL_CHECK_INDEX(block_id >= 0 && block_id < num_blocks_total(), "block_id=", block_id,
                    " out of range [0, ", num_blocks_total(), ")");
  return blocks_[block_id];
}

const Block& BlockPool::block(int32_t block_id) const {
  return const_cast<BlockPool*>(this)->mut_block(block_id);
}

void BlockPool::unlink_free(Block& block) {
  if (block.prev_free != kNoBlock) blocks_[block.prev_free].next_free = block.next_free;
  else free_head_ = block.next_free;
  if (block.next_free != kNoBlock) blocks_[block.next_free].prev_free = block.prev_free;
  else free_tail_ = block.prev_free;
  block.prev_free = block.next_free = kNoBlock;
  --num_blocks_free_;
}

void BlockPool::push_free_tail(Block& block) {
  block.prev_free = free_tail_;
  block.next_free = kNoBlock;
  if (free_tail_ != kNoBlock) blocks_[free_tail_].next_free = block.id;
  else free_head_ = block.id;
  free_tail_ = block.id;
  ++num_blocks_free_;
}

void BlockPool::drop_hash(Block& block) {
  auto it = cached_blocks_.find(block.hash);
  TIDAL_CHECK_STATE(it != cached_blocks_.end(), "block ", block.id, " is cached but its hash ",
                    block.hash, " is not indexed");
  std::vector<int32_t>& ids = it->second;
  auto pos = std::find(ids.begin(), ids.end(), block.id);
  TIDAL_CHECK_STATE(pos != ids.end(), "block ", block.id, " missing from its hash list");
  *pos = ids.back();
  ids.pop_back();
  if (ids.empty()) cached_blocks_.erase(it);
  block.is_cached = false;
  block.hash = 0;
  block.extra_key = 0;
  block.parent_id = kNoBlock;
  block.parent_epoch = 0;
  --num_blocks_cached_;
}

bool BlockPool::allocate(int32_t num_blocks, std::vector<int32_t>& out) {
  TIDAL_CHECK(num_blocks >= 0, "num_blocks=", num_blocks, " must be >= 0");
  if (num_blocks > num_blocks_free_) return false;
  out.reserve(out.size() + static_cast<size_t>(num_blocks));
  for (int32_t i = 0; i < num_blocks; ++i) {
    Block& block = blocks_[free_head_];
    unlink_free(block);
    if (block.is_cached) {
      drop_hash(block);
      ++num_evictions_;
    }
    block.ref_count = 1;
    out.push_back(block.id);
  }
  return true;
}

void BlockPool::add_ref(int32_t block_id) {
  Block& block = mut_block(block_id);
  if (block.ref_count == 0) unlink_free(block);
  ++block.ref_count;
}

void BlockPool::release(int32_t block_id) {
  Block& block = mut_block(block_id);
  TIDAL_CHECK_STATE(block.ref_count > 0, "block ", block_id, " released while free");
  if (--block.ref_count == 0) push_free_tail(block);
}

uint64_t BlockPool::hash_block(uint64_t parent_hash, std::span<const int32_t> token_ids,
                               uint64_t extra_key) const {
  TIDAL_CHECK(static_cast<int64_t>(token_ids.size()) == block_size_, "token_ids.size()=",
              token_ids.size(), " must equal block_size=", block_size_);
  uint64_t h = detail::hash_combine(parent_hash, extra_key);
  for (int32_t token : token_ids) h = detail::hash_combine(h, static_cast<uint32_t>(token));
  return h & hash_mask_;
}

void BlockPool::cache_block(int32_t block_id, uint64_t hash, std::span<const int32_t> token_ids,
                            uint64_t extra_key, int32_t parent_id) {
  TIDAL_CHECK_STATE(enable_prefix_caching_, "cache_block called with prefix caching disabled");
  Block& block = mut_block(block_id);
  TIDAL_CHECK_STATE(block.ref_count > 0 && !block.is_cached, "block ", block_id,
                    " must be used and not cached (ref_count=", block.ref_count,
                    ", is_cached=", block.is_cached, ")");
  TIDAL_CHECK(static_cast<int64_t>(token_ids.size()) == block_size_, "token_ids.size()=",
              token_ids.size(), " must equal block_size=", block_size_);
  TIDAL_CHECK(hash == (hash & hash_mask_), "hash=", hash, " has bits above hash_bits");
  if (parent_id != kNoBlock) {
    TIDAL_CHECK_STATE(mut_block(parent_id).is_cached, "parent block ", parent_id,
                      " of block ", block_id, " is not cached");
  }
  block.is_cached = true;
  block.hash = hash;
  block.extra_key = extra_key;
  block.parent_id = parent_id;
  block.parent_epoch = parent_id == kNoBlock ? 0 : blocks_[parent_id].epoch;
  ++block.epoch;
  std::copy(token_ids.begin(), token_ids.end(),
            token_ids_.begin() + static_cast<ptrdiff_t>(block_id) * block_size_);
  cached_blocks_[hash].push_back(block_id);
  ++num_blocks_cached_;
}

void BlockPool::find_cached(uint64_t hash, std::span<const int32_t> token_ids, uint64_t extra_key,
                            std::span<const int32_t> parent_ids, std::vector<int32_t>& out) const {
  auto it = cached_blocks_.find(hash);
  if (it == cached_blocks_.end()) return;
  for (int32_t id : it->second) {
    const Block& block = blocks_[id];
    if (block.extra_key != extra_key) continue;
    bool parent_ok = false;
    for (int32_t parent : parent_ids) {
      if (block.parent_id != parent) continue;
      parent_ok = parent == kNoBlock || block.parent_epoch == blocks_[parent].epoch;
      break;
    }
    if (!parent_ok) continue;
    std::span<const int32_t> stored = cached_tokens(id);
    if (std::equal(stored.begin(), stored.end(), token_ids.begin(), token_ids.end())) {
      out.push_back(id);
    }
  }
}

bool BlockPool::is_current(int32_t block_id, uint64_t epoch) const {
  const Block& b = block(block_id);
  return b.is_cached && b.epoch == epoch;
}

bool BlockPool::reset_prefix_cache() {
  for (int32_t id = free_head_; id != kNoBlock; id = blocks_[id].next_free) {
    if (blocks_[id].is_cached) drop_hash(blocks_[id]);
  }
  return num_blocks_cached_ == 0;
}

std::span<const int32_t> BlockPool::cached_tokens(int32_t block_id) const {
  const Block& b = block(block_id);
  if (!b.is_cached) return {};
  return {token_ids_.data() + static_cast<ptrdiff_t>(block_id) * block_size_,
          static_cast<size_t>(block_size_)};
}

std::vector<int32_t> BlockPool::free_block_ids() const {
  std::vector<int32_t> ids;
  ids.reserve(static_cast<size_t>(num_blocks_free_));
  for (int32_t id = free_head_; id != kNoBlock; id = blocks_[id].next_free) ids.push_back(id);
  return ids;
}

}  // namespace tidal::kv
