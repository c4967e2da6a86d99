// SPDX-License-Identifier: Apache-2.0
// Tests of tidal::sched::Scheduler: chunked prefill, the token budget and seat limit, mixed
// prefill + decode, preemption order (FCFS and priority) with recompute, prefix hits on admission,
// share_prompt_with, every stop condition, abort in each state, invalid transitions, argument
// errors, and a randomized run. Every step's batch is checked against the requests, and every
// scenario ends with the KV pool whole (free == total).
#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <set>
#include <stdexcept>
#include <vector>

#include "check.h"
#include "tidal/sched/scheduler.h"
#include "tidal/status.h"

using tidal::sched::FinishedRequest;
using tidal::sched::Policy;
using tidal::sched::Request;
using tidal::sched::RequestStatus;
using tidal::sched::Scheduler;
using tidal::sched::SchedulerConfig;
using tidal::sched::SchedulerOutput;
using tidal::sched::StopParams;
using Ids = std::vector<int32_t>;
using Ids64 = std::vector<int64_t>;
using S = RequestStatus;

namespace {

Ids iota(int32_t n, int32_t start) {
  Ids v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), start);
  return v;
}

SchedulerConfig config(int32_t num_blocks, int32_t block_size, int32_t budget, int32_t max_len,
                       int32_t max_seqs = 256, Policy policy = Policy::kFcfs) {
  SchedulerConfig c;
  c.num_kv_blocks = num_blocks;
  c.block_size = block_size;
  c.max_num_batched_tokens = budget;
  c.max_model_len = max_len;
  c.max_num_seqs = max_seqs;
  c.policy = policy;
  return c;
}

StopParams stop_after(int32_t max_tokens) {
  StopParams p;
  p.max_tokens = max_tokens;
  return p;
}

void check_pool(const Scheduler& s) {
  const auto& kv = s.kv_cache();
  CHECK(kv.num_blocks_free() + kv.num_blocks_used() == kv.num_blocks_total());
}

void check_pool_whole(const Scheduler& s) {
  check_pool(s);
  CHECK(s.kv_cache().num_blocks_free() == s.kv_cache().num_blocks_total());
  CHECK(!s.has_unfinished_requests());
}

// Every array of the batch agrees with the requests' tokens, block tables and the limits.
void check_batch(const Scheduler& s, const SchedulerOutput& out) {
  const SchedulerConfig& c = s.config();
  const int32_t n = out.num_seqs();
  const int64_t bs = c.block_size;
  CHECK(out.num_tokens() <= c.max_num_batched_tokens);
  CHECK(s.num_running() <= c.max_num_seqs);
  CHECK(out.cu_seqlens_q.size() == static_cast<size_t>(n) + 1 && out.cu_seqlens_q[0] == 0);
  CHECK(out.cu_seqlens_q.back() == out.num_tokens());
  CHECK(out.block_tables.size() == static_cast<size_t>(n) * out.max_num_blocks);
  CHECK(std::set<int64_t>(out.request_ids.begin(), out.request_ids.end()).size() ==
        static_cast<size_t>(n));
  std::set<int64_t> slots;
  for (int32_t i = 0; i < n; ++i) {
    const Request& r = s.request(out.request_ids[i]);
    CHECK(r.status() == S::kRunning);
    const int32_t q0 = out.cu_seqlens_q[i], q1 = out.cu_seqlens_q[i + 1];
    CHECK(q1 > q0);
    CHECK(out.seq_lens[i] == out.num_computed_tokens[i] + (q1 - q0));
    CHECK(out.num_computed_tokens[i] == r.num_computed_tokens());
    CHECK(out.seq_lens[i] <= r.num_tokens());
    CHECK((out.needs_sample[i] != 0) == (out.seq_lens[i] == r.num_tokens()));
    const auto& table = s.kv_cache().block_table(r.request_id());
    for (int32_t t = q0; t < q1; ++t) {
      const int64_t pos = out.num_computed_tokens[i] + (t - q0);
      CHECK(out.positions[t] == pos);
      CHECK(out.input_ids[t] == r.token_ids()[static_cast<size_t>(pos)]);
      const int32_t block = out.block_tables[i * out.max_num_blocks + pos / bs];
      CHECK(block == table[static_cast<size_t>(pos / bs)]);
      CHECK(out.slot_mapping[t] == block * bs + pos % bs);
      slots.insert(out.slot_mapping[t]);
    }
  }
  CHECK(slots.size() == static_cast<size_t>(out.num_tokens()));  // no two tokens share a slot
  check_pool(s);
}

