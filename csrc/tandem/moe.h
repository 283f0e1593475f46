// A layer of routed experts in the kernel's layout, and the fused MoE forward.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "tandem/threadpool.h"

namespace tandem {

enum DType : int { DT_F32 = 0, DT_BF16 = 1, DT_I32 = 2, DT_I64 = 3 };

// E matrices [rows, cols] of one format, row-major in blocks along cols.
struct ExpertMatrix {
  int type = 0, E = 0, rows = 0, cols = 0;
  size_t row_bytes = 0;
  const uint8_t* data = nullptr;      // owned's pages or a caller's buffer (mapped GGUF blocks), kept alive by Python
  std::unique_ptr<NodeMemory> owned;  // set when the kernel holds the weights itself
  const uint8_t* row(int e, int r) const { return data + ((size_t)e * rows + r) * row_bytes; }
  size_t bytes() const { return (size_t)E * rows * row_bytes; }
};

// The intermediate rows [i0, i1) of every expert, in memory of one NUMA node: gate/up [E, i1-i0, H] and
// down [E, H, i1-i0] (its columns i0..i1). One shard holding everything on a single-node machine.
struct Shard {
  int i0 = 0, i1 = 0;
  int node = -1;  // OS node the pages were placed on (-1: none)
  ExpertMatrix m[3];
};

struct ForwardArgs {
  const void* x = nullptr;       // [T, H]
  int x_dtype = DT_F32;
  const void* ids = nullptr;     // [T, K]
  int ids_dtype = DT_I64;
  const float* weights = nullptr;  // [T, K]
  void* out = nullptr;           // [T, H]
  int out_dtype = DT_F32;
  int T = 0, K = 0;
  const int32_t* T_ptr = nullptr;  // if set, the token count is read from here when the job runs (<= T)
};

class Experts {
 public:
  // gate, up: [E, I, H]; down: [E, H, I] (nn.Linear orientation). numa_nodes <= 0: the pool's node count.
  Experts(int E, int I, int H, int gate_type, int up_type, int down_type, int numa_nodes = 0);
  Experts(const Experts&) = delete;
  Experts& operator=(const Experts&) = delete;
  int E() const { return E_; }
  int I() const { return I_; }
  int H() const { return H_; }
  int type(int proj) const;
  size_t nbytes(int proj) const;
  const std::vector<Shard>& shards() const { return shards_; }

  // Convert float rows [row0, row0 + nrows) of the stacked [E*rows, cols] matrix, multi-threaded.
  void quantize_from(int proj, const void* src, int src_dtype, int64_t row0, int64_t nrows);
  // Use a caller's buffer as-is (one shard, copy false), or copy it into the shards' node memory (huge pages).
  void map_blocks(int proj, const void* data, size_t nbytes, bool copy = false);
  void dequantize(int proj, int e, float* dst) const;  // [rows, cols] fp32

  // Whole MoE layer. Validates ids (throws on an id >= E; ids < 0 are skipped as padding).
  void forward(const ForwardArgs& a) const;
  std::shared_ptr<Job> submit(const ForwardArgs& a) const;  // returns at once; Job::wait() to sync
  std::shared_ptr<Job> make_job(const ForwardArgs& a, ThreadPool& pool) const;  // validated, not yet submitted

 private:
  void own(int proj);  // allocate every shard's matrix `proj` on its node
  size_t nbytes_of_full(int proj) const;  // bytes of the stacked matrix in its file layout
  int E_, I_, H_;
  int types_[3];
  std::vector<Shard> shards_;
};

// Experts with at least this many tokens in a call take the prefill GEMM path (where the kernel path has one:
// avx512_bf16, amx); the others the per-row decode path. TANDEM_CPU_GEMM_MIN_TOKENS sets it at first use.
void set_gemm_min_tokens(int n);
int gemm_min_tokens();

// C entry point for cudaLaunchHostFunc: arg is a HostJob*; runs the forward on the pool and returns when done.
struct HostJob {
  const Experts* experts;
  ForwardArgs args;
};
extern "C" void tandem_cpu_host_entry(void* host_job);

// Trace of host-entry calls, for finding where a graphed decode step waits: start and end (CLOCK_MONOTONIC ns,
// the clock of Python's time.perf_counter_ns on Linux), the CPU the driver thread ran on, tokens. Off unless
// host_trace_start was called; keeps the first `capacity` calls.
struct HostCall {
  int64_t start_ns, end_ns;
  int cpu, tokens;
};
int64_t host_trace_clock();                             // now (CLOCK_MONOTONIC ns) while tracing, else 0
void host_trace_record(const HostJob& job, int64_t t0);  // one call from t0 to now (no-op unless tracing)
void host_trace_start(int capacity);       // clears; capacity 0 turns tracing off
std::vector<HostCall> host_trace_take();  // the calls recorded so far (tracing stays on)

// Read nbytes with every pool thread, each its slice as `streams` runs side by side (the probe), `chunk` bytes of
// one run before the next's (64: line by line), with a software prefetch `prefetch` bytes ahead of each line read
// (0: none); a checksum.
uint64_t read_buffer(const void* p, size_t nbytes, int streams = 1, int prefetch = 0, int chunk = 64);
struct ReadPattern {
  int streams, prefetch, chunk;  // read_buffer's
};
constexpr int kNumReadPatterns = 12;
extern const ReadPattern kReadPatterns[kNumReadPatterns];
// Best read bandwidth (GB/s) of the pool over `reps` timed passes (after one untimed) of a fresh huge-page buffer
// of nbytes in each of kReadPatterns.
double bandwidth_probe(size_t nbytes, int reps);

}  // namespace tandem
