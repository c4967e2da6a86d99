// SPDX-License-Identifier: Apache-2.0
// The CUDA side of tidal::comm (cuda/nccl_comm.cu): NCCL loaded at run time, the communicator and its
// watchdog. cpp/src/comm/comm.cpp forwards the public API here in CUDA builds.
#pragma once

#include <string>

#include "tidal/stream.h"
#include "tidal/tensor_view.h"

namespace tidal::gpu::nccl {

class Comm;  // one rank's communicator and its watchdog

void set_library_path(const std::string& path);
int version();
std::string unique_id();

Comm* create(const std::string& unique_id, int rank, int size, int device, double timeout_s);
void destroy(Comm* comm);

// op: tidal::comm::ReduceOp's value.
void all_reduce(Comm* comm, TensorView out, TensorView in, int op, Stream stream);
void reduce_scatter(Comm* comm, TensorView out, TensorView in, int op, Stream stream);
void all_gather(Comm* comm, TensorView out, TensorView in, Stream stream);
void broadcast(Comm* comm, TensorView buffer, int root, Stream stream);
void send(Comm* comm, TensorView in, int peer, Stream stream);
void recv(Comm* comm, TensorView out, int peer, Stream stream);
void synchronize(Comm* comm);
void abort(Comm* comm, const std::string& why);

}  // namespace tidal::gpu::nccl