// One step: schedule, check the batch, sample `token` for every sequence that needs one.
std::vector<FinishedRequest> step(Scheduler& s, SchedulerOutput* out_copy = nullptr,
                                  int32_t token = 7) {
  SchedulerOutput out = s.schedule();
  check_batch(s, out);
  Ids sampled(out.request_ids.size(), -1);
  for (size_t i = 0; i < sampled.size(); ++i) {
    if (out.needs_sample[i]) sampled[i] = token;
  }
  if (out_copy) *out_copy = out;
  std::vector<FinishedRequest> finished = s.update(out, sampled);
  check_pool(s);
  return finished;
}

int drain(Scheduler& s, int max_steps = 10000) {
  int steps = 0;
  while (s.has_unfinished_requests() && steps < max_steps) {
    step(s);
    ++steps;
  }
  CHECK(steps < max_steps);
  s.schedule();  // removes the finished requests
  check_pool_whole(s);
  return steps;
}

void test_chunked_prefill_and_decode() {
  Scheduler s(config(16, 4, 8, 64));
  s.add_request(1, iota(20, 100), stop_after(3));
  SchedulerOutput out;
  step(s, &out);
  CHECK((out.request_ids == Ids64{1}) && out.num_tokens() == 8 && !out.needs_sample[0]);
  CHECK(out.positions.front() == 0 && out.positions.back() == 7);
  CHECK(out.max_num_blocks == 2 && out.max_seqlen_q == 8 && out.max_seqlen_k == 8);
  step(s, &out);
  CHECK(out.num_tokens() == 8 && out.positions.front() == 8 && out.num_computed_tokens[0] == 8);
  step(s, &out);
  CHECK(out.num_tokens() == 4 && out.needs_sample[0] && out.seq_lens[0] == 20);
  CHECK(s.request(1).num_output_tokens() == 1 && s.request(1).num_computed_tokens() == 20);
  step(s, &out);  // decode: the sampled token at position 20
  CHECK(out.num_tokens() == 1 && out.positions[0] == 20 && out.input_ids[0] == 7);
  CHECK(out.max_seqlen_q == 1);
  std::vector<FinishedRequest> fin = step(s, &out);
  CHECK(fin.size() == 1 && fin[0].request_id == 1 && fin[0].status == S::kFinishedLength);
  CHECK(fin[0].num_output_tokens == 3);
  CHECK((s.request(1).output_token_ids().size() == 3));  // readable until the next schedule()
  CHECK(s.schedule().num_seqs() == 0);
  CHECK(!s.has_request(1));
  check_pool_whole(s);
}

void test_budget_mixed_and_seats() {
  Scheduler s(config(64, 4, 10, 128, /*max_seqs=*/2));
  s.add_request(1, iota(3, 1), stop_after(20));
  SchedulerOutput out;
  step(s, &out);  // 1 prefills
  s.add_request(2, iota(30, 50), stop_after(2));
  s.add_request(3, iota(2, 9), stop_after(2));
  step(s, &out);  // 1 decodes, 2 prefills 9 tokens; 3 has no seat
  CHECK((out.request_ids == Ids64{1, 2}));
  CHECK(out.cu_seqlens_q[1] == 1 && out.num_tokens() == 10);
  CHECK(s.num_running() == 2 && s.num_waiting() == 1);
  for (int i = 0; i < 50 && s.has_unfinished_requests(); ++i) {
    step(s, &out);
    CHECK(out.num_tokens() <= 10 && s.num_running() <= 2);
  }
  drain(s);
}

