// SPDX-License-Identifier: Apache-2.0
// Scheduler: configuration checks, request admission and validation, the per-step plan (running
// requests first, preemption by recompute, then admission with prefix lookup), update() with the
// stop conditions, abort/finish, and removal of finished requests. The flat batch is in batch.cpp.
#include "tidal/sched/scheduler.h"

#include <algorithm>
#include <unordered_set>
#include <utility>

#include "tidal/status.h"

namespace tidal::sched {

void SchedulerConfig::validate() const {
  TIDAL_CHECK(num_kv_blocks >= 1, "num_kv_blocks=", num_kv_blocks, " must be >= 1");
  TIDAL_CHECK(block_size >= 1, "block_size=", block_size, " must be >= 1");
  TIDAL_CHECK(max_num_seqs >= 1, "max_num_seqs=", max_num_seqs, " must be >= 1");
  TIDAL_CHECK(max_num_batched_tokens >= 1, "max_num_batched_tokens=", max_num_batched_tokens,
              " must be >= 1");
  TIDAL_CHECK(max_model_len >= 2, "max_model_len=", max_model_len,
              " must be >= 2 (one prompt token and one output token)");
  TIDAL_CHECK(static_cast<int64_t>(num_kv_blocks) * block_size >= max_model_len,
              "num_kv_blocks=", num_kv_blocks, " * block_size=", block_size, " = ",
              static_cast<int64_t>(num_kv_blocks) * block_size,
              " tokens cannot hold one request of max_model_len=", max_model_len);
  TIDAL_CHECK(policy == Policy::kFcfs || policy == Policy::kPriority, "policy=",
              static_cast<int32_t>(policy), " must be kFcfs (0) or kPriority (1)");
}

namespace {

const SchedulerConfig& validated(const SchedulerConfig& config) {
  config.validate();
  return config;
}

bool contains(const std::vector<int32_t>& ids, int32_t token) {
  return std::find(ids.begin(), ids.end(), token) != ids.end();
}

}  // namespace

Scheduler::Scheduler(SchedulerConfig config)
    : config_(validated(config)),
      kv_(config_.num_kv_blocks, config_.block_size, config_.enable_prefix_caching) {}

void Scheduler::add_request(int64_t request_id, std::vector<int32_t> prompt_token_ids,
                            StopParams stop, int32_t priority, int64_t share_prompt_with,
                            std::vector<uint64_t> extra_keys) {
  TIDAL_CHECK(request_id >= 0, "request_id=", request_id, " must be >= 0");
  TIDAL_CHECK(!has_request(request_id) && reserved_.count(request_id) == 0, "request_id=", request_id,
              " is already known");
  const size_t num_prompt = prompt_token_ids.size();
  TIDAL_CHECK(num_prompt >= 1, "prompt_token_ids of request_id=", request_id, " is empty");
  TIDAL_CHECK(num_prompt < static_cast<size_t>(config_.max_model_len), "prompt length=", num_prompt,
              " of request_id=", request_id, " must be < max_model_len=", config_.max_model_len);
  for (size_t i = 0; i < num_prompt; ++i) {
    TIDAL_CHECK(prompt_token_ids[i] >= 0, "prompt_token_ids[", i, "]=", prompt_token_ids[i],
                " of request_id=", request_id, " must be >= 0");
  }
  TIDAL_CHECK(stop.max_tokens >= 1, "max_tokens=", stop.max_tokens, " must be >= 1");
  TIDAL_CHECK(stop.min_tokens >= 0 && stop.min_tokens <= stop.max_tokens, "min_tokens=",
              stop.min_tokens, " must be in [0, max_tokens=", stop.max_tokens, "]");
  TIDAL_CHECK(share_prompt_with != request_id, "share_prompt_with=", share_prompt_with,
              " must differ from request_id=", request_id);
  const size_t bs = static_cast<size_t>(config_.block_size);
  const size_t num_prompt_blocks = (num_prompt + bs - 1) / bs;
  TIDAL_CHECK(extra_keys.empty() || extra_keys.size() == num_prompt_blocks, "extra_keys.size()=",
              extra_keys.size(), " of request_id=", request_id, " must be 0 or the ",
              num_prompt_blocks, " blocks of its prompt");

  // NOTE(tidal): the whole sequence is reserved up front so appending outputs never reallocates.
  const int64_t capacity = std::min<int64_t>(config_.max_model_len,
                                             static_cast<int64_t>(num_prompt) + stop.max_tokens);
  prompt_token_ids.reserve(static_cast<size_t>(capacity));
  if (!extra_keys.empty()) extra_keys.resize((static_cast<size_t>(capacity) + bs - 1) / bs, 0);
  auto [it, inserted] = requests_.try_emplace(request_id, request_id, std::move(prompt_token_ids),
                                              std::move(stop), priority, next_arrival_++,
                                              share_prompt_with, std::move(extra_keys));
  QueueKey key = waiting_key(it->second);
  waiting_.insert(key);
  waiting_keys_[request_id] = key;
}

std::vector<int32_t> Scheduler::hold_blocks(int64_t request_id, int64_t hold_id) {
  TIDAL_CHECK(hold_id < 0, "hold_id=", hold_id, " must be < 0");
  TIDAL_CHECK(held_.count(hold_id) == 0, "hold_id=", hold_id, " is already in use");
  kv_.share(request_id, hold_id);
  held_.insert(hold_id);
  return kv_.block_table(hold_id);
}

bool Scheduler::reserve_blocks(int64_t request_id, int32_t num_tokens) {
  TIDAL_CHECK(request_id >= 0, "request_id=", request_id, " must be >= 0");
  TIDAL_CHECK(!has_request(request_id) && reserved_.count(request_id) == 0, "request_id=", request_id,
              " is already known");
  TIDAL_CHECK(num_tokens >= 1, "num_tokens=", num_tokens, " must be >= 1");
  if (!kv_.allocate(request_id, num_tokens)) return false;  // creates no table when it fails
  reserved_.insert(request_id);
  return true;
}

void Scheduler::release_blocks(int64_t id) {
  const bool held = held_.erase(id) != 0;
  const bool reserved = !held && reserved_.erase(id) != 0;
  TIDAL_CHECK_INDEX(held || reserved, "id=", id, " holds no blocks of hold_blocks() or reserve_blocks()");
  kv_.free(id);
}

bool Scheduler::add_computed_request(int64_t request_id, std::vector<int32_t> token_ids,
                                     int32_t num_prompt_tokens, int32_t num_computed_tokens,
                                     StopParams stop, int32_t priority) {
  TIDAL_CHECK(reserved_.count(request_id) != 0, "request_id=", request_id,
              " has no blocks reserved (reserve_blocks)");
  const auto num_tokens = static_cast<int32_t>(token_ids.size());
  TIDAL_CHECK(num_prompt_tokens >= 1 && num_prompt_tokens <= num_tokens, "num_prompt_tokens=",
              num_prompt_tokens, " must be in [1, token_ids.size()=", num_tokens, "]");
  TIDAL_CHECK(num_computed_tokens >= 1 && num_computed_tokens < num_tokens, "num_computed_tokens=",
              num_computed_tokens, " must be in [1, token_ids.size()=", num_tokens, ")");
  TIDAL_CHECK(num_tokens < config_.max_model_len, "token_ids.size()=", num_tokens, " of request_id=", request_id,
              " must be < max_model_len=", config_.max_model_len);
  for (size_t i = 0; i < token_ids.size(); ++i) {
    TIDAL_CHECK(token_ids[i] >= 0, "token_ids[", i, "]=", token_ids[i], " of request_id=", request_id,
                " must be >= 0");
  }
  TIDAL_CHECK(stop.max_tokens >= 1, "max_tokens=", stop.max_tokens, " must be >= 1");
  TIDAL_CHECK(stop.min_tokens >= 0 && stop.min_tokens <= stop.max_tokens, "min_tokens=", stop.min_tokens,
              " must be in [0, max_tokens=", stop.max_tokens, "]");
  const int32_t num_outputs = num_tokens - num_prompt_tokens;
  TIDAL_CHECK(num_outputs < stop.max_tokens, "request_id=", request_id, " already has ", num_outputs,
              " output tokens: max_tokens=", stop.max_tokens, " leaves nothing to generate");
  const int64_t have = static_cast<int64_t>(kv_.block_table(request_id).size()) * config_.block_size;
  TIDAL_CHECK(have >= num_computed_tokens, "request_id=", request_id, " has blocks for ", have,
              " tokens, fewer than num_computed_tokens=", num_computed_tokens);
  if (running_.size() >= static_cast<size_t>(config_.max_num_seqs)) return false;

  const int64_t capacity = std::min<int64_t>(config_.max_model_len,
                                             static_cast<int64_t>(num_prompt_tokens) + stop.max_tokens);
  std::vector<int32_t> prompt(token_ids.begin(), token_ids.begin() + num_prompt_tokens);
  prompt.reserve(static_cast<size_t>(std::max<int64_t>(capacity, num_tokens)));
  auto [it, inserted] = requests_.try_emplace(request_id, request_id, std::move(prompt), std::move(stop),
                                              priority, next_arrival_++, -1);
  Request& r = it->second;
  r.token_ids_.insert(r.token_ids_.end(), token_ids.begin() + num_prompt_tokens, token_ids.end());
  r.transition(RequestStatus::kRunning);
  r.num_computed_tokens_ = num_computed_tokens;
  r.num_cached_prompt_tokens_ = std::min(num_computed_tokens, num_prompt_tokens);
  r.is_prompt_computed_ = num_computed_tokens >= num_prompt_tokens;
  reserved_.erase(request_id);
  insert_running(r);
  return true;
}

Request& Scheduler::mut_request(int64_t request_id) {
  auto it = requests_.find(request_id);
  TIDAL_CHECK_INDEX(it != requests_.end(), "request_id=", request_id, " is not a known request");
  return it->second;
}

const Request& Scheduler::request(int64_t request_id) const {
  auto it = requests_.find(request_id);
  TIDAL_CHECK_INDEX(it != requests_.end(), "request_id=", request_id, " is not a known request");
  return it->second;
}

std::vector<int64_t> Scheduler::waiting_ids() const {
  std::vector<int64_t> ids;
  ids.reserve(waiting_.size());
  for (const QueueKey& key : waiting_) ids.push_back(key.request_id);
  return ids;
}

Scheduler::QueueKey Scheduler::running_key(const Request& r) const {
  const int64_t major = config_.policy == Policy::kPriority ? r.priority() : 0;
  return {major, r.arrival(), r.request_id()};
}

Scheduler::QueueKey Scheduler::waiting_key(const Request& r) {
  if (config_.policy == Policy::kPriority) return {r.priority(), r.arrival(), r.request_id()};
  if (r.status() == RequestStatus::kPreempted) return {0, next_front_--, r.request_id()};
  return {0, r.arrival(), r.request_id()};
}

bool Scheduler::is_admissible(const Request& r) const {
  if (r.share_prompt_with() < 0 || !config_.enable_prefix_caching) return true;
  auto it = requests_.find(r.share_prompt_with());
  if (it == requests_.end()) return true;
  const Request& source = it->second;
  return source.is_prompt_computed() || source.is_finished();
}

// NOTE(tidal): running_ stays sorted by the preemption key, so the victim is always its last entry,
// at or after the request being scheduled: a victim was never scheduled earlier in the same step.
void Scheduler::insert_running(const Request& r) {
  const QueueKey key = running_key(r);
  auto pos = std::upper_bound(running_.begin(), running_.end(), key,
                              [this](const QueueKey& k, int64_t id) {
                                return k < running_key(requests_.at(id));
                              });
  running_.insert(pos, r.request_id());
}

void Scheduler::remove_running(int64_t request_id) {
  auto it = std::find(running_.begin(), running_.end(), request_id);
  TIDAL_CHECK_STATE(it != running_.end(), "request_id=", request_id, " is not in the running list");
  running_.erase(it);
}

void Scheduler::preempt(Request& r) {
  r.transition(RequestStatus::kPreempted);
  kv_.free(r.request_id());
  r.num_computed_tokens_ = 0;
  ++r.num_preemptions_;
  ++num_preemptions_;
  const QueueKey key = waiting_key(r);
  waiting_.insert(key);
  waiting_keys_[r.request_id()] = key;
}

void Scheduler::finish(Request& r, RequestStatus status) {
  const RequestStatus before = r.status();
  r.transition(status);
  if (before == RequestStatus::kRunning) {
    remove_running(r.request_id());
    kv_.free(r.request_id());
  } else {
    auto key = waiting_keys_.find(r.request_id());
    TIDAL_CHECK_STATE(key != waiting_keys_.end(), "request_id=", r.request_id(),
                      " is not in the waiting queue");
    waiting_.erase(key->second);
    waiting_keys_.erase(key);
  }
  finished_.push_back(r.request_id());
}

void Scheduler::remove_finished() {
  // A request whose last token is still a placeholder stays readable until resolve_tokens():
  // its token may turn its length stop into a stop-token stop.
  std::vector<int64_t> kept;
  for (int64_t id : finished_) {
    const bool placeholder = std::any_of(unresolved_.begin(), unresolved_.end(),
                                         [id](const auto& u) { return u.first == id && u.second >= 0; });
    if (placeholder) {
      kept.push_back(id);
    } else {
      requests_.erase(id);
    }
  }
  finished_ = std::move(kept);
}

SchedulerOutput Scheduler::schedule() {
  remove_finished();
  std::vector<Scheduled> scheduled;
  std::vector<int64_t> preempted_ids;
  int32_t budget = config_.max_num_batched_tokens;

  // Running requests, in running order. Each gets as many of its uncomputed tokens as the budget
  // leaves; when its blocks cannot grow, the last running request is preempted and it retries.
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Request& r = requests_.at(running_[i]);
    const int32_t num_new = std::min(r.num_tokens() - r.num_computed_tokens_, budget);
    if (num_new <= 0) {
      ++i;
      continue;
    }
    if (kv_.allocate(r.request_id(), r.num_computed_tokens_ + num_new)) {
      scheduled.push_back({r.request_id(), r.num_computed_tokens_, num_new,
                           r.num_computed_tokens_ + num_new == r.num_tokens()});
      budget -= num_new;
      ++i;
      continue;
    }
    Request& victim = requests_.at(running_.back());
    running_.pop_back();
    preempt(victim);
    preempted_ids.push_back(victim.request_id());
    // When the victim was r itself, i == running_.size() now and the loop ends.
  }

