// SPDX-License-Identifier: Apache-2.0
// Fuzz harness for tidal::kv::BlockPool: the input bytes pick a pool (sizes, prefix caching,
// hash_bits down to 1 so that hashes collide) and a sequence of calls, valid or not: allocate,
// add_ref, release, cache_block (forced collisions and bad parents too), find_cached, is_current,
// hash_block, reset_prefix_cache. ShadowPool (fuzz_shadow_pool.h) predicts every result and whether
// a call must throw; after every call each block's bookkeeping, the LRU free list and its intrusive
// links must equal the model. Driven by fuzz_driver.h's main().
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <map>
#include <set>
#include <span>
#include <vector>

#include "fuzz_driver.h"
#include "fuzz_shadow_pool.h"
#include "tidal/kv/block_pool.h"
#include "tidal/status.h"

using tidal::fuzz::attempt;
using tidal::fuzz::Flat;
using tidal::fuzz::FuzzInput;
using tidal::fuzz::Ids;
using tidal::fuzz::kIndex;
using tidal::fuzz::kInvalid;
using tidal::fuzz::kOk;
using tidal::fuzz::kState;
using tidal::fuzz::make_tokens;
using tidal::fuzz::ShadowBlock;
using tidal::fuzz::ShadowPool;
using tidal::kv::kNoBlock;
using tidal::kv::BlockPool;

