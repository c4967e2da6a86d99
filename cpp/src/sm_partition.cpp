// SPDX-License-Identifier: Apache-2.0
// tidal::SmPartition over the green-context calls of cuda/sm_partition.cu.
#include "tidal/sm_partition.h"

#include <algorithm>
#include <stdexcept>

#include "ops/kernels.h"
#include "tidal/status.h"

namespace tidal {

#if TIDAL_WITH_CUDA

SmLayout sm_layout(int device) {
  TIDAL_CHECK(device >= 0, "device=", device, " must be a GPU index");
  SmLayout layout;
  gpu::sm_layout(device, &layout.sm_count, &layout.min_group, &layout.alignment);
  return layout;
}

SmPartition::SmPartition(int device, int first_sms) : device_(device) {
  const SmLayout layout = sm_layout(device);
  if (first_sms < 1 || first_sms >= layout.sm_count) {
    TIDAL_THROW_(std::invalid_argument, "first_sms=", first_sms, " must be in [1, ", layout.sm_count - 1,
                 "]: the device has ", layout.sm_count, " SMs and the second group needs at least one");
  }
  // The driver rounds a group up to its alignment and minimum size; say so before it refuses.
  const int align = layout.alignment > 0 ? layout.alignment : 1;
  const int rounded = std::max(layout.min_group, (first_sms + align - 1) / align * align);
  if (rounded >= layout.sm_count) {
    TIDAL_THROW_(std::invalid_argument, "first_sms=", first_sms, " rounds up to ", rounded, " SMs (groups are ",
                 "multiples of ", align, ", at least ", layout.min_group, "), leaving none of the device's ",
                 layout.sm_count, " for the second group");
  }
  groups_ = gpu::sm_groups_create(device, first_sms, sm_counts_);
}

SmPartition::~SmPartition() {
  // NOTE(tidal): a destructor must not throw; a failure here leaves the streams to the process's end.
  try {
    for (uintptr_t stream : streams_) gpu::sm_group_stream_destroy(stream);
    for (uintptr_t group : groups_) gpu::sm_group_destroy(group);
  } catch (...) {
  }
}

uintptr_t SmPartition::create_stream(int group, int priority) {
  TIDAL_CHECK_INDEX(group >= 0 && group < num_groups(), "group=", group, " is not in [0, ", num_groups(), ")");
  streams_.push_back(gpu::sm_group_stream(device_, groups_[group], sm_counts_[group], priority));
  return streams_.back();
}

void SmPartition::record_sm_ids(uintptr_t stream, int blocks, uintptr_t out) {
  TIDAL_CHECK(blocks >= 1, "blocks=", blocks, " must be at least 1");
  TIDAL_CHECK(out != 0, "out=0: record_sm_ids needs device memory for ", blocks, " int32 values");
  gpu::record_sm_ids(stream, blocks, out);
}

#else

SmLayout sm_layout(int device) {
  TIDAL_THROW_(Error, "sm_layout(device=", device, "): this build of tidal has no GPU support (built without CUDA)");
}

SmPartition::SmPartition(int device, int first_sms) : device_(device) {
  TIDAL_THROW_(Error, "SmPartition(device=", device, ", first_sms=", first_sms,
               "): this build of tidal has no GPU support (built without CUDA)");
}

SmPartition::~SmPartition() = default;

uintptr_t SmPartition::create_stream(int group, int priority) {
  TIDAL_THROW_(Error, "SmPartition.create_stream(group=", group, ", priority=", priority,
               "): this build of tidal has no GPU support");
}

void SmPartition::record_sm_ids(uintptr_t /*stream*/, int blocks, uintptr_t /*out*/) {
  TIDAL_THROW_(Error, "SmPartition.record_sm_ids(blocks=", blocks, "): this build of tidal has no GPU support");
}

#endif

int SmPartition::sm_count(int group) const {
  TIDAL_CHECK_INDEX(group >= 0 && group < num_groups(), "group=", group, " is not in [0, ", num_groups(), ")");
  return sm_counts_[group];
}

}  // namespace tidal