  // Waiting requests, only in a step that preempted nothing (blocks are short otherwise).
  // NOTE(tidal): a block is cached once its KV is computed (update()), so a prompt admitted beside
  // another that starts with the same block would compute the shared prefix a second time. Such a
  // request waits one step instead (skipped, not blocking the queue) and then takes the prefix from
  // the cache: what makes a burst of requests sharing a system prompt pay for it once.
  const int32_t bs = config_.block_size;
  std::unordered_set<uint64_t> first_blocks_in_flight;
  for (auto it = waiting_.begin(); preempted_ids.empty() && it != waiting_.end() && budget > 0 &&
                                   running_.size() < static_cast<size_t>(config_.max_num_seqs);) {
    Request& r = requests_.at(it->request_id);
    if (!is_admissible(r)) {
      ++it;
      continue;
    }
    uint64_t first_block = 0;
    if (config_.enable_prefix_caching && r.num_tokens() >= bs) {
      first_block = kv_.first_block_hash(r.token_ids(), r.extra_keys().empty() ? 0 : r.extra_keys()[0]);
      if (first_blocks_in_flight.count(first_block) != 0) {
        ++it;
        continue;
      }
    }
    // All but the last token: at least one token is computed, so the step can sample.
    const kv::ComputedBlocks hit =
        kv_.lookup(r.token_ids().first(static_cast<size_t>(r.num_tokens() - 1)), r.extra_keys());
    const int32_t num_new = std::min(r.num_tokens() - hit.num_tokens, budget);
    if (!kv_.allocate(r.request_id(), hit.num_tokens + num_new, &hit)) break;  // head of line
    if (config_.enable_prefix_caching && r.num_tokens() >= bs && hit.num_tokens < bs && hit.num_tokens + num_new >= bs) {
      first_blocks_in_flight.insert(first_block);
    }
    if (r.status() == RequestStatus::kPreempted) r.transition(RequestStatus::kWaiting);
    r.transition(RequestStatus::kRunning);
    r.num_computed_tokens_ = hit.num_tokens;
    if (r.num_cached_prompt_tokens_ < 0) {
      r.num_cached_prompt_tokens_ = std::min(hit.num_tokens, r.num_prompt_tokens());
    }
    waiting_keys_.erase(r.request_id());
    it = waiting_.erase(it);
    insert_running(r);
    scheduled.push_back({r.request_id(), hit.num_tokens, num_new,
                         hit.num_tokens + num_new == r.num_tokens()});
    budget -= num_new;
  }

