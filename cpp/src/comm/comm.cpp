// SPDX-License-Identifier: Apache-2.0
// tidal::comm's public API: forwards to the CUDA side (cuda/nccl_comm.cu) in builds with CUDA; in
// builds without it, every entry point says so.
#include "tidal/comm.h"

#include "tidal/status.h"

#if TIDAL_WITH_CUDA
#include "comm/nccl_impl.h"
#endif

namespace tidal::comm {

#if TIDAL_WITH_CUDA

struct NcclCommunicator::State {
  gpu::nccl::Comm* comm = nullptr;
  int rank = 0, size = 1, device = 0;
};

void set_nccl_library_path(const std::string& path) { gpu::nccl::set_library_path(path); }
int nccl_version() { return gpu::nccl::version(); }
std::string nccl_unique_id() { return gpu::nccl::unique_id(); }

NcclCommunicator::NcclCommunicator(const std::string& unique_id, int rank, int size, int device, double timeout_s)
    : state_(std::make_unique<State>()) {
  TIDAL_CHECK(device >= 0, "device=", device, " must be a CUDA device index");
  state_->comm = gpu::nccl::create(unique_id, rank, size, device, timeout_s);
  state_->rank = rank;
  state_->size = size;
  state_->device = device;
}

NcclCommunicator::~NcclCommunicator() { gpu::nccl::destroy(state_->comm); }

void NcclCommunicator::all_reduce(TensorView out, TensorView in, ReduceOp op, Stream stream) {
  gpu::nccl::all_reduce(state_->comm, out, in, static_cast<int>(op), stream);
}
void NcclCommunicator::reduce_scatter(TensorView out, TensorView in, ReduceOp op, Stream stream) {
  gpu::nccl::reduce_scatter(state_->comm, out, in, static_cast<int>(op), stream);
}
void NcclCommunicator::all_gather(TensorView out, TensorView in, Stream stream) {
  gpu::nccl::all_gather(state_->comm, out, in, stream);
}
void NcclCommunicator::broadcast(TensorView buffer, int root, Stream stream) {
  gpu::nccl::broadcast(state_->comm, buffer, root, stream);
}
void NcclCommunicator::send(TensorView in, int peer, Stream stream) { gpu::nccl::send(state_->comm, in, peer, stream); }
void NcclCommunicator::recv(TensorView out, int peer, Stream stream) {
  gpu::nccl::recv(state_->comm, out, peer, stream);
}
void NcclCommunicator::synchronize() { gpu::nccl::synchronize(state_->comm); }
void NcclCommunicator::abort(const std::string& why) { gpu::nccl::abort(state_->comm, why); }

#else

namespace {
[[noreturn]] void no_cuda() {
  throw Error("NCCL communicators need a build of tidal with CUDA (tidal.build_info()['cuda'] is False)");
}
}  // namespace

struct NcclCommunicator::State {
  int rank = 0, size = 1, device = 0;
};

void set_nccl_library_path(const std::string&) {}
int nccl_version() { no_cuda(); }
std::string nccl_unique_id() { no_cuda(); }
NcclCommunicator::NcclCommunicator(const std::string&, int, int, int, double) { no_cuda(); }
NcclCommunicator::~NcclCommunicator() = default;
void NcclCommunicator::all_reduce(TensorView, TensorView, ReduceOp, Stream) { no_cuda(); }
void NcclCommunicator::reduce_scatter(TensorView, TensorView, ReduceOp, Stream) { no_cuda(); }
void NcclCommunicator::all_gather(TensorView, TensorView, Stream) { no_cuda(); }
void NcclCommunicator::broadcast(TensorView, int, Stream) { no_cuda(); }
void NcclCommunicator::send(TensorView, int, Stream) { no_cuda(); }
void NcclCommunicator::recv(TensorView, int, Stream) { no_cuda(); }
void NcclCommunicator::synchronize() { no_cuda(); }
void NcclCommunicator::abort(const std::string&) { no_cuda(); }

#endif

int NcclCommunicator::rank() const { return state_->rank; }
int NcclCommunicator::size() const { return state_->size; }
int NcclCommunicator::device() const { return state_->device; }

}  // namespace tidal::comm
