// SPDX-License-Identifier: Apache-2.0
// tidal::comm's CUDA side: NCCL loaded with dlopen (its ABI declared here, never its header), one
// communicator per rank, and a watchdog thread per communicator that turns an asynchronous NCCL
// error or a collective past its timeout into an abort and an error the next call throws.
// NVIDIA only: under HIP (RCCL) this file compiles to nothing.
#if !defined(TIDAL_USE_HIP)

#include <dlfcn.h>

#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm/nccl_impl.h"
#include "cuda/common.cuh"

namespace tidal::gpu::nccl {
namespace {

// ---- NCCL's ABI (nccl.h, stable across 2.x) ----------------------------------------------------
using NcclComm = struct ncclComm*;
struct UniqueId {
  char internal[128];
};
using Result = int;
constexpr Result kSuccess = 0, kInProgress = 7;
// ncclConfig_t as NCCL 2.14 (the first release with non-blocking communicators) declares it; later
// releases append fields and accept this prefix by its size and version.
struct ConfigV214 {
  size_t size;
  unsigned int magic;
  unsigned int version;
  int blocking;
  int cga_cluster_size;
  int min_ctas;
  int max_ctas;
  const char* net_name;
};
constexpr unsigned int kApiMagic = 0xcafebeef;
constexpr unsigned int kConfigVersion = 21403;  // 2.14.3
// ncclDataType_t
constexpr int kInt8 = 0, kUint8 = 1, kInt32 = 2, kInt64 = 4, kFloat16 = 6, kFloat32 = 7, kFloat64 = 8,
              kBfloat16 = 9;

struct Library {
  void* handle = nullptr;
  std::string path;
  Result (*get_version)(int*) = nullptr;
  Result (*get_unique_id)(UniqueId*) = nullptr;
  Result (*comm_init_rank)(NcclComm*, int, UniqueId, int) = nullptr;
  Result (*comm_init_rank_config)(NcclComm*, int, UniqueId, int, ConfigV214*) = nullptr;  // >= 2.14
  Result (*comm_abort)(NcclComm) = nullptr;
  Result (*comm_get_async_error)(NcclComm, Result*) = nullptr;
  const char* (*get_error_string)(Result) = nullptr;
  const char* (*get_last_error)(NcclComm) = nullptr;  // >= 2.13
  Result (*all_reduce)(const void*, void*, size_t, int, int, NcclComm, cudaStream_t) = nullptr;
  Result (*reduce_scatter)(const void*, void*, size_t, int, int, NcclComm, cudaStream_t) = nullptr;
  Result (*all_gather)(const void*, void*, size_t, int, NcclComm, cudaStream_t) = nullptr;
  Result (*broadcast)(const void*, void*, size_t, int, int, NcclComm, cudaStream_t) = nullptr;
  Result (*send)(const void*, size_t, int, int, NcclComm, cudaStream_t) = nullptr;
  Result (*recv)(void*, size_t, int, int, NcclComm, cudaStream_t) = nullptr;
};

std::mutex g_library_mutex;
std::string g_library_hint;
Library g_library;

template <typename Fn>
void resolve(Library& lib, const char* symbol, Fn& fn, bool required = true) {
  fn = reinterpret_cast<Fn>(dlsym(lib.handle, symbol));
  if (fn == nullptr && required) {
    TIDAL_THROW_(Error, "the NCCL library ", lib.path, " has no ", symbol, " (tidal needs NCCL >= 2.12)");
  }
}

const Library& library() {
  std::lock_guard<std::mutex> lock(g_library_mutex);
  if (g_library.handle != nullptr) return g_library;
  std::vector<std::string> candidates;
  if (!g_library_hint.empty()) candidates.push_back(g_library_hint);
  if (const char* env = std::getenv("TIDAL_NCCL_LIBRARY"); env != nullptr && *env != '\0') candidates.push_back(env);
  candidates.push_back("libnccl.so.2");
  candidates.push_back("libnccl.so");
  std::string tried;
  Library lib;
  for (const std::string& candidate : candidates) {
    lib.handle = dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib.handle != nullptr) {
      lib.path = candidate;
      break;
    }
    const char* why = dlerror();
    tried += (tried.empty() ? "" : "; ") + candidate + " (" + (why != nullptr ? why : "not found") + ")";
  }
  if (lib.handle == nullptr) {
    TIDAL_THROW_(Error, "NCCL could not be loaded: tried ", tried, ". torch's CUDA wheels bring libnccl.so.2; ",
                 "or set TIDAL_NCCL_LIBRARY to the library's path");
  }
  resolve(lib, "ncclGetVersion", lib.get_version);
  resolve(lib, "ncclGetUniqueId", lib.get_unique_id);
  resolve(lib, "ncclCommInitRank", lib.comm_init_rank);
  resolve(lib, "ncclCommInitRankConfig", lib.comm_init_rank_config, false);
  resolve(lib, "ncclCommAbort", lib.comm_abort);
  resolve(lib, "ncclCommGetAsyncError", lib.comm_get_async_error);
  resolve(lib, "ncclGetErrorString", lib.get_error_string);
  resolve(lib, "ncclGetLastError", lib.get_last_error, false);
  resolve(lib, "ncclAllReduce", lib.all_reduce);
  resolve(lib, "ncclReduceScatter", lib.reduce_scatter);
  resolve(lib, "ncclAllGather", lib.all_gather);
  resolve(lib, "ncclBroadcast", lib.broadcast);
  resolve(lib, "ncclSend", lib.send);
  resolve(lib, "ncclRecv", lib.recv);
  g_library = lib;
  return g_library;
}

/// NCCL's message for `result`, with its last error detail where the library keeps one.
std::string describe(const Library& lib, Result result, NcclComm comm) {
  std::string text = lib.get_error_string(result);
  if (lib.get_last_error != nullptr) {
    const char* last = lib.get_last_error(comm);
    if (last != nullptr && *last != '\0') text += std::string(" (") + last + ")";
  }
  return text;
}

int data_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return kFloat32;
    case DType::kFloat16: return kFloat16;
    case DType::kBFloat16: return kBfloat16;
    case DType::kFloat64: return kFloat64;
    case DType::kInt8: return kInt8;
    case DType::kUInt8: return kUint8;
    case DType::kBool: return kUint8;
    case DType::kInt32: return kInt32;
    case DType::kInt64: return kInt64;
  }
  TIDAL_THROW_(std::invalid_argument, "dtype=", dtype_name(dtype), " has no NCCL type");
}