namespace {

struct Counters {
  int64_t inputs = 0, ops = 0, evictions = 0, collisions_rejected = 0, cached = 0;
} g;

Flat snapshot(const BlockPool& pool) {
  Flat f;
  f.add(pool.num_blocks_free());
  f.add(pool.num_blocks_cached());
  f.add(pool.num_evictions());
  f.add_all(pool.free_block_ids());
  for (int32_t id = 0; id < pool.num_blocks_total(); ++id) {
    const tidal::kv::Block& b = pool.block(id);
    for (int64_t x : {int64_t{b.ref_count}, int64_t{b.is_cached}, static_cast<int64_t>(b.hash),
                      static_cast<int64_t>(b.extra_key), int64_t{b.parent_id},
                      static_cast<int64_t>(b.parent_epoch), static_cast<int64_t>(b.epoch),
                      int64_t{b.prev_free}, int64_t{b.next_free}}) {
      f.add(x);
    }
    f.add_all(pool.cached_tokens(id));
  }
  return f;
}

void check_pool(const BlockPool& pool, const ShadowPool& model) {
  const int32_t n = pool.num_blocks_total();
  FUZZ_CHECK(n == model.total(), "num_blocks_total=", n);
  FUZZ_CHECK(pool.num_blocks_free() + pool.num_blocks_used() == n, "free ", pool.num_blocks_free(),
             " + used ", pool.num_blocks_used(), " != total ", n);
  const Ids free_ids = pool.free_block_ids();
  FUZZ_CHECK(free_ids == model.free_list, "free list (LRU order) differs from the model");
  FUZZ_CHECK(pool.num_blocks_free() == static_cast<int32_t>(free_ids.size()), "num_blocks_free=",
             pool.num_blocks_free(), " but the free list holds ", free_ids.size());
  FUZZ_CHECK(pool.num_blocks_cached() == model.num_cached(), "num_blocks_cached=", pool.num_blocks_cached(),
             ", model ", model.num_cached());
  FUZZ_CHECK(pool.num_evictions() == model.evictions, "num_evictions=", pool.num_evictions());
  for (size_t i = 0; i < free_ids.size(); ++i) {  // the intrusive links agree with the list
    const tidal::kv::Block& b = pool.block(free_ids[i]);
    FUZZ_CHECK(b.prev_free == (i == 0 ? kNoBlock : free_ids[i - 1]), "prev_free of block ", b.id);
    FUZZ_CHECK(b.next_free == (i + 1 == free_ids.size() ? kNoBlock : free_ids[i + 1]), "next_free of block ", b.id);
  }
  for (int32_t id = 0; id < n; ++id) {
    const tidal::kv::Block& b = pool.block(id);
    const ShadowBlock& m = model.blocks[id];
    FUZZ_CHECK(b.id == id && b.ref_count == m.ref && b.is_cached == m.cached, "block ", id, ": ref_count=",
               b.ref_count, " (model ", m.ref, "), is_cached=", b.is_cached, " (model ", m.cached, ")");
    FUZZ_CHECK(b.hash == m.hash && b.extra_key == m.extra && b.parent_id == m.parent &&
                   b.parent_epoch == m.parent_epoch && b.epoch == m.epoch,
               "block ", id, " hash/extra_key/parent/epochs differ from the model");
    const auto tokens = pool.cached_tokens(id);
    FUZZ_CHECK(std::equal(tokens.begin(), tokens.end(), m.tokens.begin(), m.tokens.end()),
               "cached tokens of block ", id, " differ from what was stored");
  }
}

void fuzz_pool(FuzzInput& in) {
  const int32_t n = in.chance(3, 4) ? in.range32(1, 16) : in.range32(1, 48), bs = in.range32(1, 6);
  const bool caching = !in.chance(1, 8);
  int hash_bits = in.pick(std::vector<int>{1, 2, 3, 5, 8, 64});
  if (in.chance(1, 32)) hash_bits = in.range32(-1, 66);
  if (hash_bits < 1 || hash_bits > 64) {
    attempt("BlockPool(bad hash_bits)", kInvalid, [&] { BlockPool p(n, bs, caching, hash_bits); }, [] { return 0; });
    return;
  }
  BlockPool pool(n, bs, caching, hash_bits);
  ShadowPool model(n, bs, caching);
  const uint64_t mask = hash_bits == 64 ? ~0ULL : (1ULL << hash_bits) - 1;
  const int32_t vocab = in.pick(Ids{1, 2, 4, 50});
  std::vector<Ids> history;
  auto snap = [&] { return snapshot(pool).v; };
  auto any_block = [&] { return in.chance(1, 16) ? in.range32(-2, n + 1) : in.range32(0, n - 1); };
  auto cached_ids = [&] {
    Ids ids;
    for (int32_t id = 0; id < n; ++id) if (model.blocks[id].cached) ids.push_back(id);
    return ids;
  };

  while (!in.empty()) {
    ++g.ops;
    const int op = in.byte() % 10;
    if (op == 0) {  // allocate
      int32_t k = in.chance(1, 16) ? -1 : in.range32(0, std::min(n, 8) + 2);
      if (in.chance(1, 64)) k = in.pick(Ids{std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max()});
      Ids out{-7};
      Ids model_out{-7};
      bool ok = false;
      if (attempt("allocate", k < 0 ? kInvalid : kOk, [&] { ok = pool.allocate(k, out); }, snap)) {
        FUZZ_CHECK(ok == model.allocate(k, model_out) && out == model_out, "allocate(", k, ") returned ", ok,
                   " or other blocks than the model's LRU head");
      }
    } else if (op == 1) {  // add_ref (a prefix-cache hit on a free block, or a share)
      const int32_t id = any_block();
      if (attempt("add_ref", model.valid(id) ? kOk : kIndex, [&] { pool.add_ref(id); }, snap)) model.add_ref(id);
    } else if (op <= 3) {  // release
      Ids used;
      for (int32_t id = 0; id < n; ++id) if (model.blocks[id].ref > 0) used.push_back(id);
      const int32_t id = !used.empty() && in.chance(3, 4) ? in.pick(used) : any_block();
      const unsigned expect = !model.valid(id) ? kIndex : model.blocks[id].ref == 0 ? kState : kOk;
      if (attempt("release", expect, [&] { pool.release(id); }, snap)) model.release(id);
    } else if (op <= 6) {  // cache_block, mostly valid: a used uncached block under its chain hash
      Ids candidates;
      for (int32_t id = 0; id < n; ++id) if (model.blocks[id].ref > 0 && !model.blocks[id].cached) candidates.push_back(id);
      const int32_t id = !candidates.empty() && in.chance(7, 8) ? in.pick(candidates) : any_block();
      const Ids cached = cached_ids();
      int32_t parent = !cached.empty() && in.chance(2, 3) ? in.pick(cached) : kNoBlock;
      if (in.chance(1, 16)) parent = any_block();
      Ids tokens = make_tokens(in, history, static_cast<size_t>(bs), vocab);
      if (in.chance(1, 32)) tokens.push_back(0);
      const uint64_t extra = in.chance(1, 4) ? in.range(1, 3) : 0;
      const uint64_t parent_hash = model.valid(parent) && model.blocks[parent].cached ? model.blocks[parent].hash
                                                                                      : tidal::kv::kRootHash;
      uint64_t hash = tokens.size() == static_cast<size_t>(bs) ? pool.hash_block(parent_hash, tokens, extra) : 0;
      if (in.chance(1, 8)) hash = static_cast<uint64_t>(in.range(0, 7)) & mask;  // a forced collision
      if (in.chance(1, 32)) hash = ~0ULL;  // bits above hash_bits unless 64
      const ShadowBlock* b = model.valid(id) ? &model.blocks[id] : nullptr;
      unsigned expect = kOk;
      if (!caching) expect = kState;
      else if (b == nullptr) expect = kIndex;
      else if (b->ref == 0 || b->cached) expect = kState;
      else if (tokens.size() != static_cast<size_t>(bs) || hash != (hash & mask)) expect = kInvalid;
      else if (parent != kNoBlock && !model.valid(parent)) expect = kIndex;
      else if (parent != kNoBlock && !model.blocks[parent].cached) expect = kState;
      if (attempt("cache_block", expect, [&] { pool.cache_block(id, hash, tokens, extra, parent); }, snap)) {
        model.cache(id, hash, tokens, extra, parent);
        ++g.cached;
      }
    } else if (op == 7) {  // find_cached: exactly the model's content-verified matches
      const Ids cached = cached_ids();
      Ids tokens;
      uint64_t extra = 0, hash = 0;
      Ids parents{kNoBlock};
      if (!cached.empty() && in.chance(3, 4)) {  // near an existing entry
        const ShadowBlock& c = model.blocks[in.pick(cached)];
        tokens = c.tokens;
        extra = c.extra;
        hash = c.hash;
        parents = {c.parent};
        if (in.chance(1, 4) && !tokens.empty()) tokens.back() ^= 1;
        if (in.chance(1, 8)) extra ^= 1;
      } else {
        tokens = make_tokens(in, history, static_cast<size_t>(bs), vocab);
        hash = static_cast<uint64_t>(in.range(0, 7)) & mask;
      }
      for (int k = in.range32(0, 2); k > 0; --k) parents.push_back(in.chance(1, 2) && !cached.empty() ? in.pick(cached) : kNoBlock);
      Ids out;
      pool.find_cached(hash, tokens, extra, parents, out);
      Ids expected = model.find(&hash, tokens, extra, parents);
      std::sort(out.begin(), out.end());
      FUZZ_CHECK(out == expected, "find_cached returned ", out.size(), " blocks, the model ", expected.size());
      for (int32_t id : model.find(nullptr, tokens, extra, parents)) {
        if (model.blocks[id].hash != hash) ++g.collisions_rejected;  // same content, other bucket
      }
    } else if (op == 8) {  // is_current, hash_block, cached_tokens
      const int32_t id = any_block();
      const uint64_t epoch = in.range(0, 3);
      bool current = false;
      if (attempt("is_current", model.valid(id) ? kOk : kIndex, [&] { current = pool.is_current(id, epoch); }, snap)) {
        FUZZ_CHECK(current == (model.blocks[id].cached && model.blocks[id].epoch == epoch), "is_current(", id, ")");
      }
      const Ids tokens = make_tokens(in, history, static_cast<size_t>(bs) + (in.chance(1, 16) ? 1 : 0), vocab);
      uint64_t h1 = 0;
      if (attempt("hash_block", tokens.size() == static_cast<size_t>(bs) ? kOk : kInvalid,
                  [&] { h1 = pool.hash_block(7, tokens, 3); }, snap)) {
        FUZZ_CHECK(h1 == pool.hash_block(7, tokens, 3) && h1 == (h1 & mask), "hash_block is not deterministic or masked");
      }
    } else {  // reset_prefix_cache
      const bool empty = pool.reset_prefix_cache();
      FUZZ_CHECK(empty == model.reset(), "reset_prefix_cache returned ", empty);
    }
    check_pool(pool, model);
  }
  g.evictions += model.evictions;
  // Release everything: the pool ends whole and, after a reset, with an empty prefix cache.
  for (int32_t id = 0; id < n; ++id) {
    while (model.blocks[id].ref > 0) {
      pool.release(id);
      model.release(id);
    }
  }
  FUZZ_CHECK(pool.reset_prefix_cache() && model.reset(), "the prefix cache is not empty with every block free");
  check_pool(pool, model);
  FUZZ_CHECK(pool.num_blocks_free() == n && pool.num_blocks_cached() == 0, "pool not whole at the end");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzInput in(data, size);
  ++g.inputs;
  try {
    fuzz_pool(in);
  } catch (const std::exception& e) {
    FUZZ_CHECK(false, "unexpected exception: ", e.what());
  }
  return 0;
}

bool tidal::fuzz::fuzz_report(bool require) {
  std::fprintf(stderr,
               "fuzz_block_pool: %lld inputs, %lld ops, %lld blocks cached, %lld evictions, %lld same-content "
               "blocks in another hash bucket (not found, as they must not be)\n",
               (long long)g.inputs, (long long)g.ops, (long long)g.cached, (long long)g.evictions,
               (long long)g.collisions_rejected);
  return !require || (g.cached > 0 && g.evictions > 0 && g.collisions_rejected > 0);
}