void test_preemption_fcfs_recompute() {
  // 6 blocks of 2 tokens; each request: prompt 4, up to 8 tokens total = 4 blocks.
  Scheduler s(config(6, 2, 64, 12));
  s.add_request(1, Ids{1, 2, 3, 4}, stop_after(4));
  s.add_request(2, Ids{5, 6, 7, 8}, stop_after(4));
  SchedulerOutput out;
  step(s, &out, 11);  // both prefill: 2 + 2 blocks
  step(s, &out, 12);  // both decode at pos 4: 3 + 3 blocks, pool full
  CHECK(out.preempted_ids.empty() && s.kv_cache().num_blocks_free() == 0);
  step(s, &out, 13);  // both at pos 5 fit in their third block
  s.add_request(3, Ids{9}, stop_after(1));
  // 1 needs a 4th block: 2 (latest arrival) is preempted; 1 samples its 4th and last output. A step
  // that preempted admits nothing, and the preempted request waits at the front.
  std::vector<FinishedRequest> fin = step(s, &out, 14);
  CHECK((out.preempted_ids == Ids64{2}) && (out.request_ids == Ids64{1}));
  CHECK((s.waiting_ids() == Ids64{2, 3}));
  CHECK(fin.size() == 1 && fin[0].request_id == 1 && fin[0].status == S::kFinishedLength);
  const Request& r2 = s.request(2);
  CHECK(r2.status() == S::kPreempted && r2.num_computed_tokens() == 0 && r2.num_preemptions() == 1);
  CHECK(r2.num_output_tokens() == 3 && s.num_preemptions() == 1);
  // 2 is readmitted, recomputing prompt + its 3 outputs (a prefix hit covers its cached blocks).
  step(s, &out, 16);
  CHECK((out.request_ids == Ids64{2, 3}) && s.request(2).status() == S::kFinishedLength);
  const int32_t c = out.num_computed_tokens[0];
  CHECK(c % 2 == 0 && c <= 6);
  Ids expected{5, 6, 7, 8, 11, 12, 13};
  CHECK((Ids(out.input_ids.begin(), out.input_ids.begin() + out.cu_seqlens_q[1]) ==
         Ids(expected.begin() + c, expected.end())));
  CHECK(out.positions.front() == c && out.positions[out.cu_seqlens_q[1] - 1] == 6 && out.needs_sample[0]);
  CHECK((s.request(2).output_token_ids().back() == 16));
  drain(s);
}

void test_preemption_priority() {
  // Request 1 arrives first but is least important (priority 5): it is the victim.
  Scheduler s(config(6, 2, 64, 12, 256, Policy::kPriority));
  s.add_request(1, Ids{1, 2, 3, 4}, stop_after(4), /*priority=*/5);
  s.add_request(2, Ids{5, 6, 7, 8}, stop_after(4), /*priority=*/0);
  SchedulerOutput out;
  step(s, &out);
  CHECK((out.request_ids == Ids64{2, 1}));  // running order: most important first
  step(s, &out);
  step(s, &out);
  step(s, &out);
  CHECK((out.preempted_ids == Ids64{1}) && (out.request_ids == Ids64{2}));
  // A newly added, more important request is admitted before the preempted one.
  s.add_request(3, Ids{9, 9, 9}, stop_after(1), /*priority=*/-1);
  CHECK((s.waiting_ids() == Ids64{3, 1}));
  drain(s);
  CHECK(s.num_preemptions() >= 1);
}

