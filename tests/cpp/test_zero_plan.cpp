// SPDX-License-Identifier: Apache-2.0
// Tests of the ZeRO partition plan: every flat element owned by exactly one rank, buckets tiling each
// shard once and aligned, param x shard intersections reassembling each parameter, groups covering
// all parameters; odd sizes, world 1..8, zero-size params, params larger than a shard, alignment.
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "check.h"
#include "tidal/status.h"
#include "tidal/zero/plan.h"

using tidal::zero::make_plan;
using tidal::zero::ZeroPlan;
using Numels = std::vector<int64_t>;
using Starts = std::vector<int32_t>;

namespace {

// Every invariant of a plan, checked element by element.
void check_plan(const ZeroPlan& plan, const Numels& numels, const Starts& starts) {
  const int64_t a = plan.alignment;
  const int32_t w = plan.world_size;
  CHECK(plan.padded_numel == plan.shard_numel * w);
  CHECK(plan.shard_numel % a == 0);
  CHECK(plan.params.size() == numels.size());

  // Layout: aligned, in order, non-overlapping, inside the padded buffer; numel is the sum.
  int64_t sum = 0, end = 0;
  for (size_t i = 0; i < numels.size(); ++i) {
    const auto& p = plan.params[i];
    CHECK(p.numel == numels[i]);
    CHECK(p.flat_offset % a == 0);
    CHECK(p.flat_offset >= end);
    CHECK(p.flat_offset - end < a);  // no more padding than alignment needs
    end = p.flat_offset + p.numel;
    sum += p.numel;
  }
  CHECK(plan.numel == sum);
  CHECK(end <= plan.padded_numel);
  CHECK(plan.padded_numel - end < (w + 1) * a + w);  // padding stays small

  // Ownership: owner_of is rank = index / shard_numel, every element exactly one owner.
  std::vector<int> owned(plan.padded_numel, 0);
  for (int32_t r = 0; r < w; ++r) {
    for (int64_t j = 0; j < plan.shard_numel; ++j) ++owned[plan.shard_offset(r) + j];
  }
  for (int64_t f = 0; f < plan.padded_numel; ++f) {
    CHECK(owned[f] == 1);
    CHECK(plan.owner_of(f) == f / plan.shard_numel);
  }

  // Buckets tile [0, shard_numel) once, in order, aligned, no larger than bucket_numel.
  CHECK(plan.bucket_numel % a == 0 && plan.bucket_numel >= a);
  int64_t at = 0;
  for (const auto& b : plan.buckets) {
    CHECK(b.lo == at);
    CHECK(b.hi > b.lo);
    CHECK(b.hi - b.lo <= plan.bucket_numel);
    CHECK(b.lo % a == 0 && b.hi % a == 0);
    at = b.hi;
  }
  CHECK(at == plan.shard_numel);

  // Param x shard intersections reassemble each parameter exactly, at the right flat positions.
  for (const auto& p : plan.params) {
    std::vector<int> seen(p.numel, 0);
    int32_t prev_rank = -1;
    for (const auto& s : p.shards) {
      CHECK(s.rank > prev_rank && s.rank < w);
      prev_rank = s.rank;
      CHECK(s.param_begin < s.param_end);
      CHECK(s.shard_begin >= 0 && s.shard_begin + (s.param_end - s.param_begin) <= plan.shard_numel);
      for (int64_t j = s.param_begin; j < s.param_end; ++j) {
        ++seen[j];
        const int64_t flat = plan.shard_offset(s.rank) + s.shard_begin + (j - s.param_begin);
        CHECK(flat == p.flat_offset + j);
        CHECK(plan.owner_of(flat) == s.rank);
      }
    }
    for (int v : seen) CHECK(v == 1);
    if (p.numel == 0) CHECK(p.shards.empty());
  }

  // Groups tile the params in order; their flat ranges and per-rank ranges agree.
  Starts want = starts;
  if (want.empty() && !numels.empty()) want.push_back(0);
  CHECK(plan.groups.size() == want.size());
  int32_t next = 0;
  for (size_t g = 0; g < plan.groups.size(); ++g) {
    const auto& group = plan.groups[g];
    CHECK(group.param_begin == want[g] && group.param_begin == next);
    CHECK(group.param_end > group.param_begin);
    next = group.param_end;
    CHECK(group.flat_begin == plan.params[group.param_begin].flat_offset);
    const auto& last = plan.params[group.param_end - 1];
    CHECK(group.flat_end == last.flat_offset + last.numel);
    int64_t covered = 0, expect_flat = group.flat_begin;
    for (const auto& s : group.shards) {
      CHECK(s.shard_begin < s.shard_end && s.shard_end <= plan.shard_numel);
      CHECK(plan.shard_offset(s.rank) + s.shard_begin == expect_flat);
      expect_flat = plan.shard_offset(s.rank) + s.shard_end;
      covered += s.shard_end - s.shard_begin;
    }
    CHECK(covered == group.flat_end - group.flat_begin);
  }
  CHECK(next == static_cast<int32_t>(numels.size()));
}

ZeroPlan plan_of(const Numels& numels, int32_t w, int64_t bucket, int64_t a, const Starts& starts = {}) {
  ZeroPlan plan = make_plan(numels, w, bucket, a, starts);
  check_plan(plan, numels, starts);
  return plan;
}

void test_simple() {
  const ZeroPlan plan = plan_of({3, 5, 2}, 2, 4, 1);
  CHECK(plan.numel == 10 && plan.shard_numel == 5 && plan.padded_numel == 10);
  CHECK(plan.params[1].flat_offset == 3);
  CHECK(plan.params[1].shards.size() == 2);
  CHECK(plan.params[1].shards[0].rank == 0 && plan.params[1].shards[0].param_begin == 0 &&
        plan.params[1].shards[0].param_end == 2 && plan.params[1].shards[0].shard_begin == 3);
  CHECK(plan.params[1].shards[1].rank == 1 && plan.params[1].shards[1].param_begin == 2 &&
        plan.params[1].shards[1].param_end == 5 && plan.params[1].shards[1].shard_begin == 0);
  CHECK(plan.buckets.size() == 2 && plan.buckets[0].hi == 4 && plan.buckets[1].hi == 5);
  CHECK(plan.owner_of(4) == 0 && plan.owner_of(5) == 1);
}

void test_alignment() {
  const ZeroPlan plan = plan_of({3, 5, 1}, 3, 10, 4);
  CHECK(plan.params[0].flat_offset == 0 && plan.params[1].flat_offset == 4 && plan.params[2].flat_offset == 12);
  CHECK(plan.shard_numel == 8 && plan.padded_numel == 24);
  CHECK(plan.bucket_numel == 8 && plan.buckets.size() == 1);
  // bucket_numel is rounded down to the alignment.
  const ZeroPlan small = plan_of({100}, 2, 10, 4);
  CHECK(small.bucket_numel == 8 && small.shard_numel == 52 && small.buckets.size() == 7);
}

void test_zero_size_and_big() {
  const ZeroPlan plan = plan_of({0, 17, 0, 0, 1, 0}, 4, 3, 1, {0, 2, 5});
  CHECK(plan.params[0].shards.empty() && plan.params[2].flat_offset == 17);
  CHECK(plan.groups.size() == 3);
  // A param larger than a shard spans every rank.
  const ZeroPlan big = plan_of({1000, 3}, 8, 64, 8);
  CHECK(big.params[0].shards.size() == 8);
  const ZeroPlan none = plan_of({}, 4, 8, 2);
  CHECK(none.padded_numel == 0 && none.buckets.empty() && none.groups.empty());
  const ZeroPlan zeros = plan_of({0, 0}, 3, 8, 2);
  CHECK(zeros.padded_numel == 0 && zeros.groups.size() == 1);
}

void test_sweep() {
  const std::vector<Numels> cases = {
      {1}, {7}, {1, 1, 1}, {13, 0, 29, 1, 64, 3}, {4096, 4097, 7}, {100003}, {5, 0, 0, 999, 2}};
  for (const Numels& numels : cases) {
    for (int32_t w = 1; w <= 8; ++w) {
      for (int64_t a : {int64_t{1}, int64_t{2}, int64_t{4}, int64_t{16}}) {
        for (int64_t bucket : {a, 3 * a + 1, int64_t{1000}}) {
          plan_of(numels, w, bucket, a);
          Starts starts;
          for (int32_t i = 0; i < static_cast<int32_t>(numels.size()); i += 2) starts.push_back(i);
          plan_of(numels, w, bucket, a, starts);
        }
      }
    }
  }
}

void test_errors() {
  const Numels n = {4, 4};
  CHECK_THROWS(std::invalid_argument, "world_size=0", make_plan(n, 0, 4, 1, {}));
  CHECK_THROWS(std::invalid_argument, "bucket_numel=0", make_plan(n, 2, 0, 1, {}));
  CHECK_THROWS(std::invalid_argument, "alignment=0", make_plan(n, 2, 4, 0, {}));
  CHECK_THROWS(std::invalid_argument, "bucket_numel=2 must be >= alignment=4", make_plan(n, 2, 2, 4, {}));
  const Numels neg = {4, -1};
  CHECK_THROWS(std::invalid_argument, "param_numels[1]=-1", make_plan(neg, 2, 4, 1, {}));
  const Starts first1 = {1};
  CHECK_THROWS(std::invalid_argument, "group_starts[0]=1 must be 0", make_plan(n, 2, 4, 1, first1));
  const Starts unsorted = {0, 1, 1};
  CHECK_THROWS(std::invalid_argument, "group_starts[2]=1", make_plan(n, 2, 4, 1, unsorted));
  const Starts out = {0, 2};
  CHECK_THROWS(std::invalid_argument, "group_starts[1]=2", make_plan(n, 2, 4, 1, out));
  const ZeroPlan plan = make_plan(n, 2, 4, 1, {});
  CHECK_THROWS(std::out_of_range, "flat_index=8", plan.owner_of(8));
  CHECK_THROWS(std::out_of_range, "flat_index=-1", plan.owner_of(-1));
}

}  // namespace

int main() {
  test_simple();
  test_alignment();
  test_zero_size_and_big();
  test_sweep();
  test_errors();
  return tidal::test::check_failures();
}
