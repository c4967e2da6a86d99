// SPDX-License-Identifier: Apache-2.0
// Fuzz harness for tidal::sched::Scheduler: the input bytes pick a configuration and a sequence of
// calls, valid or not: add_request (prompts sharing prefixes, stop params, priorities,
// share_prompt_with, extra keys), schedule and update with sampled tokens (stale, resized or
// tampered outputs too), abort_request, finish_request, reset_prefix_cache, and the disaggregated
// calls. Each call's outcome is predicted from the documented contract (which throw, what they
// return, what update() must do to each request); after every call the whole state is checked:
// the KV pool's counts and ref counts against the block tables, every table entry, each request in
// exactly one state, finished requests' blocks freed, cached blocks holding exactly the tokens (and
// extra key) of every request using them. Each input ends by draining every request, and the pool
// must then be whole. Driven by fuzz_driver.h's main().
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <map>
#include <set>
#include <span>
#include <vector>

#include "fuzz_driver.h"
#include "fuzz_scheduler_checks.h"
#include "tidal/sched/scheduler.h"

namespace tidal::fuzz {
namespace {

using sched::Policy;
using Keys = std::vector<uint64_t>;

constexpr int32_t kMax32 = std::numeric_limits<int32_t>::max();
constexpr int32_t kMin32 = std::numeric_limits<int32_t>::min();
constexpr int64_t kMax64 = std::numeric_limits<int64_t>::max();
constexpr int64_t kMin64 = std::numeric_limits<int64_t>::min();

// ---- inputs -----------------------------------------------------------------------------------------

StopParams make_stop(FuzzInput& in, int32_t vocab, int32_t min_max_tokens = 1) {
  StopParams p;
  p.max_tokens = in.chance(1, 32) ? in.range32(-1, 0) : min_max_tokens + in.range32(0, 15);
  p.min_tokens = in.chance(1, 32) ? in.range32(-1, p.max_tokens + 1) : in.range32(0, std::max(p.max_tokens, 0) / 2);
  if (in.chance(1, 64)) p.max_tokens = kMax32;  // extremes: no integer overflow anywhere
  if (in.chance(1, 64)) p.min_tokens = in.pick(std::vector<int32_t>{kMin32, kMax32});
  if (in.chance(1, 2)) p.stop_token_ids.push_back(in.range32(0, vocab));
  if (in.chance(1, 3)) p.eos_token_ids.push_back(in.range32(0, vocab));
  p.ignore_eos = in.chance(1, 4);
  return p;
}

int64_t pick_present(FuzzInput& in, const Model& m) {
  if (!m.present.empty() && in.chance(7, 8)) {
    auto it = m.present.begin();
    std::advance(it, in.range(0, static_cast<int64_t>(m.present.size()) - 1));
    return it->first;
  }
  if (in.chance(1, 32)) return in.pick(std::vector<int64_t>{kMin64, kMax64});
  return in.range(-1, m.next_id + 1);
}

int64_t pick_from(FuzzInput& in, const std::set<int64_t>& ids, int64_t lo, int64_t hi) {
  if (!ids.empty() && in.chance(7, 8)) {
    auto it = ids.begin();
    std::advance(it, in.range(0, static_cast<int64_t>(ids.size()) - 1));
    return *it;
  }
  return in.range(lo, hi);
}

// A fresh id most of the time; a used or negative one now and then.
int64_t make_id(FuzzInput& in, Model& m) {
  if (in.chance(1, 64)) return in.pick(std::vector<int64_t>{kMin64, kMax64, kMax64 - 1});
  if (in.chance(1, 16)) return -in.range(1, 3);
  if (in.chance(1, 8) && !m.ids_seen.empty()) return pick_from(in, m.ids_seen, 0, m.next_id);
  return m.next_id++;
}

void step(Scheduler& s, Model& m, FuzzInput& in, int32_t vocab) {
  const SchedulerOutput out = schedule(s, m);
  check_state(s, m);
  Ids sampled(static_cast<size_t>(out.num_seqs()), -1);
  for (size_t i = 0; i < sampled.size(); ++i) {
    if (out.needs_sample[i]) sampled[i] = in.empty() ? static_cast<int32_t>((g.steps + i) % (vocab + 1)) : in.range32(0, vocab);
  }
  update(s, m, out, sampled);
}

void fuzz(FuzzInput& in) {
  SchedulerConfig c;
  if (in.chance(1, 32)) {  // any configuration: invalid ones must be rejected, valid ones built
    c.num_kv_blocks = in.range32(-1, 12);
    c.block_size = in.range32(-1, 4);
    c.max_num_seqs = in.range32(-1, 4);
    c.max_num_batched_tokens = in.range32(-1, 16);
    c.max_model_len = in.range32(-1, 24);
    c.policy = static_cast<Policy>(in.range32(0, 2));
    const bool valid = c.num_kv_blocks >= 1 && c.block_size >= 1 && c.max_num_seqs >= 1 && c.max_num_batched_tokens >= 1 &&
                       c.max_model_len >= 2 && int64_t{c.num_kv_blocks} * c.block_size >= c.max_model_len &&
                       c.policy != static_cast<Policy>(2);
    attempt("Scheduler(config)", valid ? kOk : kInvalid, [&] { Scheduler probe(c); }, [] { return 0; });
    if (!valid) return;
  } else {
    c.block_size = in.range32(1, 8);
    c.num_kv_blocks = std::max(in.range32(1, 32), 2 / c.block_size + 1);
    c.max_model_len = in.range32(2, std::min(64, c.num_kv_blocks * c.block_size));
    c.max_num_seqs = in.range32(1, 8);
    c.max_num_batched_tokens = in.range32(1, 48);
    c.enable_prefix_caching = !in.chance(1, 6);
    c.policy = in.chance(1, 2) ? Policy::kPriority : Policy::kFcfs;
  }
  Scheduler s(c);
  Model m;
  const int32_t vocab = in.pick(Ids{1, 2, 4, 16});
  const int32_t bs = c.block_size, max_len = c.max_model_len;
  auto snap = [&] { return snapshot(s, m); };
  auto counted = [&](bool ok) { g.rejected_calls += !ok; return ok; };

  while (!in.empty()) {
    ++g.ops;
    const int op = in.byte() % 20;
    if (op <= 3) {  // add_request
      const int64_t id = make_id(in, m);
      size_t len = static_cast<size_t>(in.range(1, max_len - 1));
      if (in.chance(1, 32)) len = static_cast<size_t>(in.chance(1, 2) ? 0 : max_len);
      Ids prompt = make_tokens(in, m.history, len, vocab);
      if (in.chance(1, 32) && !prompt.empty()) prompt[in.range(0, static_cast<int64_t>(len) - 1)] = -1;
      StopParams stop = make_stop(in, vocab);
      const int32_t priority = in.chance(1, 32) ? in.pick(std::vector<int32_t>{kMin32, kMax32}) : in.range32(-2, 2);
      int64_t share = -1;
      if (in.chance(1, 4)) share = in.chance(1, 8) ? id : pick_present(in, m);
      Keys extra;
      const size_t num_blocks = (len + bs - 1) / bs;
      if (in.chance(1, 4)) {
        extra.resize(num_blocks + (in.chance(1, 16) ? 1 : 0));
        for (uint64_t& k : extra) k = in.chance(1, 2) ? 0 : in.range(1, 2);
      }
      const bool valid = id >= 0 && m.present.count(id) == 0 && m.reserved.count(id) == 0 && len >= 1 &&
                         len < static_cast<size_t>(max_len) &&
                         std::none_of(prompt.begin(), prompt.end(), [](int32_t t) { return t < 0; }) &&
                         stop.max_tokens >= 1 && stop.min_tokens >= 0 && stop.min_tokens <= stop.max_tokens &&
                         share != id && (extra.empty() || extra.size() == num_blocks);
      if (counted(attempt("add_request", valid ? kOk : kInvalid,
                          [&] { s.add_request(id, prompt, stop, priority, share, extra); }, snap))) {
        m.present[id] = {prompt, stop, false};
        m.live.insert(id);
      }
      m.ids_seen.insert(id);
    } else if (op <= 8) {  // one step: schedule, update with sampled tokens
      step(s, m, in, vocab);
    } else if (op == 9) {  // schedule alone (a later one discards it)
      schedule(s, m);
    } else if (op == 10) {  // update: the last output or an older one, maybe tampered, resized or bad
      const SchedulerOutput& chosen = in.chance(7, 8) ? m.last : m.older;
      SchedulerOutput out = chosen;
      if (in.chance(1, 4)) {  // the plan is kept inside: the output's arrays may be changed freely
        out.request_ids.assign(out.request_ids.size(), 12345);
        out.needs_sample.clear();
        out.cu_seqlens_q.clear();
      }
      Ids sampled(static_cast<size_t>(chosen.num_seqs()), -1);
      for (size_t i = 0; i < sampled.size(); ++i) {
        if (chosen.needs_sample[i] || in.chance(1, 8)) sampled[i] = in.range32(0, vocab);
      }
      if (in.chance(1, 16)) sampled.push_back(0);
      if (in.chance(1, 16) && !sampled.empty()) sampled[in.range(0, static_cast<int64_t>(sampled.size()) - 1)] = -1;
      update(s, m, out, sampled);
    } else if (op == 11) {  // abort_request
      const int64_t id = pick_present(in, m);
      const bool expected = m.live.count(id) != 0;
      FUZZ_CHECK(s.abort_request(id) == expected, "abort_request(", id, ") != ", expected);
      if (expected) {
        FUZZ_CHECK(s.request(id).status() == S::kFinishedAborted, "aborted request ", id);
        m.live.erase(id);
        ++g.aborted;
      }
    } else if (op == 12) {  // finish_request with any status
      const int64_t id = pick_present(in, m);
      const auto status = static_cast<S>(in.range32(0, 6));
      unsigned expect = kOk;
      if (!tidal::sched::is_finished(status)) expect = kInvalid;
      else if (m.present.count(id) == 0) expect = kIndex;
      else if (s.request(id).is_finished()) expect = kState;
      else if (status == S::kFinishedLength && s.request(id).status() != S::kRunning) expect = kState;
      // a preempted request may stop (a stop string or a late token), never end by length
      else if (status == S::kFinishedStopped && s.request(id).status() != S::kRunning &&
               s.request(id).status() != S::kPreempted) expect = kState;
      if (counted(attempt("finish_request", expect, [&] { s.finish_request(id, status); }, snap))) {
        FUZZ_CHECK(s.request(id).status() == status, "finish_request(", id, ") left ", status_name(s.request(id).status()));
        m.live.erase(id);
        ++g.finished_by_engine;
      }
    } else if (op == 13) {  // reset_prefix_cache
      const bool empty = s.reset_prefix_cache();
      const auto& kv = s.kv_cache();
      FUZZ_CHECK(empty == (kv.num_blocks_cached() == 0), "reset_prefix_cache returned ", empty);
      for (int32_t b : kv.free_block_ids()) FUZZ_CHECK(!kv.is_cached(b), "free block ", b, " still cached after a reset");
    } else if (op == 14) {  // hold_blocks: a prefill engine keeps a request's KV for a decode engine
      std::set<int64_t> with_blocks(s.running_ids().begin(), s.running_ids().end());
      with_blocks.insert(m.reserved.begin(), m.reserved.end());
      const int64_t rid = pick_from(in, with_blocks, -2, m.next_id);
      const int64_t hid = in.chance(1, 16) ? in.range(0, 2) : in.chance(1, 32) ? kMin64 : -in.range(1, 6);
      unsigned expect = kOk;
      if (hid >= 0 || m.held.count(hid)) expect = kInvalid;
      else if (!s.kv_cache().has_request(rid)) expect = kIndex;
      const Ids table = expect == kOk ? s.kv_cache().block_table(rid) : Ids{};
      Ids got;
      if (counted(attempt("hold_blocks", expect, [&] { got = s.hold_blocks(rid, hid); }, snap))) {
        FUZZ_CHECK(got == table && s.kv_cache().block_table(hid) == table, "hold_blocks(", rid, ", ", hid, ") table");
        m.held.insert(hid);
        ++g.held;
      }
      m.ids_seen.insert(hid);
    } else if (op == 15) {  // release_blocks
      std::set<int64_t> holders = m.held;
      holders.insert(m.reserved.begin(), m.reserved.end());
      const int64_t id = pick_from(in, holders, -3, m.next_id);
      const bool valid = m.held.count(id) || m.reserved.count(id);
      if (counted(attempt("release_blocks", valid ? kOk : kIndex, [&] { s.release_blocks(id); }, snap))) {
        m.held.erase(id);
        m.reserved.erase(id);
      }
    } else if (op <= 17) {  // reserve_blocks, then (mostly) add_computed_request: KV from a prefill engine
      int64_t id = make_id(in, m);
      const int32_t len = in.range32(2, std::max(2, max_len - 1 + (in.chance(1, 16) ? 1 : 0)));
      if (op == 16 || in.chance(1, 4)) {
        int32_t num_tokens = in.chance(1, 16) ? in.range32(-1, 0) : len + in.range32(-1, 1) * bs;
        if (in.chance(1, 64)) num_tokens = in.pick(std::vector<int32_t>{kMin32, kMax32});
        const bool valid = id >= 0 && m.present.count(id) == 0 && m.reserved.count(id) == 0 && num_tokens >= 1;
        const int64_t num_free = s.kv_cache().num_blocks_free(), need = (int64_t{num_tokens} + bs - 1) / bs;
        bool ok = false;
        if (counted(attempt("reserve_blocks", valid ? kOk : kInvalid, [&] { ok = s.reserve_blocks(id, num_tokens); }, snap))) {
          FUZZ_CHECK(ok == (need <= num_free) && (!ok || s.kv_cache().block_table(id).size() == static_cast<size_t>(need)),
                     "reserve_blocks(", id, ", ", num_tokens, ") returned ", ok, " with ", num_free, " blocks free");
          if (ok) m.reserved.insert(id);
        }
        m.ids_seen.insert(id);
      } else {
        id = pick_from(in, m.reserved, -1, m.next_id);
      }
      if (op == 16) {
        check_state(s, m);
        continue;
      }
      Ids tokens = make_tokens(in, m.history, static_cast<size_t>(len), vocab);
      if (in.chance(1, 32)) tokens[in.range(0, len - 1)] = -1;
      const int32_t num_prompt = in.chance(1, 16) ? in.range32(0, len + 1) : in.range32(1, len);
      const int32_t num_computed = in.chance(1, 16) ? in.range32(0, len) : in.range32(1, len - 1);
      const StopParams stop = make_stop(in, vocab, std::max(1, len - num_prompt + (in.chance(1, 16) ? 0 : 1)));
      const int32_t priority = in.range32(-2, 2);
      const int32_t num_out = len - num_prompt;
      const bool valid = m.reserved.count(id) && num_prompt >= 1 && num_prompt <= len && num_computed >= 1 &&
                         num_computed < len && len < max_len &&
                         std::none_of(tokens.begin(), tokens.end(), [](int32_t t) { return t < 0; }) &&
                         stop.max_tokens >= 1 && stop.min_tokens >= 0 && stop.min_tokens <= stop.max_tokens &&
                         num_out < stop.max_tokens &&
                         static_cast<int64_t>(s.kv_cache().block_table(id).size()) * bs >= num_computed;
      const bool seat = s.num_running() < c.max_num_seqs;
      bool ok = false;
      if (counted(attempt("add_computed_request", valid ? kOk : kInvalid,
                          [&] { ok = s.add_computed_request(id, tokens, num_prompt, num_computed, stop, priority); }, snap))) {
        FUZZ_CHECK(ok == seat, "add_computed_request(", id, ") returned ", ok, " with ", s.num_running(), " running");
        if (ok) {
          const Request& r = s.request(id);
          FUZZ_CHECK(r.status() == S::kRunning && r.num_computed_tokens() == num_computed &&
                         std::equal(tokens.begin(), tokens.end(), r.token_ids().begin(), r.token_ids().end()) &&
                         r.num_prompt_tokens() == num_prompt && r.is_prompt_computed() == (num_computed >= num_prompt) &&
                         r.num_cached_prompt_tokens() == std::min(num_computed, num_prompt),
                     "request ", id, " added with computed KV");
          m.reserved.erase(id);
          m.present[id] = {Ids(tokens.begin(), tokens.begin() + num_prompt), stop, true};
          m.live.insert(id);
          m.unhashed.insert(id);
          ++g.computed_added;
        }
      }
    } else {  // a few steps in a row
      for (int k = in.range32(1, 6); k > 0; --k) {
        step(s, m, in, vocab);
        check_state(s, m);
      }
    }
    check_state(s, m);
  }

  // Drain: give back holds and reservations, run every request to its end; the pool ends whole.
  for (int64_t id : m.held) s.release_blocks(id);
  for (int64_t id : m.reserved) s.release_blocks(id);
  m.held.clear();
  m.reserved.clear();
  check_state(s, m);
  for (int steps = 0; s.has_unfinished_requests(); ++steps) {
    FUZZ_CHECK(steps < 20000, "no progress: ", s.num_running(), " running and ", s.num_waiting(),
               " waiting after 20000 steps");
    step(s, m, in, vocab);
    check_state(s, m);
    if (m.last.num_seqs() == 0 && s.num_running() == 0 && s.has_unfinished_requests()) {
      // Requests waiting on each other's prompts (a share_prompt_with cycle) wait forever, as
      // documented; schedule() checked that nothing else blocks them. End them.
      ++g.share_deadlocks;
      for (int64_t id : s.waiting_ids()) {
        FUZZ_CHECK(s.abort_request(id), "abort_request(", id, ")");
        m.live.erase(id);
      }
    }
  }
  schedule(s, m);  // removes the finished requests
  check_state(s, m);
  const auto& kv = s.kv_cache();
  FUZZ_CHECK(kv.num_blocks_free() == kv.num_blocks_total() && m.present.empty(), "pool not whole after draining: ",
             kv.num_blocks_free(), " of ", kv.num_blocks_total(), " blocks free");
  FUZZ_CHECK(s.reset_prefix_cache() && kv.num_blocks_cached() == 0, "prefix cache not empty with every block free");
}

}  // namespace
}  // namespace tidal::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tidal::fuzz::FuzzInput in(data, size);
  ++tidal::fuzz::g.inputs;
  try {
    tidal::fuzz::fuzz(in);
  } catch (const std::exception& e) {
    FUZZ_CHECK(false, "unexpected exception: ", e.what());
  }
  return 0;
}

bool tidal::fuzz::fuzz_report(bool require) {
  std::fprintf(stderr,
               "fuzz_scheduler: %lld inputs, %lld ops, %lld steps, %lld admitted (%lld with a prefix hit), "
               "%lld preemptions, %lld stopped, %lld length, %lld aborted, %lld finished by the engine, %lld holds, "
               "%lld computed requests added, %lld share_prompt_with cycles, %lld calls rejected\n",
               (long long)g.inputs, (long long)g.ops, (long long)g.steps, (long long)g.admitted,
               (long long)g.admitted_with_hit, (long long)g.preemptions, (long long)g.stopped, (long long)g.length,
               (long long)g.aborted, (long long)g.finished_by_engine, (long long)g.held, (long long)g.computed_added,
               (long long)g.share_deadlocks, (long long)g.rejected_calls);
  return !require || (g.admitted_with_hit > 0 && g.preemptions > 0 && g.stopped > 0 && g.length > 0 && g.aborted > 0 &&
                      g.finished_by_engine > 0 && g.held > 0 && g.computed_added > 0 && g.rejected_calls > 0);
}
