// SPDX-License-Identifier: Apache-2.0
// NCCL communicators held by the core. NCCL is loaded at run time (dlopen of libnccl.so.2: the copy
// torch's CUDA wheel brings, or the system's), never linked at build time, so one build of tidal
// serves with whatever NCCL the process has. Collectives are enqueued on the stream the caller names;
// a watchdog thread turns an asynchronous NCCL error, or a collective that does not complete within
// the communicator's timeout, into an abort of the communicator and a tidal::Error naming the
// collective, the rank and NCCL's message, thrown by the next call (synchronize() included).
// Builds without CUDA throw tidal::Error from every entry point. The Gloo path with the same
// interface lives in Python (tidal.comm), over torch.distributed.
#pragma once

#include <memory>
#include <string>

#include "tidal/stream.h"
#include "tidal/tensor_view.h"

namespace tidal::comm {

/// Reductions, numbered as NCCL numbers them.
enum class ReduceOp : int { kSum = 0, kProd = 1, kMax = 2, kMin = 3, kAvg = 4 };

/// Where to look for the NCCL library before the default search (TIDAL_NCCL_LIBRARY, then the
/// loader's own search for libnccl.so.2): tidal.comm passes the copy of torch's CUDA wheel. Takes
/// effect if NCCL is not loaded yet.
void set_nccl_library_path(const std::string& path);

/// NCCL's version code (e.g. 22703 for 2.27.3), loading the library if needed; throws tidal::Error
/// naming every place searched when it cannot be loaded.
int nccl_version();

/// A new NCCL unique id: 128 bytes that rank 0 makes and every rank passes to NcclCommunicator.
std::string nccl_unique_id();

/// One rank's NCCL communicator on one CUDA device.
class NcclCommunicator {
 public:
  /// Joins the communicator of `size` ranks that `unique_id` names as `rank`, on `device`. Blocks
  /// until every rank has joined; after `timeout_s` seconds without that, aborts and throws
  /// tidal::Error naming the rank.
  NcclCommunicator(const std::string& unique_id, int rank, int size, int device, double timeout_s);
  /// Frees the communicator (ncclCommAbort: never waits for the peers or for work in flight).
  ~NcclCommunicator();
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const;
  int size() const;
  int device() const;

  // The collectives: contiguous CUDA tensors on this communicator's device, one dtype per call
  // (float32/16, bfloat16, float64, int8, uint8, int32, int64); `out` and `in` may be the same
  // tensor where the sizes allow (in place). Each is enqueued on `stream` and returns at once.
  /// out = op over the ranks of in (same numel).
  void all_reduce(TensorView out, TensorView in, ReduceOp op, Stream stream);
  /// out = this rank's numel(out)-sized piece of op over the ranks of in (numel(in) = size * numel(out)).
  void reduce_scatter(TensorView out, TensorView in, ReduceOp op, Stream stream);
  /// out = every rank's in, concatenated in rank order (numel(out) = size * numel(in)).
  void all_gather(TensorView out, TensorView in, Stream stream);
  /// buffer = rank root's buffer.
  void broadcast(TensorView buffer, int root, Stream stream);
  /// Point to point: in to rank `peer`, and out from rank `peer` (each matched by the peer's call).
  void send(TensorView in, int peer, Stream stream);
  void recv(TensorView out, int peer, Stream stream);

  /// Blocks until every collective enqueued so far has completed (or throws the error that ended
  /// them, or the timeout's).
  void synchronize();
  /// Aborts the communicator: enqueued collectives end without completing; every later call throws.
  void abort(const std::string& why);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace tidal::comm
