// SPDX-License-Identifier: Apache-2.0
// A request's life in the scheduler: its status and the one function that changes it, its stop
// parameters, and its token sequence (prompt then outputs) with how much of it has KV computed.
// The Scheduler (scheduler.h) owns every Request; callers see them through const references.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace tidal::sched {

/// WAITING -> RUNNING -> (PREEMPTED -> WAITING -> RUNNING)* -> FINISHED_*. The valid transitions:
///   WAITING   -> RUNNING, FINISHED_ABORTED, FINISHED_ERROR
///   RUNNING   -> PREEMPTED, FINISHED_STOPPED, FINISHED_LENGTH, FINISHED_ABORTED, FINISHED_ERROR
///   PREEMPTED -> WAITING, FINISHED_ABORTED, FINISHED_ERROR
/// A finished status is final. Anything else is a tidal::Error.
enum class RequestStatus : int32_t {
  kWaiting,
  kRunning,
  kPreempted,  // blocks freed, back in the waiting queue, recomputed from token 0 when readmitted
  kFinishedStopped,  // a stop token, EOS, or (engine-side) a stop string
  kFinishedLength,   // max_tokens outputs, or max_model_len tokens in total
  kFinishedAborted,  // abort_request
  kFinishedError,    // the engine failed the request
};

/// True for the four FINISHED_* states.
bool is_finished(RequestStatus status);
/// "WAITING", "RUNNING", "PREEMPTED", "FINISHED_STOPPED", ... (the Python enum's member names).
const char* status_name(RequestStatus status);
/// True when `from -> to` is one of the transitions listed at RequestStatus.
bool is_valid_transition(RequestStatus from, RequestStatus to);

/// When a request stops generating. Output tokens are counted after the sampled token is appended.
struct StopParams {
  int32_t max_tokens = 16;                // >= 1 output tokens at most
  int32_t min_tokens = 0;                 // in [0, max_tokens]: no stop/EOS stop before this many
  std::vector<int32_t> stop_token_ids;    // stop (FINISHED_STOPPED) on any of these, even if ignore_eos
  std::vector<int32_t> eos_token_ids;     // the model's EOS ids: stop on these unless ignore_eos
  bool ignore_eos = false;
};

class Scheduler;

/// One request: its ids and parameters, its token sequence and KV progress. Built and mutated only
/// by the Scheduler, except for transition(), which is the single place a status changes.
class Request {
 public:
  /// `arrival`: the scheduler's monotonically increasing arrival number. Arguments are validated
  /// by Scheduler::add_request, not here.
  Request(int64_t request_id, std::vector<int32_t> prompt_token_ids, StopParams stop,
          int32_t priority, int64_t arrival, int64_t share_prompt_with,
          std::vector<uint64_t> extra_keys = {});

  /// Moves to `next`, or throws tidal::Error naming the request id and both states when the
  /// transition is not one listed at RequestStatus.
  void transition(RequestStatus next);

  int64_t request_id() const { return request_id_; }
  RequestStatus status() const { return status_; }
  bool is_finished() const { return sched::is_finished(status_); }
  /// Prompt then outputs: [num_tokens]. A preempted request recomputes all of it.
  std::span<const int32_t> token_ids() const { return token_ids_; }
  std::span<const int32_t> prompt_token_ids() const {
    return std::span<const int32_t>(token_ids_).first(static_cast<size_t>(num_prompt_tokens_));
  }
  std::span<const int32_t> output_token_ids() const {
    return std::span<const int32_t>(token_ids_).subspan(static_cast<size_t>(num_prompt_tokens_));
  }
  int32_t num_tokens() const { return static_cast<int32_t>(token_ids_.size()); }
  int32_t num_prompt_tokens() const { return num_prompt_tokens_; }
  int32_t num_output_tokens() const { return num_tokens() - num_prompt_tokens_; }
  /// Tokens whose KV is in the cache (prefix hit included); reset to 0 by a preemption.
  int32_t num_computed_tokens() const { return num_computed_tokens_; }
  /// Prompt tokens served by the prefix cache at the request's first admission; -1 before it.
  int32_t num_cached_prompt_tokens() const { return num_cached_prompt_tokens_; }
  /// True once the whole prompt has been computed (and its full blocks cached) at least once.
  bool is_prompt_computed() const { return is_prompt_computed_; }
  const StopParams& stop() const { return stop_; }
  /// Lower value = more important (vLLM's convention); used by Policy::kPriority.
  int32_t priority() const { return priority_; }
  int64_t arrival() const { return arrival_; }
  /// The request whose prompt this one waits for (n > 1 sampling), or -1.
  int64_t share_prompt_with() const { return share_prompt_with_; }
  int32_t num_preemptions() const { return num_preemptions_; }
  /// Prefix-cache extra key of each block of the whole sequence (an image's content hash for the
  /// blocks its placeholder tokens fall in; 0 elsewhere), or empty when no block has one.
  std::span<const uint64_t> extra_keys() const { return extra_keys_; }

 private:
  friend class Scheduler;

  int64_t request_id_;
  std::vector<int32_t> token_ids_;
  int32_t num_prompt_tokens_;
  StopParams stop_;
  int32_t priority_;
  int64_t arrival_;
  int64_t share_prompt_with_;
  RequestStatus status_ = RequestStatus::kWaiting;
  int32_t num_computed_tokens_ = 0;
  int32_t num_cached_prompt_tokens_ = -1;
  bool is_prompt_computed_ = false;
  int32_t num_preemptions_ = 0;
  std::vector<uint64_t> extra_keys_;
};

}  // namespace tidal::sched