  SchedulerOutput output = build_output(scheduled, std::move(preempted_ids));
  output.step = step_;
  pending_step_ = step_++;
  pending_ = std::move(scheduled);
  return output;
}

std::vector<FinishedRequest> Scheduler::update(const SchedulerOutput& output,
                                               std::span<const int32_t> sampled_token_ids) {
  return apply(output, sampled_token_ids, /*pending=*/false);
}

std::vector<FinishedRequest> Scheduler::update_pending(const SchedulerOutput& output) {
  return apply(output, {}, /*pending=*/true);
}

RequestStatus Scheduler::stop_status(const Request& r, int32_t token) {
  const StopParams& stop = r.stop();
  if (r.num_output_tokens() >= stop.min_tokens &&
      (contains(stop.stop_token_ids, token) || (!stop.ignore_eos && contains(stop.eos_token_ids, token)))) {
    return RequestStatus::kFinishedStopped;
  }
  return RequestStatus::kRunning;
}

std::vector<FinishedRequest> Scheduler::apply(const SchedulerOutput& output,
                                              std::span<const int32_t> sampled_token_ids, bool pending) {
  TIDAL_CHECK_STATE(pending_step_ >= 0 && output.step == pending_step_, "output of step ",
                    output.step, " is not the pending step ", pending_step_,
                    " (stale, already applied, or schedule() was called again)");
  TIDAL_CHECK_STATE(!tokens_pending_, "step ", output.step, " cannot be applied before "
                    "resolve_tokens() gives the tokens of the step update_pending() applied");
  const size_t num_seqs = pending_.size();
  auto live = [this](int64_t id) -> Request* {
    auto it = requests_.find(id);
    return it != requests_.end() && it->second.status() == RequestStatus::kRunning ? &it->second
                                                                                    : nullptr;
  };
  if (!pending) {
    TIDAL_CHECK(sampled_token_ids.size() == num_seqs, "sampled_token_ids.size()=",
                sampled_token_ids.size(), " must equal num_seqs=", num_seqs);
    for (size_t i = 0; i < num_seqs; ++i) {
      TIDAL_CHECK(!pending_[i].needs_sample || live(pending_[i].request_id) == nullptr ||
                      sampled_token_ids[i] >= 0,
                  "sampled_token_ids[", i, "]=", sampled_token_ids[i], " for request_id=",
                  pending_[i].request_id, " must be >= 0 (it needs a sample)");
    }
  }
  pending_step_ = -1;
  const std::vector<Scheduled> plan = std::move(pending_);
  pending_.clear();
  if (pending) {
    unresolved_.assign(num_seqs, {-1, -1});
    tokens_pending_ = true;
  }

  std::vector<FinishedRequest> finished;
  for (size_t i = 0; i < num_seqs; ++i) {
    Request* r = live(plan[i].request_id);
    if (r == nullptr) continue;  // aborted or finished by the engine since schedule()
    r->num_computed_tokens_ += plan[i].num_new;
    kv_.cache_full_blocks(r->request_id(), r->token_ids(), r->num_computed_tokens_, r->extra_keys());
    if (r->num_computed_tokens_ >= r->num_prompt_tokens()) r->is_prompt_computed_ = true;
    if (!plan[i].needs_sample) continue;

    // NOTE(tidal): a placeholder is never inside a block cache_full_blocks hashes: its KV is
    // computed by the next step, whose update comes after resolve_tokens().
    const int32_t token = pending ? -1 : sampled_token_ids[i];
    if (pending) unresolved_[i] = {r->request_id(), r->num_tokens()};
    r->token_ids_.push_back(token);
    const int32_t num_out = r->num_output_tokens();
    RequestStatus status = pending ? RequestStatus::kRunning : stop_status(*r, token);
    if (status == RequestStatus::kRunning &&
        (num_out >= r->stop().max_tokens || r->num_tokens() >= config_.max_model_len)) {
      status = RequestStatus::kFinishedLength;
    }
    if (status != RequestStatus::kRunning) {
      finish(*r, status);
      finished.push_back({r->request_id(), status, num_out});
    }
  }
  return finished;
}

