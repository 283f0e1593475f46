// Python module tandem.kernels.cpu._tandem_cpu. Tensors cross as raw addresses: the Python wrapper
// (tandem/kernels/cpu/__init__.py) checks shapes, dtypes and contiguity and keeps the buffers alive.
#include <nanobind/nanobind.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "tandem/cpu_features.h"
#include "tandem/doorbell.h"
#include "tandem/read_ahead.h"
#include "tandem/kernels.h"
#include "tandem/moe.h"

namespace nb = nanobind;
using namespace tandem;

namespace {

ForwardArgs make_args(uintptr_t x, int x_dtype, int T, uintptr_t ids, int ids_dtype, int K, uintptr_t w,
                      uintptr_t out, int out_dtype, uintptr_t T_ptr) {
  ForwardArgs a;
  a.x = (const void*)x;
  a.x_dtype = x_dtype;
  a.T = T;
  a.ids = (const void*)ids;
  a.ids_dtype = ids_dtype;
  a.K = K;
  a.weights = (const float*)w;
  a.out = (void*)out;
  a.out_dtype = out_dtype;
  a.T_ptr = (const int32_t*)T_ptr;
  return a;
}

struct Handle {  // an in-flight submit
  std::shared_ptr<Job> job;
  void sync() { job->wait(); }
  bool done() const { return job->done(); }
};

}  // namespace

