// SPDX-License-Identifier: Apache-2.0
// Bindings of tidal::kv: KVCacheManager with its ComputedBlocks and KVCacheStats, and the
// SleepableMemory that holds a GPU KV pool, registered on the tidal._core.kv submodule. Token ids and extra keys arrive as Python lists of ints; no call here runs
// long enough (microseconds) to be worth releasing the GIL.
#include <cstdint>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "tidal/device_memory.h"
#include "tidal/kv/kv_cache_manager.h"

namespace py = pybind11;

namespace tidal::bindings {

void bind_kv(py::module_& m) {
  using kv::ComputedBlocks;
  using kv::KVCacheManager;
  using kv::KVCacheStats;
  using Tokens = std::vector<int32_t>;
  using Keys = std::vector<uint64_t>;

  py::class_<ComputedBlocks>(m, "ComputedBlocks",
                             "A verified chain of cached full blocks returned by KVCacheManager.lookup.")
      .def(py::init<>())
      .def_readwrite("block_ids", &ComputedBlocks::block_ids, "Block ids in position order.")
      .def_readwrite("epochs", &ComputedBlocks::epochs, "Each block's cache epoch at lookup time.")
      .def_readwrite("num_tokens", &ComputedBlocks::num_tokens, "len(block_ids) * block_size.")
      .def("__repr__", [](const ComputedBlocks& c) {
        return "ComputedBlocks(num_tokens=" + std::to_string(c.num_tokens) + ", block_ids=" +
               py::repr(py::cast(c.block_ids)).cast<std::string>() + ")";
      });

  py::class_<KVCacheStats>(m, "KVCacheStats", "Prefix-cache counters since construction.")
      .def_readonly("prefix_cache_queries", &KVCacheStats::prefix_cache_queries)
      .def_readonly("prefix_cache_query_tokens", &KVCacheStats::prefix_cache_query_tokens)
      .def_readonly("prefix_cache_hit_tokens", &KVCacheStats::prefix_cache_hit_tokens)
      .def_readonly("evictions", &KVCacheStats::evictions);

  py::class_<KVCacheManager>(m, "KVCacheManager",
                             "Paged KV block tables over one block pool, with verified prefix caching.")
      .def(py::init<int32_t, int32_t, bool, int>(), py::arg("num_blocks"), py::arg("block_size"),
           py::arg("enable_prefix_caching") = true, py::arg("hash_bits") = 64)
      .def(
          "lookup",
          [](KVCacheManager& self, const Tokens& token_ids, const Keys& extra_keys) {
            return self.lookup(token_ids, extra_keys);
          },
          py::arg("token_ids"), py::arg("extra_keys") = Keys{},
          "Longest verified prefix of full blocks cached for token_ids; takes no reference.")
      .def("allocate", &KVCacheManager::allocate, py::arg("request_id"), py::arg("num_tokens"),
           py::arg("computed") = nullptr,
           "Grows the request's block table to hold num_tokens; False (nothing changed) when the "
           "pool lacks blocks.")
      .def("can_allocate", &KVCacheManager::can_allocate, py::arg("num_new_blocks"))
      .def(
          "cache_full_blocks",
          [](KVCacheManager& self, int64_t request_id, const Tokens& token_ids, int32_t num_tokens,
             const Keys& extra_keys) {
            self.cache_full_blocks(request_id, token_ids, num_tokens, extra_keys);
          },
          py::arg("request_id"), py::arg("token_ids"), py::arg("num_tokens"),
          py::arg("extra_keys") = Keys{},
          "Registers the request's blocks that are full within the first num_tokens tokens.")
      .def("free", &KVCacheManager::free, py::arg("request_id"),
           "Releases the request's blocks, last block first.")
      .def("reset_prefix_cache", &KVCacheManager::reset_prefix_cache,
           "Drops the hashes of free blocks; True when nothing is cached afterwards.")
      .def("block_table", &KVCacheManager::block_table, py::arg("request_id"),
           "A copy of the request's block table.")
      .def("has_request", &KVCacheManager::has_request, py::arg("request_id"))
      .def_property_readonly("num_blocks_free", &KVCacheManager::num_blocks_free)
      .def_property_readonly("num_blocks_used", &KVCacheManager::num_blocks_used)
      .def_property_readonly("num_blocks_total", &KVCacheManager::num_blocks_total)
      .def_property_readonly("num_blocks_cached", &KVCacheManager::num_blocks_cached)
      .def_property_readonly("block_size", &KVCacheManager::block_size)
      .def_property_readonly("is_prefix_caching_enabled", &KVCacheManager::is_prefix_caching_enabled)
      .def_property_readonly("stats", &KVCacheManager::stats)
      .def("ref_count", &KVCacheManager::ref_count, py::arg("block_id"))
      .def("free_block_ids", &KVCacheManager::free_block_ids, "Free blocks in LRU order, head first.")
      .def("is_cached", &KVCacheManager::is_cached, py::arg("block_id"))
      .def("cached_tokens", &KVCacheManager::cached_tokens, py::arg("block_id"));

  py::class_<SleepableMemory>(m, "SleepableMemory",
                              "GPU memory at a fixed address whose pages can be released and mapped "
                              "again (the KV pool across training steps). torch.as_tensor(mem, "
                              "device='cuda') views it as uint8 through __cuda_array_interface__.")
      .def(py::init<int, int64_t>(), py::arg("device"), py::arg("bytes"))
      .def("release", &SleepableMemory::release, py::call_guard<py::gil_scoped_release>(),
           "Frees the physical memory after the device's pending work; the contents are lost.")
      .def("remap", &SleepableMemory::remap, py::call_guard<py::gil_scoped_release>(),
           "Maps zeroed physical memory at the same address again.")
      .def_property_readonly("address", &SleepableMemory::address)
      .def_property_readonly("size", &SleepableMemory::size)
      .def_property_readonly("device", &SleepableMemory::device)
      .def_property_readonly("is_mapped", &SleepableMemory::is_mapped)
      .def_property_readonly("__cuda_array_interface__", [](const SleepableMemory& self) {
        py::dict d;
        d["shape"] = py::make_tuple(self.requested());
        d["typestr"] = "|u1";
        d["data"] = py::make_tuple(self.address(), false);
        d["version"] = 3;
        d["strides"] = py::none();
        d["stream"] = py::none();
        return d;
      });
}

}  // namespace tidal::bindings