std::vector<FinishedRequest> Scheduler::resolve_tokens(std::span<const int32_t> sampled_token_ids) {
  TIDAL_CHECK_STATE(tokens_pending_, "resolve_tokens() without a step applied by update_pending()");
  const size_t num_seqs = unresolved_.size();
  TIDAL_CHECK(sampled_token_ids.size() == num_seqs, "sampled_token_ids.size()=",
              sampled_token_ids.size(), " must equal num_seqs=", num_seqs);
  for (size_t i = 0; i < num_seqs; ++i) {
    TIDAL_CHECK(unresolved_[i].second < 0 || sampled_token_ids[i] >= 0, "sampled_token_ids[", i,
                "]=", sampled_token_ids[i], " for request_id=", unresolved_[i].first,
                " must be >= 0 (it sampled)");
  }
  const std::vector<std::pair<int64_t, int32_t>> unresolved = std::move(unresolved_);
  unresolved_.clear();
  tokens_pending_ = false;
  std::vector<FinishedRequest> finished;
  for (size_t i = 0; i < num_seqs; ++i) {
    const auto [request_id, index] = unresolved[i];
    if (index < 0) continue;
    auto it = requests_.find(request_id);
    if (it == requests_.end()) continue;  // finished (by length, or by the engine) and removed
    Request& r = it->second;
    r.token_ids_[static_cast<size_t>(index)] = sampled_token_ids[i];
    // the placeholder is the request's last token: no step was applied after it
    const bool stops = stop_status(r, sampled_token_ids[i]) == RequestStatus::kFinishedStopped;
    if (stops && r.status() == RequestStatus::kFinishedLength) {
      // NOTE(tidal): not a transition but the length stop update_pending() applied restated, as
      // update() would have decided with the token in hand (a stop beats length).
      r.status_ = RequestStatus::kFinishedStopped;
      finished.push_back({r.request_id(), RequestStatus::kFinishedStopped, r.num_output_tokens()});
    } else if (stops && !r.is_finished()) {
      finish(r, RequestStatus::kFinishedStopped);
      finished.push_back({r.request_id(), RequestStatus::kFinishedStopped, r.num_output_tokens()});
    }
  }
  return finished;
}

bool Scheduler::abort_request(int64_t request_id) {
  auto it = requests_.find(request_id);
  if (it == requests_.end() || it->second.is_finished()) return false;
  finish(it->second, RequestStatus::kFinishedAborted);
  return true;
}

void Scheduler::finish_request(int64_t request_id, RequestStatus status) {
  TIDAL_CHECK(is_finished(status), "status=", status_name(status), " for request_id=", request_id,
              " must be a FINISHED_* status");
  finish(mut_request(request_id), status);
}

}  // namespace tidal::sched