NB_MODULE(_tandem_cpu, m) {
  m.doc() = "tandem CPU MoE kernels (see tandem.kernels.cpu)";
  m.def("available_isas", [] {
    std::vector<std::string> v;
    for (int i = 0; i < ISA_COUNT; i++)
      if (isa_supported(i)) v.push_back(isa_name(i));
    return v;
  });
  m.def("all_isas", [] {
    std::vector<std::string> v;
    for (int i = 0; i < ISA_COUNT; i++) v.push_back(isa_name(i));
    return v;
  });
  m.def("current_isa", [] { return std::string(isa_name(isa_current())); });
  m.def("set_isa", [](const std::string& name) {
    const int isa = isa_from_name(name.c_str());
    if (isa < 0) throw nb::value_error(("unknown ISA " + name).c_str());
    if (!set_isa(isa)) throw nb::value_error(("ISA " + name + " is not supported on this CPU/build").c_str());
  });
  m.def("set_num_threads", &tandem::set_num_threads, nb::call_guard<nb::gil_scoped_release>());
  m.def("num_threads", &tandem::num_threads);
  m.def("set_numa_nodes", &tandem::set_numa_nodes, nb::call_guard<nb::gil_scoped_release>());
  m.def("numa_nodes", &tandem::numa_nodes);
  m.def("set_gemm_min_tokens", &tandem::set_gemm_min_tokens);
  m.def("gemm_min_tokens", &tandem::gemm_min_tokens);
  m.def("has_gemm", [] { return kernels()->gemm_bf16 != nullptr; });
  m.def("physical_cores", &tandem::physical_cores);
  m.def("block_info", [](int type) {
    WTypeInfo i{};
    if (!wtype_info(type, &i)) throw nb::value_error("unknown weight type");
    return std::make_tuple(i.blck, i.bytes, i.act_blck, i.row_extra);
  });
  m.def("quantize_rows", [](int type, uintptr_t src, int64_t rows, int cols, uintptr_t dst) {
    WTypeInfo i{};
    if (!wtype_info(type, &i) || !has_quantizer(type) || cols % i.blck) throw nb::value_error("bad type/cols");
    const size_t rb = row_bytes_of(i, cols);
    for (int64_t r = 0; r < rows; r++)
      quantize_row(type, (const float*)src + r * cols, (uint8_t*)dst + r * rb, cols);
  }, nb::call_guard<nb::gil_scoped_release>());
  m.def("dequantize_rows", [](int type, uintptr_t src, int64_t rows, int cols, uintptr_t dst) {
    WTypeInfo i{};
    if (!wtype_info(type, &i) || cols % i.blck) throw nb::value_error("bad type/cols");
    const size_t rb = row_bytes_of(i, cols);
    for (int64_t r = 0; r < rows; r++)
      dequantize_row(type, (const uint8_t*)src + r * rb, (float*)dst + r * cols, cols);
  }, nb::call_guard<nb::gil_scoped_release>());
  m.def("read_buffer", [](uintptr_t p, size_t n, int streams, int prefetch, int chunk) {
    return tandem::read_buffer((const void*)p, n, streams, prefetch, chunk);
  }, nb::arg("p"), nb::arg("n"), nb::arg("streams") = 1, nb::arg("prefetch") = 0, nb::arg("chunk") = 64,
     nb::call_guard<nb::gil_scoped_release>());
  m.def("bandwidth_probe", &tandem::bandwidth_probe, nb::call_guard<nb::gil_scoped_release>());
  m.def("read_patterns", [] {  // bandwidth_probe's (streams, prefetch, chunk) patterns
    std::vector<std::tuple<int, int, int>> v;
    for (const tandem::ReadPattern& p : tandem::kReadPatterns) v.emplace_back(p.streams, p.prefetch, p.chunk);
    return v;
  });
  m.def("host_entry_address", [] { return (uintptr_t)&tandem_cpu_host_entry; });
  m.def("host_trace_start", &tandem::host_trace_start);
  m.def("doorbell_add", [](uintptr_t bell, uintptr_t job) {
    return tandem::doorbell_add((tandem::Doorbell*)bell, (const tandem::HostJob*)job);
  });
  m.def("doorbell_jobs_run", &tandem::doorbell_jobs_run);
  m.def("doorbell_remove", [](uintptr_t bell) { tandem::doorbell_remove((tandem::Doorbell*)bell); },
        nb::call_guard<nb::gil_scoped_release>());
  m.def("doorbell_stop", &tandem::doorbell_stop, nb::call_guard<nb::gil_scoped_release>());
  m.def("doorbell_read_ahead", [](uintptr_t bell, uintptr_t experts, uintptr_t ids, int rows, int k) {
    tandem::doorbell_read_ahead((tandem::Doorbell*)bell,
                                tandem::ReadAhead{(const Experts*)experts, (const int64_t*)ids, rows, k});
  }, nb::call_guard<nb::gil_scoped_release>());
  m.def("set_read_ahead", &tandem::read_ahead_set_enabled);
  m.def("read_ahead_stats", [] {
    const tandem::ReadAheadStats s = tandem::read_ahead_stats();
    return std::make_tuple(s.jobs, s.stopped, s.bytes, s.predicted, s.needed, s.hits, s.used);
  });
  m.def("host_trace_take", [] {
    std::vector<std::tuple<int64_t, int64_t, int, int>> out;
    for (const auto& c : tandem::host_trace_take()) out.emplace_back(c.start_ns, c.end_ns, c.cpu, c.tokens);
    return out;
  });

  nb::class_<Handle>(m, "Handle")
      .def("sync", &Handle::sync, nb::call_guard<nb::gil_scoped_release>())
      .def("done", &Handle::done);

  nb::class_<HostJob>(m, "HostJob")
      .def_prop_ro("address", [](HostJob& h) { return (uintptr_t)&h; });

  nb::class_<Experts>(m, "Experts")
      .def(nb::init<int, int, int, int, int, int, int>())
      .def_prop_ro("address", [](const Experts& e) { return (uintptr_t)&e; })
      .def_prop_ro("n_shards", [](const Experts& e) { return (int)e.shards().size(); })
      .def("shard_range", [](const Experts& e, int s) {
        return std::make_tuple(e.shards().at(s).i0, e.shards().at(s).i1, e.shards().at(s).node);
      })
      .def_prop_ro("E", &Experts::E)
      .def_prop_ro("I", &Experts::I)
      .def_prop_ro("H", &Experts::H)
      .def("type", &Experts::type)
      .def("nbytes", &Experts::nbytes)
      .def("quantize_from", [](Experts& e, int proj, uintptr_t src, int dtype, int64_t row0, int64_t nrows) {
        e.quantize_from(proj, (const void*)src, dtype, row0, nrows);
      }, nb::call_guard<nb::gil_scoped_release>())
      .def("map_blocks", [](Experts& e, int proj, uintptr_t p, size_t n, bool copy) {
        e.map_blocks(proj, (const void*)p, n, copy);
      }, nb::arg("proj"), nb::arg("p"), nb::arg("n"), nb::arg("copy") = false, nb::call_guard<nb::gil_scoped_release>())
      .def("shard_data", [](const Experts& e, int proj, int s) {  // (address, bytes) of a shard's matrix
        const ExpertMatrix& m = e.shards().at(s).m[proj];
        return std::make_tuple((uintptr_t)m.data, m.bytes(), (bool)m.owned);
      })
      .def("dequantize", [](const Experts& e, int proj, int ex, uintptr_t dst) {
        e.dequantize(proj, ex, (float*)dst);
      }, nb::call_guard<nb::gil_scoped_release>())
      .def("forward", [](const Experts& e, uintptr_t x, int xd, int T, uintptr_t ids, int idd, int K, uintptr_t w,
                         uintptr_t out, int od) {
        e.forward(make_args(x, xd, T, ids, idd, K, w, out, od, 0));
      }, nb::call_guard<nb::gil_scoped_release>())
      .def("submit", [](const Experts& e, uintptr_t x, int xd, int T, uintptr_t ids, int idd, int K, uintptr_t w,
                        uintptr_t out, int od) {
        return Handle{e.submit(make_args(x, xd, T, ids, idd, K, w, out, od, 0))};
      }, nb::call_guard<nb::gil_scoped_release>())
      .def("host_job", [](const Experts& e, uintptr_t x, int xd, int T, uintptr_t ids, int idd, int K, uintptr_t w,
                          uintptr_t out, int od, uintptr_t T_ptr) {
        return new HostJob{&e, make_args(x, xd, T, ids, idd, K, w, out, od, T_ptr)};
      }, nb::rv_policy::take_ownership, nb::keep_alive<0, 1>());
}
