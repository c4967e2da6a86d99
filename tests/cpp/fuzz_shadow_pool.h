// SPDX-License-Identifier: Apache-2.0
// The fuzz harnesses' model of a BlockPool (fuzz_block_pool.cpp, fuzz_kv_cache_manager.cpp): plain
// vectors for the LRU free list, ref counts and each block's cache entry (tokens, extra key, parent
// and epochs), updated the way the contract says, so that every result of the real pool can be
// predicted.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "fuzz_driver.h"
#include "tidal/kv/block_pool.h"

namespace tidal::fuzz {

using kv::kNoBlock;

struct ShadowBlock {
  int32_t ref = 0;
  bool cached = false;
  uint64_t hash = 0;
  uint64_t extra = 0;
  int32_t parent = kNoBlock;
  uint64_t parent_epoch = 0;
  uint64_t epoch = 0;
  Ids tokens;
};

struct ShadowPool {
  int32_t bs = 1;
  bool caching = true;
  std::vector<ShadowBlock> blocks;
  Ids free_list;  // LRU order, head first
  int64_t evictions = 0;

  ShadowPool(int32_t n, int32_t block_size, bool enable_caching) : bs(block_size), caching(enable_caching) {
    blocks.resize(static_cast<size_t>(n));
    for (int32_t i = 0; i < n; ++i) free_list.push_back(i);
  }
  int32_t total() const { return static_cast<int32_t>(blocks.size()); }
  bool valid(int32_t id) const { return id >= 0 && id < total(); }
  int32_t num_cached() const {
    return static_cast<int32_t>(std::count_if(blocks.begin(), blocks.end(), [](auto& b) { return b.cached; }));
  }
  void drop(ShadowBlock& b) {
    b.cached = false;
    b.hash = b.extra = b.parent_epoch = 0;
    b.parent = kNoBlock;
    b.tokens.clear();
  }
  bool allocate(int32_t n, Ids& out) {
    if (n > static_cast<int32_t>(free_list.size())) return false;
    for (int32_t i = 0; i < n; ++i) {
      const int32_t id = free_list.front();
      free_list.erase(free_list.begin());
      ShadowBlock& b = blocks[id];
      if (b.cached) {
        drop(b);
        ++evictions;
      }
      b.ref = 1;
      out.push_back(id);
    }
    return true;
  }
  void add_ref(int32_t id) {
    if (blocks[id].ref++ == 0) free_list.erase(std::find(free_list.begin(), free_list.end(), id));
  }
  void release(int32_t id) {
    if (--blocks[id].ref == 0) free_list.push_back(id);
  }
  void cache(int32_t id, uint64_t hash, std::span<const int32_t> tokens, uint64_t extra, int32_t parent) {
    ShadowBlock& b = blocks[id];
    b.cached = true;
    b.hash = hash;
    b.extra = extra;
    b.parent = parent;
    b.parent_epoch = parent == kNoBlock ? 0 : blocks[parent].epoch;
    ++b.epoch;
    b.tokens.assign(tokens.begin(), tokens.end());
  }
  // Blocks whose content (tokens, extra key) matches and whose parent is in `parents` at the
  // parent's current epoch; with `hash`, only those cached under it (BlockPool::find_cached).
  Ids find(const uint64_t* hash, std::span<const int32_t> tokens, uint64_t extra, const Ids& parents) const {
    Ids out;
    for (int32_t id = 0; id < total(); ++id) {
      const ShadowBlock& b = blocks[id];
      if (!b.cached || (hash != nullptr && b.hash != *hash) || b.extra != extra) continue;
      if (!std::equal(b.tokens.begin(), b.tokens.end(), tokens.begin(), tokens.end())) continue;
      auto p = std::find(parents.begin(), parents.end(), b.parent);
      if (p == parents.end()) continue;
      if (*p != kNoBlock && b.parent_epoch != blocks[*p].epoch) continue;
      out.push_back(id);
    }
    return out;
  }
  bool reset() {
    for (int32_t id : free_list) drop(blocks[id]);
    return num_cached() == 0;
  }
};



}  // namespace tidal::fuzz