void test_self_preemption() {
  // One request alone can always finish; a second cannot fit beside it and preempts itself.
  Scheduler s(config(4, 2, 64, 8));
  s.add_request(1, Ids{1, 2, 3}, stop_after(5));  // 8 tokens = all 4 blocks
  SchedulerOutput out;
  step(s, &out);
  s.add_request(2, Ids{4}, stop_after(5));
  step(s, &out);  // 1 decodes at pos 3 (its 2 blocks), 2 prefills 1 token (a 3rd block)
  CHECK((out.request_ids == Ids64{1, 2}) && s.kv_cache().num_blocks_free() == 1);
  step(s, &out);  // 1 at pos 4 takes the last block; 2 decodes at pos 1
  CHECK((out.request_ids == Ids64{1, 2}) && s.kv_cache().num_blocks_free() == 0);
  step(s, &out);  // 2 at pos 2 needs a block: it is itself the victim
  CHECK((out.preempted_ids == Ids64{2}) && (out.request_ids == Ids64{1}));
  CHECK(s.request(2).status() == S::kPreempted && s.request(2).num_output_tokens() == 2);
  drain(s);
}

void test_prefix_hit_and_share_prompt() {
  Scheduler s(config(32, 4, 64, 64));
  const Ids prompt = iota(14, 100);  // 3 full blocks + 2 tokens
  s.add_request(1, prompt, stop_after(3));
  s.add_request(2, prompt, stop_after(2), 0, /*share_prompt_with=*/1);
  s.add_request(3, Ids{1, 2}, stop_after(1));
  SchedulerOutput out;
  step(s, &out);  // 2 waits for 1's prompt; 3 is admitted past it
  CHECK((out.request_ids == Ids64{1, 3}) && (s.waiting_ids() == Ids64{2}));
  step(s, &out);
  CHECK((out.request_ids == Ids64{1, 2}));
  CHECK(out.num_computed_tokens[1] == 12 && out.cu_seqlens_q[2] - out.cu_seqlens_q[1] == 2);
  CHECK(s.request(2).num_cached_prompt_tokens() == 12 && s.request(1).num_cached_prompt_tokens() == 0);
  // The shared full blocks are the same blocks.
  const auto& t1 = s.kv_cache().block_table(1);
  const auto& t2 = s.kv_cache().block_table(2);
  CHECK(std::equal(t1.begin(), t1.begin() + 3, t2.begin()) && t1[3] != t2[3]);
  drain(s);

  // A later request with the same prompt hits the cached (now free) blocks.
  s.add_request(4, prompt, stop_after(1));
  step(s, &out);
  CHECK(out.num_computed_tokens[0] == 12 && s.request(4).num_cached_prompt_tokens() == 12);
  const auto stats = s.kv_cache().stats();
  CHECK(stats.prefix_cache_hit_tokens >= 24);
  drain(s);

  // Without prefix caching, share_prompt_with does not delay admission.
  SchedulerConfig c = config(32, 4, 64, 64);
  c.enable_prefix_caching = false;
  Scheduler off(c);
  off.add_request(1, prompt, stop_after(1));
  off.add_request(2, prompt, stop_after(1), 0, 1);
  step(off, &out);
  CHECK((out.request_ids == Ids64{1, 2}) && out.num_computed_tokens[1] == 0);
  drain(off);
}

