// SPDX-License-Identifier: Apache-2.0
// The continuous-batching scheduler: one token budget per step shared by running requests (first)
// and waiting ones, chunked prefill mixed with decodes, preemption by recompute when KV blocks run
// out, prefix-cache hits on admission, stop conditions, and the step's flat batch for the runner.
#pragma once

#include <compare>
#include <cstdint>
#include <set>
#include <span>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "tidal/kv/kv_cache_manager.h"
#include "tidal/sched/request.h"

namespace tidal::sched {

enum class Policy : int32_t {
  kFcfs,      // admit in arrival order; preempt the latest-arrived running request
  kPriority,  // admit by (priority, arrival); preempt the running request with the largest pair
};

struct SchedulerConfig {
  int32_t num_kv_blocks = 0;               // >= 1 blocks in the KV pool
  int32_t block_size = 16;                 // >= 1 tokens per block
  int32_t max_num_seqs = 256;              // >= 1 running requests at most
  int32_t max_num_batched_tokens = 8192;   // >= 1 tokens computed per step at most
  int32_t max_model_len = 0;               // >= 2 tokens per request (prompt + outputs) at most;
                                           // num_kv_blocks * block_size must hold one such request
  bool enable_prefix_caching = true;
  Policy policy = Policy::kFcfs;

  /// Throws std::invalid_argument naming the first bad field and its value.
  void validate() const;
};

/// One step's work, flattened for the model runner. Sequences are the scheduled running requests in
/// running order, then the newly admitted ones in admission order. num_tokens = cu_seqlens_q.back().
struct SchedulerOutput {
  int64_t step = -1;                         // schedule() call number; update() checks it
  std::vector<int64_t> request_ids;          // [num_seqs]
  std::vector<int32_t> input_ids;            // [num_tokens] the tokens computed this step
  std::vector<int64_t> positions;            // [num_tokens] their positions in their sequence
  std::vector<int64_t> slot_mapping;         // [num_tokens] block_table[pos / bs] * bs + pos % bs
  std::vector<int32_t> cu_seqlens_q;         // [num_seqs + 1] token offsets, first 0, last num_tokens
  std::vector<int32_t> seq_lens;             // [num_seqs] num_computed_tokens + new tokens
  std::vector<int32_t> block_tables;         // [num_seqs, max_num_blocks] row-major, padded with 0
  int32_t max_num_blocks = 0;                // block_tables row width: max ceil(seq_len / bs)
  std::vector<uint8_t> needs_sample;         // [num_seqs] 1 when the step reaches the sequence's end
  std::vector<int32_t> num_computed_tokens;  // [num_seqs] before this step
  std::vector<int64_t> preempted_ids;        // requests preempted during this schedule()
  int32_t max_seqlen_q = 0;                  // max new tokens of one sequence (1: pure decode)
  int32_t max_seqlen_k = 0;                  // max seq_lens

  int32_t num_seqs() const { return static_cast<int32_t>(request_ids.size()); }
  int32_t num_tokens() const { return static_cast<int32_t>(input_ids.size()); }
};

/// A request that update() finished, with how many tokens it generated.
struct FinishedRequest {
  int64_t request_id = -1;
  RequestStatus status = RequestStatus::kFinishedStopped;
  int32_t num_output_tokens = 0;
};

/// Not thread-safe: one thread at a time (the Python binding serializes calls with a mutex).
///
/// Finished requests (by update(), abort_request() or finish_request()) stay readable through
/// request() until the start of the next schedule(), which removes them; their KV blocks are freed
/// at once. So an engine reads a finished request's outputs between update() and the next step.
class Scheduler {
 public:
  /// Validates `config` (std::invalid_argument naming the field) and builds the KV cache manager.
  explicit Scheduler(SchedulerConfig config);

  /// Queues a request (status WAITING). Throws std::invalid_argument, naming the argument and its
  /// value, for: request_id < 0 or already known (finished ones count until removed), an empty
  /// prompt, a negative token id, prompt length >= max_model_len, max_tokens < 1, min_tokens < 0
  /// or > max_tokens, share_prompt_with == request_id. `share_prompt_with` (n > 1 sampling) names a
  /// sibling whose prompt is the same: this request is not admitted until that one's prompt has been
  /// computed and cached (or it finished or is unknown), so its prefix lookup hits the shared full
  /// blocks and only the partial last block is recomputed. `extra_keys` is empty or holds one
  /// prefix-cache key per block the prompt touches (ceil(prompt length / block_size)): a multimodal
  /// prompt's image hashes, so prompts whose tokens match but whose images differ share no block
  /// (0 = no key; blocks past the prompt get 0). A wrong size throws std::invalid_argument.
  void add_request(int64_t request_id, std::vector<int32_t> prompt_token_ids, StopParams stop,
                   int32_t priority = 0, int64_t share_prompt_with = -1,
                   std::vector<uint64_t> extra_keys = {});

