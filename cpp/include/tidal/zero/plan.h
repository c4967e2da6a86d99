// SPDX-License-Identifier: Apache-2.0
// The ZeRO partition plan: where every parameter lives in one flat, padded buffer, which rank owns
// which equal shard of it, the shard-local communication buckets (each one a true reduce-scatter),
// and the per-module gather groups of stage 3. Pure arithmetic on sizes; no tensors, no devices.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace tidal::zero {

/// The part of one parameter that one rank owns: param-local elements [param_begin, param_end) sit at
/// shard-local [shard_begin, shard_begin + (param_end - param_begin)) of `rank`'s shard.
struct ParamShard {
  int32_t rank = 0;
  int64_t param_begin = 0;
  int64_t param_end = 0;
  int64_t shard_begin = 0;
};

/// One parameter in the flat buffer: flat [flat_offset, flat_offset + numel); flat_offset is a
/// multiple of the plan's alignment. `shards` lists the ranks whose shard it intersects, in rank
/// order, with non-empty intersections only (empty for a zero-size parameter); their param ranges
/// tile [0, numel).
struct ParamLayout {
  int64_t flat_offset = 0;
  int64_t numel = 0;
  std::vector<ParamShard> shards;
};

/// A shard-local range [lo, hi) of every rank's shard: bucket k's gradients are reduce-scattered
/// as world_size equal chunks, chunk r being flat [r * shard_numel + lo, r * shard_numel + hi).
struct Bucket {
  int64_t lo = 0;
  int64_t hi = 0;
};

/// The part of a gather group's flat range inside one rank's shard: shard-local [shard_begin,
/// shard_end) of `rank`.
struct GroupShard {
  int32_t rank = 0;
  int64_t shard_begin = 0;
  int64_t shard_end = 0;
};

/// A stage-3 gather group (one module's parameters): params [param_begin, param_end) by index,
/// spanning flat [flat_begin, flat_end) (first param's offset to the last param's end; padding
/// between them included). `shards`: non-empty intersections with each rank's shard, rank order.
struct GatherGroup {
  int32_t param_begin = 0;
  int32_t param_end = 0;
  int64_t flat_begin = 0;
  int64_t flat_end = 0;
  std::vector<GroupShard> shards;
};

struct ZeroPlan {
  int32_t world_size = 1;
  int64_t alignment = 1;
  int64_t bucket_numel = 1;           // the largest bucket, rounded down to a multiple of alignment
  int64_t numel = 0;                  // sum of the parameters' numels (no padding)
  int64_t padded_numel = 0;           // world_size * shard_numel
  int64_t shard_numel = 0;            // a multiple of alignment
  std::vector<ParamLayout> params;    // [num_params], in the given order
  std::vector<Bucket> buckets;        // [num_buckets], tile [0, shard_numel) in order
  std::vector<GatherGroup> groups;    // [num_groups], tile [0, num_params) in order

  /// The rank that owns flat element `flat_index` in [0, padded_numel); else std::out_of_range.
  int32_t owner_of(int64_t flat_index) const;
  /// Flat start of `rank`'s shard: rank * shard_numel.
  int64_t shard_offset(int32_t rank) const { return rank * shard_numel; }
};

/// Lays the parameters end to end in the given order, each starting at a multiple of `alignment`
/// elements, pads the total to world_size equal shards of shard_numel elements (a multiple of
/// `alignment`), and cuts each shard into buckets of at most `bucket_numel` elements (rounded down
/// to a multiple of `alignment`). `group_starts` are the parameter indices where a new gather group
/// begins: strictly increasing, first 0, each < num_params; empty means one group of all parameters
/// (no groups when there are no parameters).
/// Throws std::invalid_argument naming the argument for world_size < 1, alignment < 1,
/// bucket_numel < alignment, a negative numel, or bad group_starts.
ZeroPlan make_plan(std::span<const int64_t> param_numels, int32_t world_size, int64_t bucket_numel,
                   int64_t alignment, std::span<const int32_t> group_starts);

}  // namespace tidal::zero