using Clock = std::chrono::steady_clock;

}  // namespace

class Comm {
 public:
  Comm(const std::string& unique_id, int rank, int size, int device, double timeout_s)
      : lib_(library()), rank_(rank), size_(size), device_(device), timeout_(std::chrono::duration<double>(timeout_s)) {
    TIDAL_CHECK(size >= 1 && rank >= 0 && rank < size, "rank=", rank, " must be in [0, size=", size, ")");
    TIDAL_CHECK(timeout_s > 0, "timeout_s=", timeout_s, " must be > 0");
    TIDAL_CHECK(unique_id.size() == sizeof(UniqueId), "unique_id holds ", unique_id.size(), " bytes, not ",
                sizeof(UniqueId), " (make it with nccl_unique_id())");
    UniqueId id;
    std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
    DeviceGuard guard(device);
    if (lib_.comm_init_rank_config != nullptr) {
      // non-blocking: the join can be abandoned after the timeout (every later call may also answer
      // "in progress" until its work is enqueued: ready() waits that out)
      ConfigV214 config{sizeof(ConfigV214), kApiMagic, kConfigVersion, 0, INT_MIN, INT_MIN, INT_MIN, nullptr};
      const Result result = lib_.comm_init_rank_config(&comm_, size, id, rank, &config);
      if (result != kSuccess && result != kInProgress) fail_now("joining the communicator", result);
      ready("joining the communicator");
    } else {
      const Result result = lib_.comm_init_rank(&comm_, size, id, rank);
      if (result != kSuccess) fail_now("joining the communicator", result);
    }
    watchdog_ = std::thread([this] { watch(); });
  }

