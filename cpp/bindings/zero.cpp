// SPDX-License-Identifier: Apache-2.0
// Bindings of tidal::zero on the tidal._core.zero submodule: make_plan and the read-only plan objects
// (ZeroPlan, ParamLayout, ParamShard, GatherGroup, GroupShard); buckets are (lo, hi) tuples. Planning
// is arithmetic on sizes (microseconds), so the GIL is kept.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "tidal/zero/plan.h"

namespace py = pybind11;

namespace tidal::bindings {

void bind_zero(py::module_& m) {
  using namespace tidal::zero;

  py::class_<ParamShard>(m, "ParamShard",
                         "The part of one parameter a rank owns: param-local [param_begin, param_end) "
                         "sits at shard-local [shard_begin, shard_begin + param_end - param_begin).")
      .def_readonly("rank", &ParamShard::rank)
      .def_readonly("param_begin", &ParamShard::param_begin)
      .def_readonly("param_end", &ParamShard::param_end)
      .def_readonly("shard_begin", &ParamShard::shard_begin)
      .def("__repr__", [](const ParamShard& s) {
        return "ParamShard(rank=" + std::to_string(s.rank) + ", param_begin=" + std::to_string(s.param_begin) +
               ", param_end=" + std::to_string(s.param_end) + ", shard_begin=" + std::to_string(s.shard_begin) + ")";
      });

  py::class_<ParamLayout>(m, "ParamLayout",
                          "One parameter at flat [flat_offset, flat_offset + numel); shards: the non-empty "
                          "intersections with each rank's shard, in rank order (empty for numel 0).")
      .def_readonly("flat_offset", &ParamLayout::flat_offset)
      .def_readonly("numel", &ParamLayout::numel)
      .def_readonly("shards", &ParamLayout::shards)
      .def("__repr__", [](const ParamLayout& p) {
        return "ParamLayout(flat_offset=" + std::to_string(p.flat_offset) + ", numel=" + std::to_string(p.numel) +
               ", shards=" + py::repr(py::cast(p.shards)).cast<std::string>() + ")";
      });

  py::class_<GroupShard>(m, "GroupShard", "A gather group's part of one rank's shard: shard-local "
                                          "[shard_begin, shard_end) of rank.")
      .def_readonly("rank", &GroupShard::rank)
      .def_readonly("shard_begin", &GroupShard::shard_begin)
      .def_readonly("shard_end", &GroupShard::shard_end)
      .def("__repr__", [](const GroupShard& s) {
        return "GroupShard(rank=" + std::to_string(s.rank) + ", shard_begin=" + std::to_string(s.shard_begin) +
               ", shard_end=" + std::to_string(s.shard_end) + ")";
      });

  py::class_<GatherGroup>(m, "GatherGroup",
                          "A stage-3 gather group: params [param_begin, param_end) spanning flat "
                          "[flat_begin, flat_end); shards: non-empty per-rank parts, in rank order.")
      .def_readonly("param_begin", &GatherGroup::param_begin)
      .def_readonly("param_end", &GatherGroup::param_end)
      .def_readonly("flat_begin", &GatherGroup::flat_begin)
      .def_readonly("flat_end", &GatherGroup::flat_end)
      .def_readonly("shards", &GatherGroup::shards)
      .def("__repr__", [](const GatherGroup& g) {
        return "GatherGroup(params=[" + std::to_string(g.param_begin) + ", " + std::to_string(g.param_end) +
               "), flat=[" + std::to_string(g.flat_begin) + ", " + std::to_string(g.flat_end) + "))";
      });

  py::class_<ZeroPlan>(m, "ZeroPlan",
                       "The flat-buffer partition plan; rank r owns flat [r * shard_numel, (r + 1) * "
                       "shard_numel). Read-only.")
      .def_readonly("world_size", &ZeroPlan::world_size)
      .def_readonly("alignment", &ZeroPlan::alignment)
      .def_readonly("bucket_numel", &ZeroPlan::bucket_numel,
                    "Largest bucket: the requested size rounded down to a multiple of alignment.")
      .def_readonly("numel", &ZeroPlan::numel, "Sum of the parameters' numels (no padding).")
      .def_readonly("padded_numel", &ZeroPlan::padded_numel, "world_size * shard_numel.")
      .def_readonly("shard_numel", &ZeroPlan::shard_numel, "Elements per rank; a multiple of alignment.")
      .def_readonly("params", &ZeroPlan::params, "list[ParamLayout], in the given order.")
      .def_property_readonly(
          "buckets",
          [](const ZeroPlan& p) {
            std::vector<std::pair<int64_t, int64_t>> out;
            out.reserve(p.buckets.size());
            for (const Bucket& b : p.buckets) out.emplace_back(b.lo, b.hi);
            return out;
          },
          "list[(lo, hi)]: shard-local ranges tiling [0, shard_numel); bucket k is reduce-scattered as "
          "world_size equal chunks, chunk r = flat [r * shard_numel + lo, r * shard_numel + hi).")
      .def_readonly("groups", &ZeroPlan::groups, "list[GatherGroup], tiling the parameters in order.")
      .def("owner_of", &ZeroPlan::owner_of, py::arg("flat_index"),
           "The rank owning flat element flat_index in [0, padded_numel); IndexError otherwise.")
      .def("shard_offset", &ZeroPlan::shard_offset, py::arg("rank"), "rank * shard_numel.")
      .def("__repr__", [](const ZeroPlan& p) {
        return "ZeroPlan(world_size=" + std::to_string(p.world_size) + ", numel=" + std::to_string(p.numel) +
               ", shard_numel=" + std::to_string(p.shard_numel) + ", num_params=" + std::to_string(p.params.size()) +
               ", num_buckets=" + std::to_string(p.buckets.size()) + ", num_groups=" +
               std::to_string(p.groups.size()) + ")";
      });

  m.def(
      "make_plan",
      [](const std::vector<int64_t>& param_numels, int32_t world_size, int64_t bucket_numel, int64_t alignment,
         const std::optional<std::vector<int32_t>>& group_starts) {
        return make_plan(param_numels, world_size, bucket_numel, alignment,
                         group_starts ? std::span<const int32_t>(*group_starts) : std::span<const int32_t>());
      },
      py::arg("param_numels"), py::arg("world_size"), py::arg("bucket_numel"), py::arg("alignment") = 1,
      py::arg("group_starts") = py::none(),
      "make_plan(param_numels: list[int], world_size: int, bucket_numel: int, alignment: int = 1, "
      "group_starts: list[int] | None = None) -> ZeroPlan\n\n"
      "Lays the parameters end to end, each at a multiple of alignment elements, pads the total into "
      "world_size equal shards (shard_numel a multiple of alignment) and cuts each shard into buckets of at "
      "most bucket_numel elements (rounded down to the alignment; bucket_numel must be >= alignment). "
      "group_starts: parameter indices where a stage-3 gather group begins, strictly increasing, first 0; "
      "None or [] means one group of all parameters. Bad arguments raise ValueError naming them.");
}

}  // namespace tidal::bindings