  // ---- disaggregated serving ----
  /// Prefill side: keeps the blocks of `request_id` (its computed KV) alive under `hold_id` (< 0, a
  /// namespace apart from request ids) past the request's end, until release_blocks(hold_id), so
  /// a decode engine can read them. Returns the block table. std::invalid_argument for
  /// hold_id >= 0 or one in use, std::out_of_range when the request holds no blocks.
  std::vector<int32_t> hold_blocks(int64_t request_id, int64_t hold_id);

  /// Decode side: allocates blocks for `num_tokens` tokens under `request_id` (not yet a request)
  /// for KV received from a prefill engine; false (nothing changed) when the pool lacks them.
  /// std::invalid_argument for a negative or known id or num_tokens < 1.
  bool reserve_blocks(int64_t request_id, int32_t num_tokens);

  /// Frees blocks held (hold_blocks) or reserved (reserve_blocks) and not taken by
  /// add_computed_request. std::out_of_range for an id that is neither.
  void release_blocks(int64_t id);

  /// Decode side: a request whose first `num_computed_tokens` tokens have their KV in the blocks
  /// reserved under `request_id`. `token_ids` holds the prompt (`num_prompt_tokens`) then the output
  /// tokens already generated elsewhere (the prefill engine's first token); it runs at once (RUNNING,
  /// scheduled from num_computed_tokens on). Returns false, changing nothing, when max_num_seqs
  /// requests run already. std::invalid_argument (naming it) for an id not reserved, blocks that do
  /// not cover num_computed_tokens, num_computed_tokens not in [1, token_ids.size()), outputs
  /// reaching max_tokens or max_model_len, or bad stop params as in add_request.
  bool add_computed_request(int64_t request_id, std::vector<int32_t> token_ids, int32_t num_prompt_tokens,
                            int32_t num_computed_tokens, StopParams stop, int32_t priority = 0);

  /// Plans one step (see ARCHITECTURE.md "Serving path"). Removes the requests finished since the
  /// last call, schedules running requests in running order (growing their block tables, preempting
  /// victims by the policy when blocks run out), then, if nothing was preempted, admits waiting
  /// requests while the token budget and seats last, stopping at the first that does not fit. A
  /// waiting request whose first full block equals that of a prompt admitted in the same step waits
  /// for the next step (then its prefix is cached) instead of computing it twice.
  /// Calling schedule() again before update() discards the previous output (nothing advanced).
  SchedulerOutput schedule();

  /// Applies the step whose `output` the last schedule() returned (matched by output.step; the plan
  /// itself is kept inside the scheduler, so the output's arrays may be modified): advances
  /// num_computed_tokens, caches newly full blocks, appends `sampled_token_ids[i]` ([num_seqs]; read
  /// only where needs_sample, -1 elsewhere) and applies stop conditions: stop_token_ids / EOS (EOS
  /// ignored under ignore_eos; neither before min_tokens outputs) -> FINISHED_STOPPED, then
  /// max_tokens outputs or max_model_len tokens -> FINISHED_LENGTH. Finished requests leave the
  /// running list and free their blocks. Sequences whose request finished or was aborted since
  /// schedule() are skipped.
  /// Throws tidal::Error for a stale or already applied output, std::invalid_argument for a size
  /// mismatch or a negative needed token (nothing changed).
  std::vector<FinishedRequest> update(const SchedulerOutput& output,
                                      std::span<const int32_t> sampled_token_ids);

  /// Asynchronous scheduling: update() for a step whose sampled tokens are still on the device, so
  /// the next schedule() can plan while it runs. Each sequence that samples gets a placeholder
  /// token (-1, its input in the next step's batch, which the engine fills from the device), length
  /// stops (max_tokens, max_model_len) apply now, stop tokens and EOS when resolve_tokens() gives the
  /// tokens. Each call is followed by one resolve_tokens() (also when no live sequence sampled); the
  /// next schedule() may run before it, update() or update_pending() may not (tidal::Error). Same
  /// errors as update() otherwise.
  std::vector<FinishedRequest> update_pending(const SchedulerOutput& output);

  /// The tokens of the step update_pending() applied ([num_seqs] of that step, read only where it
  /// sampled): replaces the placeholders and applies stop tokens and EOS (a request preempted
  /// meanwhile may stop too). Requests finished or aborted since are skipped. Returns the requests
  /// it finished. tidal::Error when no step is unresolved, std::invalid_argument for a size mismatch
  /// or a negative token where one is needed (nothing changed).
  std::vector<FinishedRequest> resolve_tokens(std::span<const int32_t> sampled_token_ids);
  bool has_unresolved_tokens() const { return tokens_pending_; }