  ~Comm() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    changed_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    std::lock_guard<std::mutex> lock(mutex_);
    if (comm_ != nullptr) {
      // NOTE(tidal): a destructor must not throw or hang. ncclCommAbort frees the communicator without
      // waiting for the peers or for work in flight; ncclCommDestroy of a non-blocking communicator may
      // answer "in progress" and leave the freeing to be polled for.
      (void)lib_.comm_abort(comm_);
      comm_ = nullptr;
    }
    for (const Pending& p : pending_) (void)cudaEventDestroy(p.event);
    for (cudaEvent_t event : free_events_) (void)cudaEventDestroy(event);
  }

  int size() const { return size_; }
  int device() const { return device_; }

  /// Runs `call` (an NCCL enqueue on `stream`) under the lock, then tracks its completion.
  template <typename Call>
  void enqueue(const char* name, Stream stream, Call&& call) {
    const auto s = static_cast<cudaStream_t>(stream.handle);
    DeviceGuard guard(device_);
    std::unique_lock<std::mutex> lock(mutex_);
    throw_if_failed();
    const Result result = call(comm_, s);
    if (result == kInProgress) {
      lock.unlock();
      ready(name);
      lock.lock();
    } else if (result != kSuccess) {
      const std::string message = what(name) + " failed: " + describe(lib_, result, comm_);
      abort_locked(message);
      throw Error(message);
    }
    // NOTE(tidal): inside a CUDA graph capture nothing runs yet, so there is nothing to watch: the
    // graph's replays are watched by whoever synchronizes with them.
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    TIDAL_CUDA_CHECK(cudaStreamIsCapturing(s, &capture));
    if (capture != cudaStreamCaptureStatusNone) return;
    cudaEvent_t event;
    if (free_events_.empty()) {
      TIDAL_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    } else {
      event = free_events_.back();
      free_events_.pop_back();
    }
    TIDAL_CUDA_CHECK(cudaEventRecord(event, s));
    pending_.push_back(Pending{event, name, Clock::now()});
  }

  void synchronize() {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [this] { return pending_.empty() || !error_.empty(); });
    throw_if_failed();
  }

  void abort(const std::string& why) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (error_.empty()) abort_locked(what("the communicator") + " was aborted: " + why);
  }

 private:
  struct Pending {
    cudaEvent_t event;
    const char* name;
    Clock::time_point start;
  };

  std::string what(const std::string& name) const {
    return name + " on rank " + std::to_string(rank_) + " of " + std::to_string(size_);
  }

  [[noreturn]] void fail_now(const char* name, Result result) {
    const std::string message = what(name) + " failed: " + describe(lib_, result, comm_);
    if (comm_ != nullptr) {
      (void)lib_.comm_abort(comm_);
      comm_ = nullptr;
    }
    throw Error(message);
  }

  /// Waits until the communicator has no operation "in progress" on the host (non-blocking mode),
  /// aborting it after the timeout.
  void ready(const char* name) {
    const auto deadline = Clock::now() + timeout_;
    for (;;) {
      Result state = kSuccess;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (comm_ == nullptr) throw Error(error_.empty() ? what(name) + " found the communicator aborted" : error_);
        const Result query = lib_.comm_get_async_error(comm_, &state);
        if (query != kSuccess) state = query;
        if (state == kSuccess) return;
        if (state != kInProgress) {
          const std::string message = what(name) + " failed: " + describe(lib_, state, comm_);
          abort_locked(message);
          throw Error(message);
        }
        if (Clock::now() > deadline) {
          const std::string message = what(name) + " did not complete within " +
                                      std::to_string(timeout_.count()) + " s (did every rank start and call it?)";
          abort_locked(message);
          throw Error(message);
        }
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }

  void throw_if_failed() const {
    if (!error_.empty()) throw Error(error_);
    if (comm_ == nullptr) throw Error(what("the communicator") + " was destroyed");
  }

  void abort_locked(const std::string& message) {
    if (error_.empty()) error_ = message;
    if (comm_ != nullptr) {
      (void)lib_.comm_abort(comm_);
      comm_ = nullptr;
    }
    changed_.notify_all();
  }

  // The watchdog: every few milliseconds, NCCL's asynchronous error state and the oldest pending
  // collective's event; a failure or a collective past the timeout aborts the communicator (which
  // lets its kernels exit) and leaves the error for the next call to throw.
  void watch() {
    (void)cudaSetDevice(device_);
    // NOTE(tidal): a CUDA graph captured on another thread in torch's (global) capture mode forbids
    // event queries from every thread whose own mode is global too, and a forbidden call would spoil
    // that capture; this thread's queries never touch a capturing stream, so it runs relaxed.
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    (void)cudaThreadExchangeStreamCaptureMode(&mode);
    std::unique_lock<std::mutex> lock(mutex_);
    while (!stop_) {
      if (comm_ != nullptr) {
        Result state = kSuccess;
        if (lib_.comm_get_async_error(comm_, &state) == kSuccess && state != kSuccess && state != kInProgress) {
          abort_locked(what("a collective") + " failed asynchronously: " + describe(lib_, state, comm_));
        }
      }
      bool done_any = false;
      while (!pending_.empty()) {
        const Pending& front = pending_.front();
        const cudaError_t status = cudaEventQuery(front.event);
        if (status == cudaErrorNotReady) {
          if (error_.empty() && Clock::now() - front.start > timeout_) {
            abort_locked(what(front.name) + " did not complete within " + std::to_string(timeout_.count()) +
                         " s (a rank died, or did not call it)");
          }
          if (comm_ != nullptr) break;
          // aborted: the collective's kernels end without completing; stop watching them
        } else if (status != cudaSuccess) {
          (void)cudaGetLastError();
          abort_locked(what(front.name) + " failed on the device: " + cudaGetErrorString(status));
        }
        free_events_.push_back(front.event);
        pending_.pop_front();
        done_any = true;
      }
      if (done_any) changed_.notify_all();
      changed_.wait_for(lock, std::chrono::milliseconds(pending_.empty() ? 50 : 2));
    }
  }

  const Library& lib_;
  NcclComm comm_ = nullptr;
  int rank_, size_, device_;
  std::chrono::duration<double> timeout_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::string error_;
  std::deque<Pending> pending_;
  std::vector<cudaEvent_t> free_events_;
  bool stop_ = false;
  std::thread watchdog_;
};

