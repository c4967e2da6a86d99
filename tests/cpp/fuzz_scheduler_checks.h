// SPDX-License-Identifier: Apache-2.0
// The checks of the Scheduler fuzz harness (fuzz_scheduler.cpp): Model, what the harness knows from
// the calls it made; check_state, every invariant that holds between two calls; and schedule() and
// update(), which make those calls and check each result against the contract (the batch arrays,
// the budget, preemption, admission with verified prefix hits; what update() must do to each
// request, which requests finish and why).
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <set>
#include <span>
#include <vector>

#include "fuzz_driver.h"
#include "tidal/sched/scheduler.h"

namespace tidal::fuzz {

using sched::FinishedRequest;
using sched::Request;
using sched::Scheduler;
using sched::SchedulerConfig;
using sched::SchedulerOutput;
using sched::StopParams;
using S = sched::RequestStatus;

struct Counters {
  int64_t inputs = 0, ops = 0, steps = 0, admitted = 0, admitted_with_hit = 0, preemptions = 0,
          stopped = 0, length = 0, aborted = 0, finished_by_engine = 0, held = 0, computed_added = 0,
          share_deadlocks = 0, rejected_calls = 0;
};
inline Counters g;  // paths reached, over all inputs (fuzz_report)

// What the harness knows of the scheduler, from the calls it made and their results.
struct Model {
  struct Req {
    Ids prompt;
    StopParams stop;
    bool disagg = false;  // from add_computed_request
  };
  struct BlockRecord {  // a cached block's content, as first seen in a running request's table
    Ids tokens;
    uint64_t extra_key = 0;
  };
  std::map<int64_t, Req> present;  // has_request(): added and not removed (finished until the next schedule())
  std::set<int64_t> live;          // present and not finished: running or waiting
  std::set<int64_t> held, reserved;
  std::set<int64_t> ids_seen;      // every id passed to a call
  std::set<int64_t> unhashed;      // add_computed_request'ed, no update() since: blocks not cached yet
  std::map<int32_t, BlockRecord> records;
  std::vector<Ids> history;        // earlier prompts, whose prefixes new prompts reuse
  int64_t next_id = 0;
  int64_t schedule_calls = 0;
  bool pending = false;            // `last` awaits update()
  SchedulerOutput last, older;
};

inline bool contains(const std::vector<int32_t>& v, int32_t x) { return std::find(v.begin(), v.end(), x) != v.end(); }
inline bool contains(const std::vector<int64_t>& v, int64_t x) { return std::find(v.begin(), v.end(), x) != v.end(); }

inline std::vector<int64_t> snapshot(const Scheduler& s, const Model& m) {
  Flat f;
  f.add_all(s.running_ids());
  f.add_all(s.waiting_ids());
  f.add(s.num_preemptions());
  for (int64_t id : m.ids_seen) {
    f.add(s.has_request(id));
    if (s.has_request(id)) {
      const Request& r = s.request(id);
      for (int64_t x : {int64_t(r.status()), int64_t{r.num_computed_tokens()}, int64_t{r.num_preemptions()},
                        int64_t{r.num_cached_prompt_tokens()}, int64_t{r.is_prompt_computed()}}) {
        f.add(x);
      }
      f.add_all(r.token_ids());
    }
    f.add(s.kv_cache().has_request(id));
    if (s.kv_cache().has_request(id)) f.add_all(s.kv_cache().block_table(id));
  }
  const auto& kv = s.kv_cache();
  f.add_all(kv.free_block_ids());
  for (int32_t b = 0; b < kv.num_blocks_total(); ++b) {
    f.add(kv.ref_count(b));
    f.add_all(kv.cached_tokens(b));
  }
  const auto st = kv.stats();
  for (int64_t x : {st.prefix_cache_queries, st.prefix_cache_query_tokens, st.prefix_cache_hit_tokens, st.evictions}) f.add(x);
  return f.v;
}

inline uint64_t extra_key(const Request& r, size_t block) {
  return r.extra_keys().empty() ? 0 : r.extra_keys()[block];
}

// Everything that must hold between any two calls.
inline void check_state(const Scheduler& s, Model& m) {
  const SchedulerConfig& c = s.config();
  const auto& kv = s.kv_cache();
  const int32_t n = kv.num_blocks_total(), bs = c.block_size;
  FUZZ_CHECK(kv.num_blocks_free() + kv.num_blocks_used() == n, "free ", kv.num_blocks_free(), " + used ",
             kv.num_blocks_used(), " != total ", n);
  const Ids free_ids = kv.free_block_ids();
  FUZZ_CHECK(static_cast<int32_t>(free_ids.size()) == kv.num_blocks_free(), "free list holds ", free_ids.size(),
             " blocks, num_blocks_free=", kv.num_blocks_free());
  std::vector<int32_t> is_free(static_cast<size_t>(n), 0);
  for (int32_t b : free_ids) FUZZ_CHECK(b >= 0 && b < n && is_free[b]++ == 0, "free list holds block ", b, " twice or out of range");

  // Each request in exactly one place, with a status that matches it.
  const auto& running = s.running_ids();
  const std::vector<int64_t> waiting = s.waiting_ids();
  FUZZ_CHECK(s.num_running() == static_cast<int32_t>(running.size()) && s.num_waiting() == static_cast<int32_t>(waiting.size()),
             "num_running/num_waiting disagree with the id lists");
  FUZZ_CHECK(s.has_unfinished_requests() == (!running.empty() || !waiting.empty()), "has_unfinished_requests");
  FUZZ_CHECK(running.size() <= static_cast<size_t>(c.max_num_seqs), running.size(), " running > max_num_seqs");
  std::set<int64_t> seen;
  for (int64_t id : running) {
    FUZZ_CHECK(seen.insert(id).second, "request ", id, " listed twice");
    FUZZ_CHECK(s.has_request(id) && s.request(id).status() == S::kRunning, "running request ", id, " is ",
               s.has_request(id) ? status_name(s.request(id).status()) : "unknown");
  }
  for (int64_t id : waiting) {
    FUZZ_CHECK(seen.insert(id).second, "request ", id, " both running and waiting, or waiting twice");
    const Request& r = s.request(id);
    FUZZ_CHECK(r.status() == S::kWaiting || r.status() == S::kPreempted, "waiting request ", id, " is ", status_name(r.status()));
    FUZZ_CHECK(r.num_computed_tokens() == 0 && !kv.has_request(id), "waiting request ", id, " holds KV");
  }
  FUZZ_CHECK(seen == std::set<int64_t>(m.live.begin(), m.live.end()), "running + waiting != the live requests");
  for (int64_t id : m.ids_seen) FUZZ_CHECK(s.has_request(id) == (m.present.count(id) != 0), "has_request(", id, ")");
  for (const auto& [id, q] : m.present) {
    const Request& r = s.request(id);
    FUZZ_CHECK(std::equal(q.prompt.begin(), q.prompt.end(), r.prompt_token_ids().begin(), r.prompt_token_ids().end()),
               "prompt of request ", id, " changed");
    FUZZ_CHECK(r.is_finished() == (m.live.count(id) == 0), "request ", id, " is ", status_name(r.status()));
    FUZZ_CHECK(!r.is_finished() || !kv.has_request(id), "finished request ", id, " still holds blocks");
    FUZZ_CHECK(r.num_tokens() <= c.max_model_len && r.num_output_tokens() <= q.stop.max_tokens, "request ", id,
               " has ", r.num_tokens(), " tokens, ", r.num_output_tokens(), " outputs");
    FUZZ_CHECK(r.status() != S::kRunning || r.num_computed_tokens() < r.num_tokens(), "running request ", id,
               " has nothing left to compute");
  }

  // Block tables: owners are exactly the running requests, holds and reservations; ref counts are
  // the number of tables holding each block.
  std::set<int64_t> owners(running.begin(), running.end());
  owners.insert(m.held.begin(), m.held.end());
  owners.insert(m.reserved.begin(), m.reserved.end());
  for (int64_t id : m.ids_seen) FUZZ_CHECK(kv.has_request(id) == (owners.count(id) != 0), "kv has_request(", id, ")");
  std::vector<int32_t> refs(static_cast<size_t>(n), 0), running_refs(static_cast<size_t>(n), 0);
  for (int64_t id : owners) {
    const Ids& table = kv.block_table(id);
    for (int32_t b : table) {
      FUZZ_CHECK(b >= 0 && b < n, "table of ", id, " holds block ", b);
      ++refs[b];
    }
    FUZZ_CHECK(std::set<int32_t>(table.begin(), table.end()).size() == table.size(), "table of ", id, " holds a block twice");
  }
  for (int32_t b = 0; b < n; ++b) {
    FUZZ_CHECK(kv.ref_count(b) == refs[b], "block ", b, ": ref_count=", kv.ref_count(b), " but ", refs[b], " tables hold it");
    FUZZ_CHECK((refs[b] == 0) == (is_free[b] != 0), "block ", b, " (ref_count ", refs[b], ") free-list membership");
  }
  int32_t num_cached = 0;
  for (int32_t b = 0; b < n; ++b) {
    if (!kv.is_cached(b)) m.records.erase(b);  // evicted: it may be re-cached with other content
    num_cached += kv.is_cached(b);
  }
  FUZZ_CHECK(num_cached == kv.num_blocks_cached() && (c.enable_prefix_caching || num_cached == 0), "num_blocks_cached=",
             kv.num_blocks_cached(), ", counted ", num_cached);

  for (int64_t id : running) {
    const Request& r = s.request(id);
    const Ids& table = kv.block_table(id);
    const int64_t num_blocks = static_cast<int64_t>(table.size());
    FUZZ_CHECK(num_blocks * bs >= r.num_computed_tokens(), "request ", id, " computed ", r.num_computed_tokens(),
               " tokens in ", num_blocks, " blocks");
    FUZZ_CHECK(m.present.at(id).disagg || num_blocks <= (r.num_tokens() + bs - 1) / bs, "request ", id, " holds ",
               num_blocks, " blocks for ", r.num_tokens(), " tokens");
    for (int32_t b : table) {
      // Two requests share a block only through the prefix cache (a hold is not a request).
      FUZZ_CHECK(++running_refs[b] == 1 || kv.is_cached(b), "uncached block ", b, " shared by running requests");
    }
    if (m.unhashed.count(id) != 0) continue;
    for (size_t i = 0; i < table.size(); ++i) {
      const size_t end = (i + 1) * static_cast<size_t>(bs);
      const bool full_computed = end <= static_cast<size_t>(r.num_computed_tokens());
      FUZZ_CHECK(!c.enable_prefix_caching || !full_computed || kv.is_cached(table[i]), "block ", i, " of request ", id,
                 " is full and computed but not cached");
      if (!kv.is_cached(table[i])) continue;
      // A cached block holds exactly this request's tokens (and extra key) at its position.
      const Ids stored = kv.cached_tokens(table[i]);
      FUZZ_CHECK(end <= static_cast<size_t>(r.num_tokens()) &&
                     std::equal(stored.begin(), stored.end(), r.token_ids().begin() + static_cast<ptrdiff_t>(end - bs),
                                r.token_ids().begin() + static_cast<ptrdiff_t>(end)),
                 "cached block ", table[i], " at position ", i, " of request ", id, " holds other tokens");
      auto [rec, inserted] = m.records.try_emplace(table[i], Model::BlockRecord{stored, extra_key(r, i)});
      FUZZ_CHECK(rec->second.tokens == stored && rec->second.extra_key == extra_key(r, i), "cached block ",
                 table[i], " is used by request ", id, " with extra key ", extra_key(r, i), " but was cached with ",
                 rec->second.extra_key);
    }
  }
  const auto st = kv.stats();
  FUZZ_CHECK(st.prefix_cache_hit_tokens <= st.prefix_cache_query_tokens, "more hit tokens than query tokens");
}

struct Before {  // a request's state before a call
  S status;
  int32_t num_tokens, num_computed, num_cached_prompt, num_preemptions;
};

inline std::map<int64_t, Before> before_states(const Scheduler& s, const Model& m) {
  std::map<int64_t, Before> out;
  for (const auto& [id, q] : m.present) {
    const Request& r = s.request(id);
    out[id] = {r.status(), r.num_tokens(), r.num_computed_tokens(), r.num_cached_prompt_tokens(), r.num_preemptions()};
  }
  return out;
}

inline SchedulerOutput schedule(Scheduler& s, Model& m) {
  const std::map<int64_t, Before> before = before_states(s, m);
  const std::vector<int64_t> running_before = s.running_ids();
  const int64_t preemptions_before = s.num_preemptions();
  SchedulerOutput out = s.schedule();  // never throws
  ++g.steps;
  for (auto it = m.present.begin(); it != m.present.end();) {  // finished requests are removed now
    it = m.live.count(it->first) ? std::next(it) : m.present.erase(it);
  }
  const SchedulerConfig& c = s.config();
  const int64_t bs = c.block_size;
  const int32_t num_seqs = out.num_seqs();
  FUZZ_CHECK(out.step == m.schedule_calls, "step=", out.step, " after ", m.schedule_calls, " schedule() calls");
  m.older = std::move(m.last);
  m.last = out;
  m.pending = true;
  ++m.schedule_calls;

  // The batch arrays agree with each other and with the requests.
  FUZZ_CHECK(out.cu_seqlens_q.size() == static_cast<size_t>(num_seqs) + 1 && out.cu_seqlens_q[0] == 0 &&
                 out.cu_seqlens_q.back() == out.num_tokens() && out.positions.size() == out.input_ids.size() &&
                 out.slot_mapping.size() == out.input_ids.size() && out.seq_lens.size() == static_cast<size_t>(num_seqs) &&
                 out.needs_sample.size() == static_cast<size_t>(num_seqs) &&
                 out.num_computed_tokens.size() == static_cast<size_t>(num_seqs) &&
                 out.block_tables.size() == static_cast<size_t>(num_seqs) * out.max_num_blocks,
             "batch array sizes disagree");
  FUZZ_CHECK(out.num_tokens() <= c.max_num_batched_tokens, out.num_tokens(), " tokens > max_num_batched_tokens");
  std::set<int64_t> slots, ids;
  int32_t left = c.max_num_batched_tokens, max_q = 0, max_k = 0, max_blocks = 0;
  bool admitting = false;
  for (int32_t i = 0; i < num_seqs; ++i) {
    const int64_t id = out.request_ids[i];
    FUZZ_CHECK(ids.insert(id).second && s.has_request(id) && s.request(id).status() == S::kRunning, "sequence ", i,
               ": request ", id, " is scheduled twice or not running");
    const Request& r = s.request(id);
    const int32_t q0 = out.cu_seqlens_q[i], q1 = out.cu_seqlens_q[i + 1], num_new = q1 - q0;
    const int32_t computed = out.num_computed_tokens[i];
    FUZZ_CHECK(num_new > 0 && num_new == std::min(r.num_tokens() - computed, left), "request ", id, " got ", num_new,
               " tokens with ", r.num_tokens() - computed, " left to compute and ", left, " in the budget");
    left -= num_new;
    FUZZ_CHECK(out.seq_lens[i] == computed + num_new && computed == r.num_computed_tokens() &&
                   (out.needs_sample[i] != 0) == (out.seq_lens[i] == r.num_tokens()),
               "seq_lens/num_computed_tokens/needs_sample of request ", id);
    max_q = std::max(max_q, num_new);
    max_k = std::max(max_k, out.seq_lens[i]);
    max_blocks = std::max<int32_t>(max_blocks, static_cast<int32_t>((out.seq_lens[i] + bs - 1) / bs));
    const Ids& table = s.kv_cache().block_table(id);
    FUZZ_CHECK(static_cast<int64_t>(table.size()) * bs >= out.seq_lens[i], "request ", id, " lacks blocks for its step");
    for (int32_t t = q0; t < q1; ++t) {
      const int64_t pos = computed + (t - q0);
      const int32_t block = out.block_tables[static_cast<size_t>(i) * out.max_num_blocks + pos / bs];
      FUZZ_CHECK(out.positions[t] == pos && out.input_ids[t] == r.token_ids()[pos] && block == table[pos / bs] &&
                     out.slot_mapping[t] == block * bs + pos % bs,
                 "token ", t, " (request ", id, ", position ", pos, ") has a wrong id, position, block or slot");
      FUZZ_CHECK(slots.insert(out.slot_mapping[t]).second, "two tokens write slot ", out.slot_mapping[t]);
    }
    const Before& b = before.at(id);
    if (contains(running_before, id)) {
      FUZZ_CHECK(!admitting && b.status == S::kRunning && computed == b.num_computed, "running request ", id,
                 " is scheduled after an admitted one or from another position");
      continue;
    }
    // Admitted now: its computed part is a verified prefix-cache hit of whole blocks.
    admitting = true;
    ++g.admitted;
    g.admitted_with_hit += computed > 0;
    FUZZ_CHECK((b.status == S::kWaiting || b.status == S::kPreempted) && computed % bs == 0 && computed < r.num_tokens() &&
                   (c.enable_prefix_caching || computed == 0),
               "admitted request ", id, " (", status_name(b.status), ") starts at ", computed);
    FUZZ_CHECK(r.num_cached_prompt_tokens() ==
                   (b.num_cached_prompt < 0 ? std::min(computed, r.num_prompt_tokens()) : b.num_cached_prompt),
               "num_cached_prompt_tokens of request ", id);
    FUZZ_CHECK(out.preempted_ids.empty(), "request ", id, " admitted in a step that preempted");
  }
  FUZZ_CHECK(out.max_seqlen_q == max_q && out.max_seqlen_k == max_k && out.max_num_blocks == max_blocks,
             "max_seqlen_q/max_seqlen_k/max_num_blocks");

  // Preemption: victims were running, are not in the batch, hold nothing and wait again.
  std::set<int64_t> preempted(out.preempted_ids.begin(), out.preempted_ids.end());
  FUZZ_CHECK(preempted.size() == out.preempted_ids.size() &&
                 s.num_preemptions() == preemptions_before + static_cast<int64_t>(preempted.size()),
             "preempted_ids and num_preemptions disagree");
  for (int64_t id : preempted) {
    const Request& r = s.request(id);
    FUZZ_CHECK(contains(running_before, id) && !ids.count(id) && r.status() == S::kPreempted && r.num_computed_tokens() == 0 &&
                   r.num_preemptions() == before.at(id).num_preemptions + 1,
               "preempted request ", id);
    ++g.preemptions;
  }
  // Every running request is served unless the budget ran out.
  if (out.num_tokens() < c.max_num_batched_tokens) {
    for (int64_t id : s.running_ids()) FUZZ_CHECK(ids.count(id), "running request ", id, " not scheduled with budget left");
  }
  std::set<int64_t> expect_running(running_before.begin(), running_before.end());
  for (int64_t id : preempted) expect_running.erase(id);
  for (int64_t id : out.request_ids) expect_running.insert(id);
  FUZZ_CHECK(expect_running == std::set<int64_t>(s.running_ids().begin(), s.running_ids().end()),
             "running set != (running before - preempted) + admitted");
  // Nothing runs while something waits only when every waiting request waits for a sibling's prompt
  // (share_prompt_with), or when holds and reservations take the blocks.
  if (num_seqs == 0 && s.num_running() == 0 && m.held.empty() && m.reserved.empty()) {
    for (int64_t id : s.waiting_ids()) {
      const Request& r = s.request(id);
      const int64_t src = r.share_prompt_with();
      FUZZ_CHECK(c.enable_prefix_caching && src >= 0 && s.has_request(src) && !s.request(src).is_prompt_computed() &&
                     !s.request(src).is_finished(),
                 "request ", id, " could run in an empty pool but was not admitted");
    }
  }
  return out;
}

// update() of `out` (m.last, or a stale/tampered one) with `sampled`; its outcome is predicted.
inline void update(Scheduler& s, Model& m, const SchedulerOutput& out, const Ids& sampled) {
  const SchedulerOutput& plan = m.last;  // update() applies the last schedule()'s plan, whatever `out` says
  const std::map<int64_t, Before> before = before_states(s, m);
  auto running = [&](int64_t id) { return before.count(id) && before.at(id).status == S::kRunning; };
  unsigned expect = kOk;
  if (!m.pending || out.step != plan.step) {
    expect = kState;
  } else if (sampled.size() != static_cast<size_t>(plan.num_seqs())) {
    expect = kInvalid;
  } else {
    for (int32_t i = 0; i < plan.num_seqs(); ++i) {
      if (plan.needs_sample[i] && running(plan.request_ids[i]) && sampled[i] < 0) expect = kInvalid;
    }
  }
  std::vector<FinishedRequest> finished;
  if (!attempt("update", expect, [&] { finished = s.update(out, sampled); }, [&] { return snapshot(s, m); })) {
    ++g.rejected_calls;
    return;
  }
  m.pending = false;
  const int32_t max_model_len = s.config().max_model_len;
  size_t k = 0;  // next expected entry of `finished`
  std::set<int64_t> in_plan;
  for (int32_t i = 0; i < plan.num_seqs(); ++i) {
    const int64_t id = plan.request_ids[i];
    in_plan.insert(id);
    if (!running(id)) continue;  // aborted or finished since schedule(): skipped
    const Before& b = before.at(id);
    const Request& r = s.request(id);
    const int32_t num_new = plan.cu_seqlens_q[i + 1] - plan.cu_seqlens_q[i];
    FUZZ_CHECK(b.num_computed == plan.num_computed_tokens[i] && r.num_computed_tokens() == b.num_computed + num_new,
               "request ", id, " computed ", r.num_computed_tokens(), ", expected ", b.num_computed + num_new);
    FUZZ_CHECK(r.is_prompt_computed() || r.num_computed_tokens() < r.num_prompt_tokens(), "is_prompt_computed of ", id);
    m.unhashed.erase(id);
    if (s.config().enable_prefix_caching) {
      // Every block the step completed is cached with this request's tokens and extra key, even when
      // the request finished just now (its blocks are free, and keep their hashes).
      const int32_t bs = s.config().block_size;
      for (int32_t j = 0; j < r.num_computed_tokens() / bs; ++j) {
        const int32_t block = plan.block_tables[static_cast<size_t>(i) * plan.max_num_blocks + j];
        const Ids stored = s.kv_cache().cached_tokens(block);
        const auto chunk = r.token_ids().subspan(static_cast<size_t>(j) * bs, bs);
        FUZZ_CHECK(s.kv_cache().is_cached(block) && std::equal(stored.begin(), stored.end(), chunk.begin(), chunk.end()),
                   "block ", j, " (", block, ") of request ", id, " is not cached with its tokens after update()");
        auto [rec, inserted] = m.records.try_emplace(block, Model::BlockRecord{stored, extra_key(r, j)});
        FUZZ_CHECK(rec->second.extra_key == extra_key(r, j), "block ", block, " at position ", j, " of request ", id,
                   " (extra key ", extra_key(r, j), ") was cached with extra key ", rec->second.extra_key);
      }
    }
    S expect_status = S::kRunning;
    if (plan.needs_sample[i]) {
      const int32_t token = sampled[i];
      FUZZ_CHECK(r.num_tokens() == b.num_tokens + 1 && r.token_ids().back() == token, "request ", id,
                 " did not append its sampled token");
      const StopParams& stop = m.present.at(id).stop;
      const int32_t num_out = r.num_output_tokens();
      if (num_out >= stop.min_tokens &&
          (contains(stop.stop_token_ids, token) || (!stop.ignore_eos && contains(stop.eos_token_ids, token)))) {
        expect_status = S::kFinishedStopped;
      } else if (num_out >= stop.max_tokens || r.num_tokens() >= max_model_len) {
        expect_status = S::kFinishedLength;
      }
    } else {
      FUZZ_CHECK(r.num_tokens() == b.num_tokens, "request ", id, " gained a token without a sample");
    }
    FUZZ_CHECK(r.status() == expect_status, "request ", id, " is ", status_name(r.status()), ", expected ",
               status_name(expect_status));
    if (expect_status == S::kRunning) continue;
    FUZZ_CHECK(k < finished.size() && finished[k].request_id == id && finished[k].status == expect_status &&
                   finished[k].num_output_tokens == r.num_output_tokens(),
               "update() did not report request ", id, " as finished (", status_name(expect_status), ")");
    ++k;
    m.live.erase(id);
    (expect_status == S::kFinishedStopped ? g.stopped : g.length) += 1;
  }
  FUZZ_CHECK(k == finished.size(), "update() reported ", finished.size() - k, " unexpected finished requests");
  for (const auto& [id, b] : before) {  // requests outside the plan are untouched
    if (in_plan.count(id)) continue;
    const Request& r = s.request(id);
    FUZZ_CHECK(r.status() == b.status && r.num_tokens() == b.num_tokens && r.num_computed_tokens() == b.num_computed,
               "request ", id, " changed without being in the step");
  }
}


}  // namespace tidal::fuzz