  /// Aborts a waiting, preempted or running request (FINISHED_ABORTED) and frees its blocks.
  /// False when the id is unknown or already finished.
  bool abort_request(int64_t request_id);

  /// Finishes a request for the engine: kFinishedStopped (a stop string matched), kFinishedError
  /// (it failed), kFinishedAborted, kFinishedLength. std::invalid_argument for a non-finished
  /// `status`, std::out_of_range for an unknown id, tidal::Error for an invalid transition
  /// (already finished, or STOPPED/LENGTH while not running).
  void finish_request(int64_t request_id, RequestStatus status);

  /// The request (std::out_of_range when unknown or removed). Valid until the next schedule().
  const Request& request(int64_t request_id) const;
  bool has_request(int64_t request_id) const { return requests_.count(request_id) != 0; }
  bool has_unfinished_requests() const { return !running_.empty() || !waiting_.empty(); }

  /// Drops the prefix-cache hashes of free blocks (e.g. after a weight update); see KVCacheManager.
  bool reset_prefix_cache() { return kv_.reset_prefix_cache(); }

  int32_t num_running() const { return static_cast<int32_t>(running_.size()); }
  /// Waiting and preempted requests.
  int32_t num_waiting() const { return static_cast<int32_t>(waiting_.size()); }
  int64_t num_preemptions() const { return num_preemptions_; }
  /// Running request ids in running order (the order schedule() serves them).
  const std::vector<int64_t>& running_ids() const { return running_; }
  /// Waiting request ids in admission order.
  std::vector<int64_t> waiting_ids() const;
  const kv::KVCacheManager& kv_cache() const { return kv_; }
  const SchedulerConfig& config() const { return config_; }

 private:
  /// Orders the waiting queue: FCFS (0, arrival), or (0, -n) for the n-th preemption so a preempted
  /// request returns to the front; kPriority (priority, arrival).
  struct QueueKey {
    int64_t major = 0;
    int64_t minor = 0;
    int64_t request_id = 0;
    auto operator<=>(const QueueKey&) const = default;
  };
  struct Scheduled {
    int64_t request_id;
    int32_t num_computed;  // before this step
    int32_t num_new;
    bool needs_sample;     // num_computed + num_new reaches the request's last token
  };

  Request& mut_request(int64_t request_id);
  QueueKey running_key(const Request& r) const;
  QueueKey waiting_key(const Request& r);
  bool is_admissible(const Request& r) const;
  void insert_running(const Request& r);
  void remove_running(int64_t request_id);
  void preempt(Request& r);
  void finish(Request& r, RequestStatus status);
  void remove_finished();
  SchedulerOutput build_output(const std::vector<Scheduled>& scheduled,
                               std::vector<int64_t> preempted_ids) const;
  std::vector<FinishedRequest> apply(const SchedulerOutput& output,
                                     std::span<const int32_t> sampled_token_ids, bool pending);
  /// FINISHED_STOPPED when `token` stops `r` (a stop token, or EOS unless ignored, once min_tokens
  /// outputs exist), else kRunning.
  static RequestStatus stop_status(const Request& r, int32_t token);

  SchedulerConfig config_;
  kv::KVCacheManager kv_;
  std::unordered_map<int64_t, Request> requests_;  // every known request, until removed
  std::vector<int64_t> running_;  // sorted by running_key: the preemption victim is the last
  std::set<QueueKey> waiting_;    // waiting and preempted requests, admission order
  std::unordered_map<int64_t, QueueKey> waiting_keys_;
  std::vector<int64_t> finished_;  // finished since the last schedule(), removed by the next
  std::unordered_set<int64_t> held_;      // hold ids of hold_blocks()
  std::unordered_set<int64_t> reserved_;  // request ids of reserve_blocks() not yet added
  int64_t next_arrival_ = 0;
  int64_t next_front_ = -1;  // FCFS: minor key of the next preempted request, decreasing
  int64_t num_preemptions_ = 0;
  int64_t step_ = 0;              // schedule() calls so far
  int64_t pending_step_ = -1;     // the step awaiting update(), or -1
  // NOTE(tidal): update() applies this copy of the plan, not the SchedulerOutput it is handed, so
  // the caller may reuse or modify the output's arrays freely.
  std::vector<Scheduled> pending_;
  // update_pending()'s placeholders: per sequence of that step, (request id, index of its
  // placeholder in token_ids_, or -1 where it did not sample); empty once resolve_tokens() ran.
  std::vector<std::pair<int64_t, int32_t>> unresolved_;
  bool tokens_pending_ = false;  // between update_pending() and its resolve_tokens()
};

}  // namespace tidal::sched