void test_stop_conditions() {
  auto run = [](StopParams p, Ids tokens, int32_t max_len = 64) {
    Scheduler s(config(32, 4, 64, max_len));
    s.add_request(1, Ids{1, 2, 3}, std::move(p));
    FinishedRequest fin{};
    for (size_t i = 0; i < tokens.size() && s.has_unfinished_requests(); ++i) {
      std::vector<FinishedRequest> f = step(s, nullptr, tokens[i]);
      if (!f.empty()) fin = f[0];
    }
    CHECK(!s.has_unfinished_requests());
    s.schedule();
    check_pool_whole(s);
    return fin;
  };
  StopParams p = stop_after(10);
  p.eos_token_ids = {2};
  p.stop_token_ids = {9};
  FinishedRequest f = run(p, {5, 2});
  CHECK(f.status == S::kFinishedStopped && f.num_output_tokens == 2);
  f = run(p, {9});
  CHECK(f.status == S::kFinishedStopped && f.num_output_tokens == 1);
  p.ignore_eos = true;
  f = run(p, {2, 2, 9});  // EOS ignored, stop token still stops
  CHECK(f.status == S::kFinishedStopped && f.num_output_tokens == 3);
  p.ignore_eos = false;
  p.min_tokens = 3;
  f = run(p, {2, 9, 2});  // stops only from the 3rd output on; the 3rd counts
  CHECK(f.status == S::kFinishedStopped && f.num_output_tokens == 3);
  p.min_tokens = 0;
  p.max_tokens = 4;
  f = run(p, {5, 5, 5, 5, 5});
  CHECK(f.status == S::kFinishedLength && f.num_output_tokens == 4);
  p.max_tokens = 1;
  f = run(p, {2});  // stop beats length when both hold
  CHECK(f.status == S::kFinishedStopped);
  p.max_tokens = 100;
  f = run(p, {5, 5, 5, 5, 5, 5, 5}, /*max_len=*/6);  // 3 prompt + 3 outputs = max_model_len
  CHECK(f.status == S::kFinishedLength && f.num_output_tokens == 3);
}

void test_abort_each_state() {
  Scheduler s(config(6, 2, 64, 12));
  s.add_request(1, Ids{1, 2, 3, 4}, stop_after(8));
  s.add_request(2, Ids{5, 6, 7, 8}, stop_after(8));
  s.add_request(3, Ids{9}, stop_after(8));
  SchedulerOutput out;
  step(s, &out);
  CHECK(s.num_running() == 3);
  s.add_request(4, Ids{3, 3}, stop_after(2));
  CHECK(s.abort_request(4));  // waiting
  CHECK(s.request(4).status() == S::kFinishedAborted);
  CHECK(!s.abort_request(4));  // already finished
  CHECK(!s.abort_request(99));  // unknown
  for (int i = 0; i < 6 && s.num_preemptions() == 0; ++i) step(s, &out);
  CHECK(s.num_preemptions() >= 1);
  const int64_t victim = out.preempted_ids.at(0);
  CHECK(s.request(victim).status() == S::kPreempted);
  CHECK(s.abort_request(victim));  // preempted
  CHECK(s.num_waiting() == 0);
  // Running, between schedule() and update(): update() skips it.
  out = s.schedule();
  const int64_t running = out.request_ids.at(0);
  const int32_t free_before = s.kv_cache().num_blocks_free();
  const int32_t outputs_before = s.request(running).num_output_tokens();
  const int32_t computed_before = s.request(running).num_computed_tokens();
  CHECK(s.abort_request(running));
  CHECK(s.kv_cache().num_blocks_free() > free_before);
  Ids sampled(out.request_ids.size(), 7);
  s.update(out, sampled);
  CHECK(s.request(running).status() == S::kFinishedAborted);
  CHECK(s.request(running).num_output_tokens() == outputs_before);
  CHECK(s.request(running).num_computed_tokens() == computed_before);
  drain(s);
}

