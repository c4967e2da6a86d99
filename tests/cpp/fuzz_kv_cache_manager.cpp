// SPDX-License-Identifier: Apache-2.0
// Fuzz harness for tidal::kv::KVCacheManager: the input bytes pick a pool (sizes, prefix caching,
// hash_bits down to 1 so that hashes collide) and a sequence of calls, valid or not: lookup,
// admission (lookup then allocate with its result), allocate with a stale or tampered result,
// decode steps (grow the table, cache_full_blocks), share, free, reset_prefix_cache, can_allocate.
// ShadowPool (fuzz_shadow_pool.h) predicts every result: the LRU free list, ref counts, which blocks
// are cached with what content, what lookup must return (content-verified, so exact at any hash
// width), and whether a call must throw. After every call the real state must equal the model, and
// every table's hashed blocks must hold that request's tokens. Driven by fuzz_driver.h's main().
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
#include "tidal/kv/kv_cache_manager.h"
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
using tidal::kv::ComputedBlocks;
using tidal::kv::KVCacheManager;
using Keys = std::vector<uint64_t>;

namespace {

struct Counters {
  int64_t inputs = 0, ops = 0, evictions = 0, hits = 0, hit_on_duplicate = 0, stale_computed = 0;
} g;

struct ShadowRequest {
  Ids table;
  int32_t num_hashed = 0;
  Ids tokens;    // the request's sequence so far: what cache_full_blocks is given
  Keys extra;    // one per block of `tokens`, or empty
  bool is_copy = false;  // made by share(): read-only, like a hold (its blocks are someone else's)
};

void check_manager(const KVCacheManager& kv, const ShadowPool& model, const std::map<int64_t, ShadowRequest>& reqs,
                   const std::set<int64_t>& ids_seen) {
  const int32_t n = kv.num_blocks_total();
  FUZZ_CHECK(kv.num_blocks_free() + kv.num_blocks_used() == n, "free + used != total");
  FUZZ_CHECK(kv.free_block_ids() == model.free_list, "free list (LRU order) differs from the model");
  FUZZ_CHECK(kv.num_blocks_cached() == model.num_cached(), "num_blocks_cached=", kv.num_blocks_cached(),
             ", model ", model.num_cached());
  FUZZ_CHECK(kv.stats().evictions == model.evictions, "evictions=", kv.stats().evictions);
  std::vector<int32_t> refs(static_cast<size_t>(n), 0);
  for (int64_t id : ids_seen) {
    auto it = reqs.find(id);
    FUZZ_CHECK(kv.has_request(id) == (it != reqs.end()), "has_request(", id, ")");
    if (it == reqs.end()) continue;
    const Ids& table = kv.block_table(id);
    FUZZ_CHECK(table == it->second.table, "block table of request ", id, " differs from the model");
    for (int32_t b : table) {
      FUZZ_CHECK(b >= 0 && b < n, "request ", id, " holds block ", b);
      ++refs[b];
    }
    FUZZ_CHECK(std::set<int32_t>(table.begin(), table.end()).size() == table.size(), "request ", id,
               " holds a block twice");
  }
  for (int32_t b = 0; b < n; ++b) {
    FUZZ_CHECK(kv.ref_count(b) == refs[b] && refs[b] == model.blocks[b].ref, "block ", b, ": ref_count=",
               kv.ref_count(b), ", held by ", refs[b], " tables, model ", model.blocks[b].ref);
    FUZZ_CHECK(kv.is_cached(b) == model.blocks[b].cached, "is_cached(", b, ")");
    FUZZ_CHECK(kv.cached_tokens(b) == model.blocks[b].tokens, "cached tokens of block ", b);
  }
  // A request's hashed blocks hold exactly its tokens (its own, or a verified hit's).
  for (const auto& [id, r] : reqs) {
    if (r.is_copy) continue;
    for (int32_t i = 0; i < r.num_hashed; ++i) {
      const ShadowBlock& b = model.blocks[r.table[i]];
      const auto chunk = std::span<const int32_t>(r.tokens).subspan(static_cast<size_t>(i) * model.bs, model.bs);
      FUZZ_CHECK(b.cached && std::equal(chunk.begin(), chunk.end(), b.tokens.begin(), b.tokens.end()),
                 "hashed block ", i, " of request ", id, " does not hold the request's tokens");
    }
  }
}

void fuzz_manager(FuzzInput& in) {
  const int32_t n = in.chance(3, 4) ? in.range32(1, 16) : in.range32(1, 40), bs = in.range32(1, 5);
  const bool caching = !in.chance(1, 8);
  const int hash_bits = in.pick(std::vector<int>{1, 2, 4, 64});
  KVCacheManager kv(n, bs, caching, hash_bits);
  ShadowPool model(n, bs, caching);
  const int32_t vocab = in.pick(Ids{1, 2, 3, 50});
  std::map<int64_t, ShadowRequest> reqs;
  std::set<int64_t> ids_seen;
  std::vector<Ids> history;
  int64_t queries = 0, query_tokens = 0, hit_tokens = 0;
  ComputedBlocks last_hit;  // the last lookup's result, with its query
  Ids last_hit_tokens;
  Keys last_hit_extra;
  auto snap = [&] {
    Flat f;
    f.add_all(kv.free_block_ids());
    for (int32_t b = 0; b < n; ++b) {
      f.add(kv.ref_count(b));
      f.add_all(kv.cached_tokens(b));
    }
    for (int64_t id : ids_seen) {
      f.add(kv.has_request(id));
      if (kv.has_request(id)) f.add_all(kv.block_table(id));
    }
    const auto s = kv.stats();
    for (int64_t x : {s.prefix_cache_queries, s.prefix_cache_query_tokens, s.prefix_cache_hit_tokens, s.evictions}) f.add(x);
    return f.v;
  };
  auto pick_id = [&] {
    if (!reqs.empty() && in.chance(3, 4)) {
      auto it = reqs.begin();
      std::advance(it, in.range(0, static_cast<int64_t>(reqs.size()) - 1));
      return it->first;
    }
    if (in.chance(1, 32)) return in.pick(std::vector<int64_t>{std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()});
    return in.range(0, 12);
  };
  auto make_extra = [&](size_t num_blocks) {
    Keys keys;
    if (in.chance(1, 3)) for (size_t i = 0; i < num_blocks; ++i) keys.push_back(in.chance(1, 3) ? in.range(1, 2) : 0);
    return keys;
  };

  // lookup: the longest verified chain, checked against the model's walk.
  auto lookup = [&](const Ids& tokens, const Keys& extra) {
    const size_t num_full = tokens.size() / static_cast<size_t>(bs);
    ComputedBlocks hit;
    const bool bad = !extra.empty() && extra.size() < num_full;
    if (!attempt("lookup", bad ? kInvalid : kOk, [&] { hit = kv.lookup(tokens, extra); }, snap)) return false;
    ++queries;
    query_tokens += static_cast<int64_t>(tokens.size());
    // The model's walk: every verified match of each position is an accepted parent of the next.
    Ids frontier{kNoBlock};
    size_t depth = 0;
    for (; caching && depth < num_full; ++depth) {
      const auto chunk = std::span<const int32_t>(tokens).subspan(depth * bs, bs);
      Ids next = model.find(nullptr, chunk, extra.empty() ? 0 : extra[depth], frontier);
      if (next.empty()) break;
      frontier = next;
    }
    FUZZ_CHECK(hit.num_tokens == static_cast<int32_t>(depth) * bs && hit.block_ids.size() == depth &&
                   hit.epochs.size() == depth,
               "lookup hit ", hit.num_tokens, " tokens, the model ", depth * bs);
    for (size_t i = 0; i < depth; ++i) {  // a chain of current blocks holding exactly the query
      const int32_t id = hit.block_ids[i];
      const ShadowBlock& b = model.blocks[id];
      const auto chunk = std::span<const int32_t>(tokens).subspan(i * bs, bs);
      FUZZ_CHECK(b.cached && b.epoch == hit.epochs[i] &&
                     std::equal(chunk.begin(), chunk.end(), b.tokens.begin(), b.tokens.end()) &&
                     b.extra == (extra.empty() ? 0 : extra[i]),
                 "hit block ", id, " at position ", i, " does not hold the query's tokens and extra key");
      const int32_t parent = i == 0 ? kNoBlock : hit.block_ids[i - 1];
      FUZZ_CHECK(b.parent == parent && (parent == kNoBlock || b.parent_epoch == model.blocks[parent].epoch),
                 "hit block ", id, " at position ", i, " is not chained to the previous hit block");
    }
    if (depth > 0) {
      ++g.hits;
      if (frontier.size() > 1) ++g.hit_on_duplicate;
      const bool any_used = std::any_of(frontier.begin(), frontier.end(), [&](int32_t b) { return model.blocks[b].ref > 0; });
      FUZZ_CHECK(!any_used || model.blocks[hit.block_ids.back()].ref > 0,
                 "lookup ended its chain on a free block although a used one matched");
    }
    hit_tokens += hit.num_tokens;
    last_hit = hit;
    last_hit_tokens = tokens;
    last_hit_extra = extra;
    return true;
  };

  // allocate, with `hit` (the last lookup's result, maybe stale or tampered) or without.
  auto allocate = [&](int64_t id, int32_t num_tokens, const ComputedBlocks* hit) {
    auto it = reqs.find(id);
    const int64_t have = it == reqs.end() ? 0 : static_cast<int64_t>(it->second.table.size());
    unsigned expect = kOk;
    int64_t available = static_cast<int64_t>(model.free_list.size());
    if (num_tokens < 0) {
      expect = kInvalid;
    } else if (hit != nullptr && (have != 0 || hit->epochs.size() != hit->block_ids.size() ||
                                  hit->num_tokens != static_cast<int64_t>(hit->block_ids.size()) * bs ||
                                  num_tokens < hit->num_tokens)) {
      expect = kInvalid;
    } else if (hit != nullptr) {
      for (size_t i = 0; i < hit->block_ids.size(); ++i) {
        const ShadowBlock& b = model.blocks[hit->block_ids[i]];
        if (!b.cached || b.epoch != hit->epochs[i]) expect = kState;
        if (b.ref == 0) --available;
      }
      if (expect == kState) ++g.stale_computed;
    }
    bool ok = false;
    if (!attempt("allocate", expect, [&] { ok = kv.allocate(id, num_tokens, hit); }, snap)) return;
    const int64_t num_have = hit != nullptr ? static_cast<int64_t>(hit->block_ids.size()) : have;
    const int64_t num_new = std::max<int64_t>(0, (int64_t{num_tokens} + bs - 1) / bs - num_have);
    FUZZ_CHECK(ok == (num_new <= available), "allocate(", id, ", ", num_tokens, ") returned ", ok, " with ",
               available, " blocks available for ", num_new);
    ids_seen.insert(id);
    if (!ok) return;
    ShadowRequest& r = reqs[id];
    if (hit != nullptr) {  // the request's sequence is the query; its head is the hit
      for (int32_t b : hit->block_ids) model.add_ref(b);
      r.table = hit->block_ids;
      r.num_hashed = static_cast<int32_t>(hit->block_ids.size());
      r.tokens = last_hit_tokens;
      r.extra = last_hit_extra;
    }
    model.allocate(static_cast<int32_t>(num_new), r.table);
  };

  // cache_full_blocks of the request's own sequence (`extra` tampered now and then).
  auto cache = [&](int64_t id, int32_t num_tokens) {
    auto it = reqs.find(id);
    static const Ids kNone;
    const Ids& tokens = it == reqs.end() ? kNone : it->second.tokens;
    const int64_t capacity = it == reqs.end() ? 0 : static_cast<int64_t>(it->second.table.size()) * bs;
    const int32_t num_full = std::max(num_tokens / bs, 0);
    Keys extra = it == reqs.end() ? Keys{} : it->second.extra;
    if (!extra.empty() && extra.size() < static_cast<size_t>(num_full)) extra.resize(num_full, 0);
    if (in.chance(1, 32) && !extra.empty()) extra.pop_back();
    unsigned expect = kOk;
    if (it == reqs.end()) expect = kIndex;
    else if (num_tokens < 0 || static_cast<size_t>(num_tokens) > tokens.size() || num_tokens > capacity ||
             (!extra.empty() && extra.size() < static_cast<size_t>(num_full))) expect = kInvalid;
    if (!attempt("cache_full_blocks", expect, [&] { kv.cache_full_blocks(id, tokens, num_tokens, extra); }, snap)) return;
    ShadowRequest& r = it->second;
    if (!caching) return;
    for (int32_t i = r.num_hashed; i < num_full; ++i) {
      model.cache(r.table[i], 0, std::span<const int32_t>(tokens).subspan(static_cast<size_t>(i) * bs, bs),
                  extra.empty() ? 0 : extra[i], i == 0 ? kNoBlock : r.table[i - 1]);
    }
    r.num_hashed = std::max(r.num_hashed, num_full);
  };

  // Appends tokens to a request's sequence (and sometimes new extra keys for its unhashed blocks).
  auto append = [&](ShadowRequest& r) {
    const size_t add = static_cast<size_t>(in.range(1, 2 * bs));
    Ids more = make_tokens(in, history, r.tokens.size() + add, vocab);
    r.tokens.insert(r.tokens.end(), more.end() - static_cast<ptrdiff_t>(add), more.end());
    if (in.chance(1, 4)) {
      Keys keys = make_extra(r.tokens.size() / bs + 1);
      if (!keys.empty()) {
        for (size_t i = 0; i < static_cast<size_t>(r.num_hashed) && i < r.extra.size(); ++i) keys[i] = r.extra[i];
        r.extra = keys;
      }
    }
  };
  auto own = [&](int64_t id) {  // a request the harness may extend (not a share() copy)
    auto it = reqs.find(id);
    return it != reqs.end() && !it->second.is_copy ? &it->second : nullptr;
  };

  while (!in.empty()) {
    ++g.ops;
    const int op = in.byte() % 12;
    if (op <= 1) {  // lookup alone: its result may be used (or be stale) later
      const size_t len = static_cast<size_t>(in.range(0, 4 * bs + 2));
      Ids tokens = make_tokens(in, history, len, vocab);
      Keys extra = make_extra(len / bs + in.range(0, 1));
      if (in.chance(1, 32) && !extra.empty()) extra.pop_back();
      lookup(tokens, extra);
    } else if (op == 2) {  // admission: lookup, then allocate the whole query under a new id
      const size_t len = static_cast<size_t>(in.range(1, 4 * bs + 2));
      const Ids tokens = make_tokens(in, history, len, vocab);
      if (lookup(tokens, make_extra(len / bs + 1))) {
        const int64_t id = in.range(0, 12);
        if (reqs.count(id) == 0) allocate(id, static_cast<int32_t>(len), &last_hit);
      }
    } else if (op <= 4) {  // allocate with the last lookup (maybe stale, maybe tampered) or without
      const int64_t id = pick_id();
      if (reqs.count(id) != 0 && own(id) == nullptr) continue;
      if (in.chance(1, 2)) {
        ComputedBlocks hit = last_hit;
        if (in.chance(1, 32)) hit.num_tokens += 1;
        if (in.chance(1, 32) && !hit.epochs.empty()) hit.epochs.pop_back();
        allocate(id, in.chance(1, 32) ? -1 : hit.num_tokens + in.range32(-1, 3 * bs), &hit);
      } else {
        const int32_t base = reqs.count(id) ? static_cast<int32_t>(reqs[id].tokens.size()) : 0;
        int32_t num_tokens = in.chance(1, 32) ? -1 : base + in.range32(-1, 2 * bs);
        if (in.chance(1, 64)) num_tokens = std::numeric_limits<int32_t>::max();  // no overflow
        allocate(id, num_tokens, nullptr);
      }
    } else if (op <= 6) {  // a decode step: append tokens, grow the table to hold them, cache full blocks
      const int64_t id = pick_id();
      ShadowRequest* r = own(id);
      if (r == nullptr) continue;
      append(*r);
      allocate(id, static_cast<int32_t>(r->tokens.size()), nullptr);
      cache(id, std::min<int32_t>(static_cast<int32_t>(r->tokens.size()),
                                  static_cast<int32_t>(reqs[id].table.size()) * bs));
    } else if (op == 7) {  // append only, or cache_full_blocks with any count
      const int64_t id = pick_id();
      ShadowRequest* r = own(id);
      if (reqs.count(id) != 0 && r == nullptr) continue;
      if (r != nullptr && in.chance(1, 2)) append(*r);
      else cache(id, in.chance(1, 8) ? in.range32(-1, 6 * bs) : in.range32(0, r ? static_cast<int32_t>(r->tokens.size()) : 0));
    } else if (op == 8) {  // share: the copy holds the same blocks
      const int64_t src = pick_id(), dst = in.range(0, 14);
      const unsigned expect = reqs.count(src) == 0 ? kIndex : reqs.count(dst) != 0 ? kInvalid : kOk;
      if (attempt("share", expect, [&] { kv.share(src, dst); }, snap)) {
        ShadowRequest copy = reqs[src];
        copy.is_copy = true;
        for (int32_t b : copy.table) model.add_ref(b);
        reqs[dst] = copy;
        ids_seen.insert(dst);
      }
    } else if (op <= 10) {  // free, tail first
      const int64_t id = pick_id();
      auto it = reqs.find(id);
      if (attempt("free", it == reqs.end() ? kIndex : kOk, [&] { kv.free(id); }, snap)) {
        for (auto b = it->second.table.rbegin(); b != it->second.table.rend(); ++b) model.release(*b);
        reqs.erase(it);
      }
    } else {  // reset_prefix_cache, can_allocate
      const bool empty = kv.reset_prefix_cache();
      FUZZ_CHECK(empty == model.reset(), "reset_prefix_cache returned ", empty);
      const int32_t k = in.range32(-1, n + 1);
      bool can = false;
      if (attempt("can_allocate", k < 0 ? kInvalid : kOk, [&] { can = kv.can_allocate(k); }, snap)) {
        FUZZ_CHECK(can == (k <= static_cast<int32_t>(model.free_list.size())), "can_allocate(", k, ")");
      }
    }
    const auto s = kv.stats();
    FUZZ_CHECK(s.prefix_cache_queries == queries && s.prefix_cache_query_tokens == query_tokens &&
                   s.prefix_cache_hit_tokens == hit_tokens,
               "prefix-cache counters differ from the lookups made");
    check_manager(kv, model, reqs, ids_seen);
  }
  g.evictions += model.evictions;
  while (!reqs.empty()) {
    kv.free(reqs.begin()->first);
    for (auto b = reqs.begin()->second.table.rbegin(); b != reqs.begin()->second.table.rend(); ++b) model.release(*b);
    reqs.erase(reqs.begin());
  }
  FUZZ_CHECK(kv.reset_prefix_cache() && model.reset(), "the prefix cache is not empty with every request freed");
  check_manager(kv, model, reqs, ids_seen);
  FUZZ_CHECK(kv.num_blocks_free() == n, "pool not whole at the end");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzInput in(data, size);
  ++g.inputs;
  try {
    fuzz_manager(in);
  } catch (const std::exception& e) {
    FUZZ_CHECK(false, "unexpected exception: ", e.what());
  }
  return 0;
}

bool tidal::fuzz::fuzz_report(bool require) {
  std::fprintf(stderr,
               "fuzz_kv_cache_manager: %lld inputs, %lld ops, %lld evictions, %lld lookup hits (%lld ending on "
               "duplicate blocks), %lld allocations with a stale lookup result\n",
               (long long)g.inputs, (long long)g.ops, (long long)g.evictions, (long long)g.hits,
               (long long)g.hit_on_duplicate, (long long)g.stale_computed);
  return !require || (g.evictions > 0 && g.hits > 0 && g.hit_on_duplicate > 0 && g.stale_computed > 0);
}
