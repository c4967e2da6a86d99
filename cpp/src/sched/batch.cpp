// SPDX-License-Identifier: Apache-2.0
// The step's flat batch: from the scheduled (request, computed, new) triples to the arrays the model
// runner consumes (input ids, positions, slot mapping, query offsets, sequence lengths, padded
// block tables, which sequences sample).
#include <algorithm>
#include <utility>

#include "tidal/sched/scheduler.h"

namespace tidal::sched {

SchedulerOutput Scheduler::build_output(const std::vector<Scheduled>& scheduled,
                                        std::vector<int64_t> preempted_ids) const {
  const int64_t bs = config_.block_size;
  const size_t num_seqs = scheduled.size();
  SchedulerOutput out;
  out.preempted_ids = std::move(preempted_ids);
  out.request_ids.reserve(num_seqs);
  out.cu_seqlens_q.reserve(num_seqs + 1);
  out.seq_lens.reserve(num_seqs);
  out.needs_sample.reserve(num_seqs);
  out.num_computed_tokens.reserve(num_seqs);
  out.cu_seqlens_q.push_back(0);
  int32_t num_tokens = 0;
  for (const Scheduled& s : scheduled) {
    const int32_t seq_len = s.num_computed + s.num_new;
    num_tokens += s.num_new;
    out.request_ids.push_back(s.request_id);
    out.cu_seqlens_q.push_back(num_tokens);
    out.seq_lens.push_back(seq_len);
    out.needs_sample.push_back(s.needs_sample ? 1 : 0);
    out.num_computed_tokens.push_back(s.num_computed);
    out.max_seqlen_q = std::max(out.max_seqlen_q, s.num_new);
    out.max_seqlen_k = std::max(out.max_seqlen_k, seq_len);
    out.max_num_blocks = std::max(out.max_num_blocks, static_cast<int32_t>((seq_len + bs - 1) / bs));
  }

  out.input_ids.resize(static_cast<size_t>(num_tokens));
  out.positions.resize(static_cast<size_t>(num_tokens));
  out.slot_mapping.resize(static_cast<size_t>(num_tokens));
  out.block_tables.assign(num_seqs * static_cast<size_t>(out.max_num_blocks), 0);
  for (size_t i = 0; i < num_seqs; ++i) {
    const Scheduled& s = scheduled[i];
    const Request& r = requests_.at(s.request_id);
    const std::vector<int32_t>& table = kv_.block_table(s.request_id);
    const std::span<const int32_t> tokens = r.token_ids();
    const size_t start = static_cast<size_t>(out.cu_seqlens_q[i]);
    for (int32_t j = 0; j < s.num_new; ++j) {
      const int64_t pos = s.num_computed + j;
      out.input_ids[start + j] = tokens[static_cast<size_t>(pos)];
      out.positions[start + j] = pos;
      out.slot_mapping[start + j] = table[static_cast<size_t>(pos / bs)] * bs + pos % bs;
    }
    const size_t num_blocks = static_cast<size_t>((out.seq_lens[i] + bs - 1) / bs);
    std::copy_n(table.begin(), num_blocks,
                out.block_tables.begin() + static_cast<std::ptrdiff_t>(i * out.max_num_blocks));
  }
  return out;
}

}  // namespace tidal::sched