void test_finish_request_and_transitions() {
  Scheduler s(config(16, 4, 64, 64));
  s.add_request(1, Ids{1, 2}, stop_after(8));
  s.add_request(2, Ids{1, 2}, stop_after(8));
  CHECK_THROWS(tidal::Error, "request_id=1: invalid transition WAITING -> FINISHED_LENGTH",
               s.finish_request(1, S::kFinishedLength));
  CHECK_THROWS(std::invalid_argument, "status=RUNNING", s.finish_request(1, S::kRunning));
  CHECK_THROWS(std::out_of_range, "request_id=5", s.finish_request(5, S::kFinishedStopped));
  s.finish_request(2, S::kFinishedError);  // waiting -> error
  step(s);
  s.finish_request(1, S::kFinishedStopped);  // a stop string matched
  CHECK(s.request(1).status() == S::kFinishedStopped);
  CHECK_THROWS(tidal::Error, "FINISHED_STOPPED -> FINISHED_ABORTED",
               s.finish_request(1, S::kFinishedAborted));
  drain(s);

  Request r(7, Ids{1}, stop_after(1), 0, 0, -1);
  CHECK_THROWS(tidal::Error, "request_id=7: invalid transition WAITING -> PREEMPTED",
               r.transition(S::kPreempted));
  r.transition(S::kRunning);
  CHECK_THROWS(tidal::Error, "RUNNING -> WAITING", r.transition(S::kWaiting));
  r.transition(S::kPreempted);
  CHECK_THROWS(tidal::Error, "PREEMPTED -> RUNNING", r.transition(S::kRunning));
  r.transition(S::kWaiting);
  r.transition(S::kRunning);
  r.transition(S::kFinishedLength);
  CHECK_THROWS(tidal::Error, "FINISHED_LENGTH -> RUNNING", r.transition(S::kRunning));
  CHECK(r.is_finished() && tidal::sched::is_finished(S::kFinishedError));
  CHECK(!tidal::sched::is_finished(S::kPreempted));
}

void test_errors() {
  auto bad = [](auto mutate, const char* needle) {
    SchedulerConfig c = config(4, 4, 16, 16);
    mutate(c);
    CHECK_THROWS(std::invalid_argument, needle, Scheduler{c});
  };
  bad([](SchedulerConfig& c) { c.num_kv_blocks = 0; }, "num_kv_blocks=0 must be >= 1");
  bad([](SchedulerConfig& c) { c.block_size = -1; }, "block_size=-1");
  bad([](SchedulerConfig& c) { c.max_num_seqs = 0; }, "max_num_seqs=0");
  bad([](SchedulerConfig& c) { c.max_num_batched_tokens = 0; }, "max_num_batched_tokens=0 must be >= 1");
  bad([](SchedulerConfig& c) { c.max_model_len = 1; }, "max_model_len=1");
  bad([](SchedulerConfig& c) { c.max_model_len = 17; },
      "num_kv_blocks=4 * block_size=4 = 16 tokens cannot hold one request of max_model_len=17");
  bad([](SchedulerConfig& c) { c.policy = static_cast<Policy>(7); }, "policy=7");

  Scheduler s(config(4, 4, 16, 16));
  s.add_request(1, Ids{1}, stop_after(1));
  CHECK_THROWS(std::invalid_argument, "request_id=1 is already known", s.add_request(1, Ids{1}, stop_after(1)));
  CHECK_THROWS(std::invalid_argument, "request_id=-3", s.add_request(-3, Ids{1}, stop_after(1)));
  CHECK_THROWS(std::invalid_argument, "is empty", s.add_request(2, Ids{}, stop_after(1)));
  CHECK_THROWS(std::invalid_argument, "prompt length=16 of request_id=2 must be < max_model_len=16",
               s.add_request(2, iota(16, 0), stop_after(1)));
  CHECK_THROWS(std::invalid_argument, "prompt_token_ids[1]=-2", s.add_request(2, Ids{1, -2}, stop_after(1)));
  CHECK_THROWS(std::invalid_argument, "max_tokens=0", s.add_request(2, Ids{1}, stop_after(0)));
  StopParams p = stop_after(2);
  p.min_tokens = 3;
  CHECK_THROWS(std::invalid_argument, "min_tokens=3 must be in [0, max_tokens=2]", s.add_request(2, Ids{1}, p));
  CHECK_THROWS(std::invalid_argument, "share_prompt_with=2", s.add_request(2, Ids{1}, stop_after(1), 0, 2));
  CHECK(!s.has_request(2) && s.num_waiting() == 1);
  CHECK_THROWS(std::out_of_range, "request_id=9", s.request(9));

  SchedulerOutput out = s.schedule();
  CHECK_THROWS(std::invalid_argument, "sampled_token_ids.size()=2 must equal num_seqs=1",
               s.update(out, Ids{1, 2}));
  CHECK_THROWS(std::invalid_argument, "sampled_token_ids[0]=-1 for request_id=1", s.update(out, Ids{-1}));
  SchedulerOutput again = s.schedule();  // discards `out`: nothing was advanced
  CHECK(again.num_tokens() == 1 && again.num_computed_tokens[0] == 0);
  CHECK_THROWS(tidal::Error, "is not the pending step", s.update(out, Ids{5}));
  s.update(again, Ids{5});
  CHECK_THROWS(tidal::Error, "is not the pending step", s.update(again, Ids{5}));  // applied twice
  drain(s);
}

