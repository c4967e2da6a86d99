// SPDX-License-Identifier: Apache-2.0
// Request: the status names, the table of valid transitions and the one function that applies
// them, so an invalid transition anywhere in the scheduler is an error that names the request.
#include "tidal/sched/request.h"

#include <utility>

#include "tidal/status.h"

namespace tidal::sched {

bool is_finished(RequestStatus status) {
  switch (status) {
    case RequestStatus::kFinishedStopped:
    case RequestStatus::kFinishedLength:
    case RequestStatus::kFinishedAborted:
    case RequestStatus::kFinishedError:
      return true;
    default:
      return false;
  }
}

const char* status_name(RequestStatus status) {
  switch (status) {
    case RequestStatus::kWaiting: return "WAITING";
    case RequestStatus::kRunning: return "RUNNING";
    case RequestStatus::kPreempted: return "PREEMPTED";
    case RequestStatus::kFinishedStopped: return "FINISHED_STOPPED";
    case RequestStatus::kFinishedLength: return "FINISHED_LENGTH";
    case RequestStatus::kFinishedAborted: return "FINISHED_ABORTED";
    case RequestStatus::kFinishedError: return "FINISHED_ERROR";
  }
  return "UNKNOWN";
}

bool is_valid_transition(RequestStatus from, RequestStatus to) {
  using S = RequestStatus;
  switch (from) {
    case S::kWaiting:
      return to == S::kRunning || to == S::kFinishedAborted || to == S::kFinishedError;
    case S::kRunning:
      return to == S::kPreempted || is_finished(to);
    // NOTE(tidal): a preempted request is a waiting one, so it may fail like one (FINISHED_ERROR);
    // it may also stop (FINISHED_STOPPED): the engine reads its last token's text (stop strings),
    // and under asynchronous scheduling learns the token itself, after the step that preempted it
    // was planned.
    case S::kPreempted:
      return to == S::kWaiting || to == S::kFinishedAborted || to == S::kFinishedError ||
             to == S::kFinishedStopped;
    default:
      return false;  // finished is final
  }
}

Request::Request(int64_t request_id, std::vector<int32_t> prompt_token_ids, StopParams stop,
                 int32_t priority, int64_t arrival, int64_t share_prompt_with,
                 std::vector<uint64_t> extra_keys)
    : request_id_(request_id),
      token_ids_(std::move(prompt_token_ids)),
      num_prompt_tokens_(static_cast<int32_t>(token_ids_.size())),
      stop_(std::move(stop)),
      priority_(priority),
      arrival_(arrival),
      share_prompt_with_(share_prompt_with),
      extra_keys_(std::move(extra_keys)) {}

void Request::transition(RequestStatus next) {
  TIDAL_CHECK_STATE(is_valid_transition(status_, next), "request_id=", request_id_,
                    ": invalid transition ", status_name(status_), " -> ", status_name(next));
  status_ = next;
}

}  // namespace tidal::sched
