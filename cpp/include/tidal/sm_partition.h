// SPDX-License-Identifier: Apache-2.0
// A GPU's streaming multiprocessors split into groups that run work side by side without taking each
// other's SMs: CUDA green contexts (HIP: compute-unit masks). Disaggregated serving in one process
// gives its prefill engine one group and its decode engines the rest, so a long prompt's prefill
// cannot hold the SMs a decode step waits for; stream priorities alone only order blocks that are
// waiting to be scheduled.
#pragma once

#include <cstdint>
#include <vector>

namespace tidal {

/// What the device allows: its SM count, the smallest group the driver makes and the multiple a
/// group's size is rounded up to.
struct SmLayout {
  int sm_count = 0;
  int min_group = 0;
  int alignment = 0;
};

/// The SM layout of `device`. Throws Error in a build without a GPU and CudaError where the driver
/// has no green contexts (CUDA < 12.4).
SmLayout sm_layout(int device);

class SmPartition {
 public:
  /// Splits `device`'s SMs into two groups: group 0 takes at least `first_sms` (the driver rounds
  /// up to its alignment), group 1 the SMs that remain. Throws std::invalid_argument naming
  /// `first_sms` when it is under 1 or leaves group 1 no SM, and Error in a build without a GPU.
  SmPartition(int device, int first_sms);
  ~SmPartition();
  SmPartition(const SmPartition&) = delete;
  SmPartition& operator=(const SmPartition&) = delete;

  int device() const { return device_; }
  int num_groups() const { return static_cast<int>(sm_counts_.size()); }
  /// The SMs group `group` has (after the driver's rounding).
  int sm_count(int group) const;
  /// A new stream whose kernels run on group `group`'s SMs only, at `priority` (lower numbers
  /// first, clamped to the device's range). Its handle (a cudaStream_t / hipStream_t) stays valid
  /// until the partition is destroyed; work on it must be done by then.
  uintptr_t create_stream(int group, int priority);
  /// Launches `blocks` thread blocks on `stream`, each resident long enough (~100 us) for the
  /// blocks to spread over every SM the stream may use, and each writing the SM it ran on to
  /// `out[block]` (a device address holding `blocks` int32 values). Does not wait; may be captured
  /// in a CUDA graph. A check that a partition holds: a group's streams show at most its count of
  /// distinct SMs.
  static void record_sm_ids(uintptr_t stream, int blocks, uintptr_t out);

 private:
  int device_;
  std::vector<int> sm_counts_;
  std::vector<uintptr_t> groups_;   // one green context (CUDA) or packed CU range (HIP) per group
  std::vector<uintptr_t> streams_;  // every stream create_stream made, destroyed with the partition
};

}  // namespace tidal