namespace {

void check_tensor(const Comm* comm, TensorView t, const char* what) {
  TIDAL_CHECK(t.device.type == DeviceType::kCUDA && t.device.index == comm->device(), what, " is on ",
              device_name(t.device), " but the communicator is on cuda:", comm->device());
  TIDAL_CHECK(t.is_contiguous(), what, " must be contiguous");
}

}  // namespace

void set_library_path(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_library_mutex);
  g_library_hint = path;
}

int version() {
  int v = 0;
  const Library& lib = library();
  const Result result = lib.get_version(&v);
  if (result != kSuccess) TIDAL_THROW_(Error, "ncclGetVersion failed: ", lib.get_error_string(result));
  return v;
}

std::string unique_id() {
  const Library& lib = library();
  UniqueId id;
  const Result result = lib.get_unique_id(&id);
  if (result != kSuccess) TIDAL_THROW_(Error, "ncclGetUniqueId failed: ", describe(lib, result, nullptr));
  return std::string(id.internal, sizeof(id.internal));
}

Comm* create(const std::string& id, int rank, int size, int device, double timeout_s) {
  return new Comm(id, rank, size, device, timeout_s);
}

void destroy(Comm* comm) { delete comm; }

void all_reduce(Comm* comm, TensorView out, TensorView in, int op, Stream stream) {
  check_tensor(comm, in, "in");
  check_tensor(comm, out, "out");
  TIDAL_CHECK(out.numel() == in.numel() && out.dtype == in.dtype, "all_reduce: out (", out.numel(), " ",
              dtype_name(out.dtype), ") must match in (", in.numel(), " ", dtype_name(in.dtype), ")");
  const int type = data_type(in.dtype);
  const auto count = static_cast<size_t>(in.numel());
  comm->enqueue("all_reduce", stream, [&](NcclComm c, cudaStream_t s) {
    return library().all_reduce(in.data, out.data, count, type, op, c, s);
  });
}

