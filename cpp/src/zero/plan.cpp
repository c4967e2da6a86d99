// SPDX-License-Identifier: Apache-2.0
// make_plan: flat offsets with alignment padding, equal shards, shard-local buckets, the parameter x
// shard and group x shard intersections. O(num_params * shards touched + num_buckets).
#include "tidal/zero/plan.h"

#include <algorithm>

#include "tidal/status.h"

namespace tidal::zero {
namespace {

int64_t align_up(int64_t n, int64_t alignment) { return (n + alignment - 1) / alignment * alignment; }

// Calls fn(rank, lo, hi) for each rank whose shard meets flat [begin, end), with the shard-local
// intersection [lo, hi), in rank order; nothing for an empty range.
template <typename Fn>
void for_each_shard(int64_t begin, int64_t end, int64_t shard_numel, Fn&& fn) {
  if (begin >= end) return;
  for (int64_t r = begin / shard_numel; r * shard_numel < end; ++r) {
    const int64_t shard_lo = r * shard_numel;
    const int64_t lo = std::max(begin, shard_lo), hi = std::min(end, shard_lo + shard_numel);
    fn(static_cast<int32_t>(r), lo - shard_lo, hi - shard_lo);
  }
}

}  // namespace

int32_t ZeroPlan::owner_of(int64_t flat_index) const {
  TIDAL_CHECK_INDEX(flat_index >= 0 && flat_index < padded_numel, "flat_index=", flat_index,
                    " must be in [0, padded_numel=", padded_numel, ")");
  return static_cast<int32_t>(flat_index / shard_numel);
}

ZeroPlan make_plan(std::span<const int64_t> param_numels, int32_t world_size, int64_t bucket_numel,
                   int64_t alignment, std::span<const int32_t> group_starts) {
  TIDAL_CHECK(world_size >= 1, "world_size=", world_size, " must be >= 1");
  TIDAL_CHECK(alignment >= 1, "alignment=", alignment, " must be >= 1");
  TIDAL_CHECK(bucket_numel >= 1, "bucket_numel=", bucket_numel, " must be >= 1");
  TIDAL_CHECK(bucket_numel >= alignment, "bucket_numel=", bucket_numel, " must be >= alignment=", alignment,
              " (buckets are aligned)");
  const auto num_params = static_cast<int64_t>(param_numels.size());
  TIDAL_CHECK(num_params <= INT32_MAX, "len(param_numels)=", num_params, " must fit in int32");
  for (int64_t i = 0; i < num_params; ++i) {
    TIDAL_CHECK(param_numels[i] >= 0, "param_numels[", i, "]=", param_numels[i], " must be >= 0");
  }
  for (size_t g = 0; g < group_starts.size(); ++g) {
    const int32_t s = group_starts[g];
    TIDAL_CHECK(s >= 0 && s < num_params, "group_starts[", g, "]=", s, " must be in [0, num_params=",
                num_params, ")");
    TIDAL_CHECK(g > 0 || s == 0, "group_starts[0]=", s, " must be 0");
    TIDAL_CHECK(g == 0 || s > group_starts[g - 1], "group_starts[", g, "]=", s,
                " must be > group_starts[", g - 1, "]=", group_starts[g - 1], " (strictly increasing)");
  }

  ZeroPlan plan;
  plan.world_size = world_size;
  plan.alignment = alignment;
  plan.bucket_numel = bucket_numel / alignment * alignment;

  // Flat layout.
  plan.params.resize(num_params);
  int64_t end = 0;
  for (int64_t i = 0; i < num_params; ++i) {
    ParamLayout& p = plan.params[i];
    p.flat_offset = align_up(end, alignment);
    p.numel = param_numels[i];
    end = p.flat_offset + p.numel;
    plan.numel += p.numel;
  }
  // NOTE(tidal): ceil(total / world_size) rounded up to the alignment, so every shard (and every
  // bucket chunk) starts aligned; the padding is at most world_size * alignment + alignment elements.
  const int64_t total = align_up(end, alignment);
  plan.shard_numel = align_up((total + world_size - 1) / world_size, alignment);
  plan.padded_numel = plan.shard_numel * world_size;

  for (ParamLayout& p : plan.params) {
    for_each_shard(p.flat_offset, p.flat_offset + p.numel, plan.shard_numel, [&](int32_t r, int64_t lo, int64_t hi) {
      const int64_t param_begin = r * plan.shard_numel + lo - p.flat_offset;
      p.shards.push_back({r, param_begin, param_begin + (hi - lo), lo});
    });
  }

  for (int64_t lo = 0; lo < plan.shard_numel; lo += plan.bucket_numel) {
    plan.buckets.push_back({lo, std::min(lo + plan.bucket_numel, plan.shard_numel)});
  }

  // Gather groups.
  std::vector<int32_t> starts(group_starts.begin(), group_starts.end());
  if (starts.empty() && num_params > 0) starts.push_back(0);
  for (size_t g = 0; g < starts.size(); ++g) {
    GatherGroup group;
    group.param_begin = starts[g];
    group.param_end = g + 1 < starts.size() ? starts[g + 1] : static_cast<int32_t>(num_params);
    group.flat_begin = plan.params[group.param_begin].flat_offset;
    const ParamLayout& last = plan.params[group.param_end - 1];
    group.flat_end = last.flat_offset + last.numel;
    for_each_shard(group.flat_begin, group.flat_end, plan.shard_numel, [&](int32_t r, int64_t lo, int64_t hi) {
      group.shards.push_back({r, lo, hi});
    });
    plan.groups.push_back(std::move(group));
  }
  return plan;
}

}  // namespace tidal::zero
