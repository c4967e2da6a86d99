// SPDX-License-Identifier: Apache-2.0
// Bindings of tidal::sched on the tidal._core.sched submodule: the Scheduler (calls serialized by a
// mutex; schedule() and update() run without the GIL), its config, stop parameters, request
// snapshots, and the step's SchedulerOutput whose arrays are zero-copy numpy views.
#include <cstdint>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <pybind11/native_enum.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "tidal/sched/scheduler.h"
#include "tidal/status.h"

namespace py = pybind11;

namespace tidal::bindings {
namespace {

using sched::FinishedRequest;
using sched::Policy;
using sched::Request;
using sched::RequestStatus;
using sched::Scheduler;
using sched::SchedulerConfig;
using sched::SchedulerOutput;
using sched::StopParams;
using Tokens = std::vector<int32_t>;

// NOTE(tidal): schedule() and update() release the GIL, so another Python thread (e.g. a server
// aborting a request) may call in meanwhile; the mutex makes every call see a whole step. It is
// released before the GIL is taken back, so the two locks are never waited on in opposite orders.
struct PyScheduler {
  explicit PyScheduler(const SchedulerConfig& config) : scheduler(config) {}
  Scheduler scheduler;
  std::mutex mutex;
};

template <typename F>
auto locked(PyScheduler& self, F&& f) {
  std::lock_guard<std::mutex> lock(self.mutex);
  return f(self.scheduler);
}

// A numpy view of `data` ([shape], C order) that keeps `owner` (the SchedulerOutput) alive.
template <typename T>
py::array view(const py::dtype& dtype, const std::vector<T>& data, std::vector<py::ssize_t> shape,
               py::handle owner) {
  return py::array(dtype, std::move(shape), std::vector<py::ssize_t>{}, data.data(), owner);
}

template <typename T>
py::array view1d(const std::vector<T>& data, py::handle owner) {
  return view(py::dtype::of<T>(), data, {static_cast<py::ssize_t>(data.size())}, owner);
}

Tokens to_list(std::span<const int32_t> tokens) { return Tokens(tokens.begin(), tokens.end()); }

void bind_types(py::module_& m) {
  py::native_enum<RequestStatus>(m, "RequestStatus", "enum.Enum",
                                 "A request's state; FINISHED_* are final.")
      .value("WAITING", RequestStatus::kWaiting)
      .value("RUNNING", RequestStatus::kRunning)
      .value("PREEMPTED", RequestStatus::kPreempted)
      .value("FINISHED_STOPPED", RequestStatus::kFinishedStopped)
      .value("FINISHED_LENGTH", RequestStatus::kFinishedLength)
      .value("FINISHED_ABORTED", RequestStatus::kFinishedAborted)
      .value("FINISHED_ERROR", RequestStatus::kFinishedError)
      .finalize();
  py::native_enum<Policy>(m, "Policy", "enum.Enum", "Admission and preemption order.")
      .value("FCFS", Policy::kFcfs)
      .value("PRIORITY", Policy::kPriority)
      .finalize();
  m.def("is_finished", &sched::is_finished, py::arg("status"));

  py::class_<StopParams>(m, "StopParams", "When a request stops generating.")
      .def(py::init([](int32_t max_tokens, int32_t min_tokens, Tokens stop_token_ids,
                       Tokens eos_token_ids, bool ignore_eos) {
             return StopParams{max_tokens, min_tokens, std::move(stop_token_ids),
                               std::move(eos_token_ids), ignore_eos};
           }),
           py::arg("max_tokens") = 16, py::kw_only(), py::arg("min_tokens") = 0,
           py::arg("stop_token_ids") = Tokens{}, py::arg("eos_token_ids") = Tokens{},
           py::arg("ignore_eos") = false)
      .def_readwrite("max_tokens", &StopParams::max_tokens)
      .def_readwrite("min_tokens", &StopParams::min_tokens)
      .def_readwrite("stop_token_ids", &StopParams::stop_token_ids)
      .def_readwrite("eos_token_ids", &StopParams::eos_token_ids)
      .def_readwrite("ignore_eos", &StopParams::ignore_eos);

  py::class_<SchedulerConfig>(m, "SchedulerConfig",
                              "Scheduler limits; checked when a Scheduler is built.")
      .def(py::init([](int32_t num_kv_blocks, int32_t max_model_len, int32_t block_size,
                       int32_t max_num_seqs, int32_t max_num_batched_tokens,
                       bool enable_prefix_caching, Policy policy) {
             return SchedulerConfig{num_kv_blocks, block_size, max_num_seqs,
                                    max_num_batched_tokens, max_model_len,
                                    enable_prefix_caching, policy};
           }),
           py::kw_only(), py::arg("num_kv_blocks"), py::arg("max_model_len"),
           py::arg("block_size") = 16, py::arg("max_num_seqs") = 256,
           py::arg("max_num_batched_tokens") = 8192, py::arg("enable_prefix_caching") = true,
           py::arg("policy") = Policy::kFcfs)
      .def_readwrite("num_kv_blocks", &SchedulerConfig::num_kv_blocks)
      .def_readwrite("block_size", &SchedulerConfig::block_size)
      .def_readwrite("max_num_seqs", &SchedulerConfig::max_num_seqs)
      .def_readwrite("max_num_batched_tokens", &SchedulerConfig::max_num_batched_tokens)
      .def_readwrite("max_model_len", &SchedulerConfig::max_model_len)
      .def_readwrite("enable_prefix_caching", &SchedulerConfig::enable_prefix_caching)
      .def_readwrite("policy", &SchedulerConfig::policy)
      .def("validate", &SchedulerConfig::validate);

  py::class_<Request>(m, "Request", "A snapshot of one request, taken by Scheduler.request().")
      .def_property_readonly("request_id", &Request::request_id)
      .def_property_readonly("status", &Request::status)
      .def_property_readonly("is_finished", &Request::is_finished)
      .def_property_readonly("prompt_token_ids",
                             [](const Request& r) { return to_list(r.prompt_token_ids()); })
      .def_property_readonly("output_token_ids",
                             [](const Request& r) { return to_list(r.output_token_ids()); })
      .def_property_readonly("num_tokens", &Request::num_tokens)
      .def_property_readonly("num_prompt_tokens", &Request::num_prompt_tokens)
      .def_property_readonly("num_output_tokens", &Request::num_output_tokens)
      .def_property_readonly("num_computed_tokens", &Request::num_computed_tokens)
      .def_property_readonly("num_cached_prompt_tokens", &Request::num_cached_prompt_tokens)
      .def_property_readonly("is_prompt_computed", &Request::is_prompt_computed)
      .def_property_readonly("stop", &Request::stop)
      .def_property_readonly("priority", &Request::priority)
      .def_property_readonly("arrival", &Request::arrival)
      .def_property_readonly("share_prompt_with", &Request::share_prompt_with)
      .def_property_readonly("num_preemptions", &Request::num_preemptions)
      .def("__repr__", [](const Request& r) {
        return "Request(request_id=" + std::to_string(r.request_id()) + ", status=" +
               sched::status_name(r.status()) + ", num_tokens=" + std::to_string(r.num_tokens()) +
               ", num_computed_tokens=" + std::to_string(r.num_computed_tokens()) + ")";
      });

  py::class_<FinishedRequest>(m, "FinishedRequest", "A request that update() finished.")
      .def_readonly("request_id", &FinishedRequest::request_id)
      .def_readonly("status", &FinishedRequest::status)
      .def_readonly("num_output_tokens", &FinishedRequest::num_output_tokens)
      .def("__repr__", [](const FinishedRequest& f) {
        return "FinishedRequest(request_id=" + std::to_string(f.request_id) + ", status=" +
               sched::status_name(f.status) + ", num_output_tokens=" +
               std::to_string(f.num_output_tokens) + ")";
      });
}

void bind_output(py::module_& m) {
  using O = SchedulerOutput;
  auto arr = [](auto member) {
    return [member](py::object self) { return view1d(self.cast<const O&>().*member, self); };
  };
  py::class_<O>(m, "SchedulerOutput",
                "One step's flat batch. Array attributes are numpy views (no copy) that keep this "
                "object alive; update() does not read them back, so they may be modified.")
      .def_readonly("step", &O::step)
      .def_property_readonly("num_seqs", &O::num_seqs)
      .def_property_readonly("num_tokens", &O::num_tokens)
      .def_readonly("max_num_blocks", &O::max_num_blocks)
      .def_readonly("max_seqlen_q", &O::max_seqlen_q)
      .def_readonly("max_seqlen_k", &O::max_seqlen_k)
      .def_readonly("preempted_ids", &O::preempted_ids, "Requests preempted by this schedule().")
      .def_property_readonly("request_ids", arr(&O::request_ids), "int64 [num_seqs]")
      .def_property_readonly("input_ids", arr(&O::input_ids), "int32 [num_tokens]")
      .def_property_readonly("positions", arr(&O::positions), "int64 [num_tokens]")
      .def_property_readonly("slot_mapping", arr(&O::slot_mapping),
                             "int64 [num_tokens]: block_table[pos // bs] * bs + pos % bs")
      .def_property_readonly("cu_seqlens_q", arr(&O::cu_seqlens_q), "int32 [num_seqs + 1]")
      .def_property_readonly("seq_lens", arr(&O::seq_lens), "int32 [num_seqs]")
      .def_property_readonly("num_computed_tokens", arr(&O::num_computed_tokens),
                             "int32 [num_seqs], before this step")
      .def_property_readonly(
          "needs_sample",
          [](py::object self) {
            const O& o = self.cast<const O&>();
            return view(py::dtype::of<bool>(), o.needs_sample,
                        {static_cast<py::ssize_t>(o.needs_sample.size())}, self);
          },
          "bool [num_seqs]")
      .def_property_readonly(
          "block_tables",
          [](py::object self) {
            const O& o = self.cast<const O&>();
            return view(py::dtype::of<int32_t>(), o.block_tables,
                        {static_cast<py::ssize_t>(o.num_seqs()),
                         static_cast<py::ssize_t>(o.max_num_blocks)},
                        self);
          },
          "int32 [num_seqs, max_num_blocks], padded with 0");
}

void bind_scheduler(py::module_& m) {
  py::class_<PyScheduler>(m, "Scheduler",
                          "Continuous-batching scheduler over a paged KV cache with prefix caching.")
      .def(py::init<const SchedulerConfig&>(), py::arg("config"))
      .def(
          "add_request",
          [](PyScheduler& self, int64_t request_id, Tokens prompt_token_ids, StopParams stop,
             int32_t priority, int64_t share_prompt_with, std::vector<uint64_t> extra_keys) {
            locked(self, [&](Scheduler& s) {
              s.add_request(request_id, std::move(prompt_token_ids), std::move(stop), priority,
                            share_prompt_with, std::move(extra_keys));
              return 0;
            });
          },
          py::arg("request_id"), py::arg("prompt_token_ids"), py::arg("stop"),
          py::arg("priority") = 0, py::arg("share_prompt_with") = -1,
          py::arg("extra_keys") = std::vector<uint64_t>{},
          "Queues a request (WAITING); share_prompt_with names a sibling whose prompt this one "
          "waits for (n > 1 sampling); extra_keys holds one prefix-cache key per prompt block "
          "(image hashes of a multimodal prompt) or nothing.")
      .def(
          "hold_blocks",
          [](PyScheduler& self, int64_t request_id, int64_t hold_id) {
            return locked(self, [&](Scheduler& s) { return s.hold_blocks(request_id, hold_id); });
          },
          py::arg("request_id"), py::arg("hold_id"),
          "Keeps the request's blocks alive under hold_id (< 0) until release_blocks(hold_id); returns "
          "the block table (disaggregated prefill).")
      .def(
          "reserve_blocks",
          [](PyScheduler& self, int64_t request_id, int32_t num_tokens) {
            return locked(self, [&](Scheduler& s) { return s.reserve_blocks(request_id, num_tokens); });
          },
          py::arg("request_id"), py::arg("num_tokens"),
          "Allocates blocks for num_tokens tokens under a future request's id (disaggregated decode); "
          "False when the pool lacks them.")
      .def(
          "release_blocks",
          [](PyScheduler& self, int64_t id) {
            locked(self, [&](Scheduler& s) {
              s.release_blocks(id);
              return 0;
            });
          },
          py::arg("id"), "Frees blocks of hold_blocks() or reserve_blocks().")
      .def(
          "add_computed_request",
          [](PyScheduler& self, int64_t request_id, Tokens token_ids, int32_t num_prompt_tokens,
             int32_t num_computed_tokens, StopParams stop, int32_t priority) {
            return locked(self, [&](Scheduler& s) {
              return s.add_computed_request(request_id, std::move(token_ids), num_prompt_tokens,
                                            num_computed_tokens, std::move(stop), priority);
            });
          },
          py::arg("request_id"), py::arg("token_ids"), py::arg("num_prompt_tokens"),
          py::arg("num_computed_tokens"), py::arg("stop"), py::arg("priority") = 0,
          "A request whose first num_computed_tokens tokens' KV is in its reserved blocks: RUNNING at "
          "once; False when max_num_seqs requests run already (disaggregated decode).")
      .def(
          "schedule",
          [](PyScheduler& self) {
            py::gil_scoped_release nogil;
            return locked(self, [](Scheduler& s) { return s.schedule(); });
          },
          "Plans one step; removes the requests finished since the last call.")
      .def(
          "update",
          [](PyScheduler& self, const SchedulerOutput& output,
             const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& sampled) {
            TIDAL_CHECK(sampled.ndim() == 1, "sampled_token_ids.ndim=", sampled.ndim(),
                        " must be 1");
            std::span<const int32_t> tokens(sampled.data(), static_cast<size_t>(sampled.size()));
            py::gil_scoped_release nogil;
            return locked(self, [&](Scheduler& s) { return s.update(output, tokens); });
          },
          py::arg("output"), py::arg("sampled_token_ids"),
          "Applies the last schedule()'s step: sampled_token_ids [num_seqs], -1 where no sample "
          "is needed. Returns the requests it finished.")
      .def(
          "update_pending",
          [](PyScheduler& self, const SchedulerOutput& output) {
            py::gil_scoped_release nogil;
            return locked(self, [&](Scheduler& s) { return s.update_pending(output); });
          },
          py::arg("output"),
          "update() for a step whose tokens are still on the device (asynchronous scheduling): "
          "placeholder tokens (-1) until resolve_tokens(); length stops now. Returns the requests "
          "it finished.")
      .def(
          "resolve_tokens",
          [](PyScheduler& self, const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& sampled) {
            TIDAL_CHECK(sampled.ndim() == 1, "sampled_token_ids.ndim=", sampled.ndim(), " must be 1");
            std::span<const int32_t> tokens(sampled.data(), static_cast<size_t>(sampled.size()));
            py::gil_scoped_release nogil;
            return locked(self, [&](Scheduler& s) { return s.resolve_tokens(tokens); });
          },
          py::arg("sampled_token_ids"),
          "The tokens of the step update_pending() applied ([num_seqs], -1 where it did not sample): "
          "replaces the placeholders, applies stop tokens and EOS. Returns the requests it finished.")
      .def_property_readonly(
          "has_unresolved_tokens",
          [](PyScheduler& self) {
            return locked(self, [](Scheduler& s) { return s.has_unresolved_tokens(); });
          })
      .def(
          "abort_request",
          [](PyScheduler& self, int64_t id) {
            return locked(self, [id](Scheduler& s) { return s.abort_request(id); });
          },
          py::arg("request_id"), "False when unknown or already finished.")
      .def(
          "finish_request",
          [](PyScheduler& self, int64_t id, RequestStatus status) {
            locked(self, [&](Scheduler& s) {
              s.finish_request(id, status);
              return 0;
            });
          },
          py::arg("request_id"), py::arg("status"))
      .def(
          "request",
          [](PyScheduler& self, int64_t id) {
            return locked(self, [id](Scheduler& s) { return Request(s.request(id)); });
          },
          py::arg("request_id"), "A snapshot; finished requests are readable until the next schedule().")
      .def(
          "has_request",
          [](PyScheduler& self, int64_t id) {
            return locked(self, [id](Scheduler& s) { return s.has_request(id); });
          },
          py::arg("request_id"))
      .def("has_unfinished_requests",
           [](PyScheduler& self) {
             return locked(self, [](Scheduler& s) { return s.has_unfinished_requests(); });
           })
      .def("reset_prefix_cache",
           [](PyScheduler& self) {
             return locked(self, [](Scheduler& s) { return s.reset_prefix_cache(); });
           })
      .def_property_readonly("num_running",
                             [](PyScheduler& self) {
                               return locked(self, [](Scheduler& s) { return s.num_running(); });
                             })
      .def_property_readonly("num_waiting",
                             [](PyScheduler& self) {
                               return locked(self, [](Scheduler& s) { return s.num_waiting(); });
                             })
      .def_property_readonly("num_preemptions",
                             [](PyScheduler& self) {
                               return locked(self, [](Scheduler& s) { return s.num_preemptions(); });
                             })
      .def_property_readonly("running_ids",
                             [](PyScheduler& self) {
                               return locked(self, [](Scheduler& s) { return s.running_ids(); });
                             })
      .def_property_readonly("waiting_ids",
                             [](PyScheduler& self) {
                               return locked(self, [](Scheduler& s) { return s.waiting_ids(); });
                             })
      .def_property_readonly("config",
                             [](PyScheduler& self) { return self.scheduler.config(); })
      .def_property_readonly(
          "kv_cache", [](PyScheduler& self) -> const kv::KVCacheManager& { return self.scheduler.kv_cache(); },
          py::return_value_policy::reference_internal,
          "The KV cache manager (read it between steps, not while another thread schedules).")
      .def(
          "stats",
          [](PyScheduler& self) {
            std::lock_guard<std::mutex> lock(self.mutex);
            const Scheduler& s = self.scheduler;
            const kv::KVCacheManager& kv = s.kv_cache();
            const kv::KVCacheStats st = kv.stats();
            py::dict d;
            d["kv_blocks_total"] = kv.num_blocks_total();
            d["kv_blocks_free"] = kv.num_blocks_free();
            d["kv_blocks_used"] = kv.num_blocks_used();
            d["prefix_cache_queries"] = st.prefix_cache_queries;
            d["prefix_cache_query_tokens"] = st.prefix_cache_query_tokens;
            d["prefix_cache_hit_tokens"] = st.prefix_cache_hit_tokens;
            d["preemptions"] = s.num_preemptions();
            d["num_requests_running"] = s.num_running();
            d["num_requests_waiting"] = s.num_waiting();
            return d;
          },
          "Counters: kv_blocks_{total,free,used}, prefix_cache_{queries,query_tokens,hit_tokens}, "
          "preemptions, num_requests_{running,waiting}.");
}

}  // namespace

void bind_sched(py::module_& m) {
  bind_types(m);
  bind_output(m);
  bind_scheduler(m);
}

}  // namespace tidal::bindings