void reduce_scatter(Comm* comm, TensorView out, TensorView in, int op, Stream stream) {
  check_tensor(comm, in, "in");
  check_tensor(comm, out, "out");
  TIDAL_CHECK(in.numel() == out.numel() * comm->size() && out.dtype == in.dtype, "reduce_scatter: in holds ",
              in.numel(), " elements, not size=", comm->size(), " x out's ", out.numel(), " (or the dtypes differ)");
  const int type = data_type(in.dtype);
  const auto count = static_cast<size_t>(out.numel());
  comm->enqueue("reduce_scatter", stream, [&](NcclComm c, cudaStream_t s) {
    return library().reduce_scatter(in.data, out.data, count, type, op, c, s);
  });
}

void all_gather(Comm* comm, TensorView out, TensorView in, Stream stream) {
  check_tensor(comm, in, "in");
  check_tensor(comm, out, "out");
  TIDAL_CHECK(out.numel() == in.numel() * comm->size() && out.dtype == in.dtype, "all_gather: out holds ",
              out.numel(), " elements, not size=", comm->size(), " x in's ", in.numel(), " (or the dtypes differ)");
  const int type = data_type(in.dtype);
  const auto count = static_cast<size_t>(in.numel());
  comm->enqueue("all_gather", stream, [&](NcclComm c, cudaStream_t s) {
    return library().all_gather(in.data, out.data, count, type, c, s);
  });
}

void broadcast(Comm* comm, TensorView buffer, int root, Stream stream) {
  check_tensor(comm, buffer, "buffer");
  TIDAL_CHECK(root >= 0 && root < comm->size(), "root=", root, " must be in [0, size=", comm->size(), ")");
  const int type = data_type(buffer.dtype);
  const auto count = static_cast<size_t>(buffer.numel());
  comm->enqueue("broadcast", stream, [&](NcclComm c, cudaStream_t s) {
    return library().broadcast(buffer.data, buffer.data, count, type, root, c, s);
  });
}

void send(Comm* comm, TensorView in, int peer, Stream stream) {
  check_tensor(comm, in, "in");
  TIDAL_CHECK(peer >= 0 && peer < comm->size(), "peer=", peer, " must be in [0, size=", comm->size(), ")");
  const int type = data_type(in.dtype);
  const auto count = static_cast<size_t>(in.numel());
  comm->enqueue("send", stream, [&](NcclComm c, cudaStream_t s) {
    return library().send(in.data, count, type, peer, c, s);
  });
}

void recv(Comm* comm, TensorView out, int peer, Stream stream) {
  check_tensor(comm, out, "out");
  TIDAL_CHECK(peer >= 0 && peer < comm->size(), "peer=", peer, " must be in [0, size=", comm->size(), ")");
  const int type = data_type(out.dtype);
  const auto count = static_cast<size_t>(out.numel());
  comm->enqueue("recv", stream, [&](NcclComm c, cudaStream_t s) {
    return library().recv(out.data, count, type, peer, c, s);
  });
}

void synchronize(Comm* comm) { comm->synchronize(); }

void abort(Comm* comm, const std::string& why) { comm->abort(why); }

}  // namespace tidal::gpu::nccl

#endif  // !TIDAL_USE_HIP