// Random arrivals, aborts, finish_request calls and sampled tokens over small pools; every step's
// batch is checked, no request is lost or duplicated, and the pool ends whole.
struct RandomTotals {
  int64_t preemptions = 0, stopped = 0, length = 0, hit_tokens = 0;
};

void test_random(uint32_t seed, Policy policy, bool prefix_caching, RandomTotals& totals) {
  std::mt19937 rng(seed);
  auto uniform = [&rng](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  SchedulerConfig c = config(uniform(8, 24), uniform(1, 4) * 2, uniform(4, 40), 24, uniform(1, 6), policy);
  c.enable_prefix_caching = prefix_caching;
  Scheduler s(c);
  std::set<int64_t> live;
  int64_t next_id = 0;
  for (int iter = 0; iter < 300; ++iter) {
    if (iter < 250 && uniform(0, 2) == 0) {
      Ids prompt(static_cast<size_t>(uniform(1, 20)));
      for (int32_t& t : prompt) t = uniform(0, 3);
      StopParams p = stop_after(uniform(1, 12));
      p.eos_token_ids = {3};
      p.min_tokens = uniform(0, p.max_tokens);
      const int64_t share = (!live.empty() && uniform(0, 3) == 0) ? *live.begin() : -1;
      s.add_request(next_id, prompt, p, uniform(-2, 2), share);
      live.insert(next_id++);
    }
    if (!live.empty() && uniform(0, 10) == 0) {
      auto it = live.begin();
      std::advance(it, uniform(0, static_cast<int>(live.size()) - 1));
      CHECK(s.abort_request(*it));
      live.erase(it);
    }
    SchedulerOutput out = s.schedule();
    check_batch(s, out);
    Ids sampled(out.request_ids.size(), -1);
    for (size_t i = 0; i < sampled.size(); ++i) {
      if (out.needs_sample[i]) sampled[i] = uniform(0, 40);
    }
    for (const FinishedRequest& f : s.update(out, sampled)) {
      CHECK(live.erase(f.request_id) == 1);
      (f.status == S::kFinishedStopped ? totals.stopped : totals.length) += 1;
    }
    if (!out.request_ids.empty() && uniform(0, 20) == 0) {
      const int64_t id = out.request_ids[0];
      if (live.count(id)) {
        s.finish_request(id, S::kFinishedStopped);
        live.erase(id);
      }
    }
    CHECK(static_cast<size_t>(s.num_running() + s.num_waiting()) == live.size());
    std::set<int64_t> seen(s.running_ids().begin(), s.running_ids().end());
    for (int64_t id : s.waiting_ids()) CHECK(seen.insert(id).second);
    CHECK(seen == live);
  }
  drain(s);
  totals.preemptions += s.num_preemptions();
  totals.hit_tokens += s.kv_cache().stats().prefix_cache_hit_tokens;
}

}  // namespace

// Asynchronous scheduling: update_pending() plans the next step over placeholder tokens,
// resolve_tokens() gives them; length stops apply at once, stop tokens late (beating length, and
// stopping a request preempted meanwhile); the order of calls is enforced.
void test_pending_tokens() {
  Scheduler s(config(16, 4, 64, 64));
  StopParams p = stop_after(3);
  p.stop_token_ids = {7};
  s.add_request(1, Ids{3, 4, 5}, p);
  s.add_request(2, Ids{6, 6}, stop_after(2));
  SchedulerOutput out = s.schedule();
  CHECK(s.update_pending(out).empty() && s.has_unresolved_tokens());
  SchedulerOutput next = s.schedule();
  check_batch(s, next);  // the placeholders are the decodes' inputs
  CHECK(next.input_ids == Ids({-1, -1}));
  CHECK_THROWS(tidal::Error, "cannot be applied before resolve_tokens", s.update_pending(next));
  CHECK_THROWS(std::invalid_argument, "sampled_token_ids.size()=1 must equal num_seqs=2",
               s.resolve_tokens(Ids{8}));
  CHECK(s.resolve_tokens(Ids{8, 9}).empty());
  CHECK(s.request(1).token_ids().back() == 8 && s.request(2).token_ids().back() == 9);
  std::vector<FinishedRequest> f = s.update_pending(next);  // request 2 reaches max_tokens now
  CHECK(f.size() == 1 && f[0].request_id == 2 && f[0].status == S::kFinishedLength);
  SchedulerOutput third = s.schedule();
  CHECK(third.request_ids == Ids64({1}));
  f = s.resolve_tokens(Ids{7, 2});  // request 1 sampled its stop token; request 2's token stops nothing
  CHECK(f.size() == 1 && f[0].request_id == 1 && f[0].status == S::kFinishedStopped);
  s.update_pending(third);  // the stopped request's extra step is skipped, but still owes its resolve
  CHECK(s.has_unresolved_tokens());
  CHECK(s.resolve_tokens(Ids{-1}).empty() && !s.has_unresolved_tokens());
  CHECK(s.schedule().num_seqs() == 0);
  check_pool_whole(s);

  // a stop token beats length; the request stays readable until its token is known
  Scheduler t(config(16, 4, 64, 64));
  StopParams one = stop_after(1);
  one.eos_token_ids = {2};
  t.add_request(1, Ids{3, 4}, one);
  f = t.update_pending(t.schedule());
  CHECK(f.size() == 1 && f[0].status == S::kFinishedLength);
  CHECK(t.schedule().num_seqs() == 0 && t.request(1).status() == S::kFinishedLength);
  f = t.resolve_tokens(Ids{2});
  CHECK(f.size() == 1 && f[0].status == S::kFinishedStopped && t.request(1).status() == S::kFinishedStopped);
  t.schedule();
  CHECK(!t.has_request(1));
  check_pool_whole(t);
}

int main() {
  test_chunked_prefill_and_decode();
  test_budget_mixed_and_seats();
  test_preemption_fcfs_recompute();
  test_preemption_priority();
  test_self_preemption();
  test_prefix_hit_and_share_prompt();
  test_stop_conditions();
  test_abort_each_state();
  test_finish_request_and_transitions();
  test_errors();
  test_pending_tokens();
  RandomTotals totals;
  for (uint32_t seed = 0; seed < 40; ++seed) {
    test_random(seed, seed % 2 ? Policy::kPriority : Policy::kFcfs, seed % 3 != 0, totals);
  }
  // The random runs reach the paths they are meant to stress.
  CHECK(totals.preemptions > 0 && totals.stopped > 0 && totals.length > 0 && totals.hit_tokens > 0);
  std::fprintf(stderr, "random runs: %lld preemptions, %lld stopped, %lld length, %lld hit tokens\n",
               static_cast<long long>(totals.preemptions), static_cast<long long>(totals.stopped),
               static_cast<long long>(totals.length), static_cast<long long>(totals.hit_tokens));
  return tidal::test::check_failures();
}
