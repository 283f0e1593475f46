// Fused MoE layer: out[t] = sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = ids[t,k].
//
// One job on the pool, phases split by barriers:
//   0. thread 0 groups the (token, k) slots by expert, marks each active expert decode (few tokens: per-row
//      dot kernels on int8 activations) or GEMM (>= gemm_min_tokens: bf16 panels on AMX / AVX512-BF16, or
//      for int8_row layers int8 on AMX-INT8 / VNNI), and lays out the work; then every thread quantizes x
//      rows (decode experts) or packs them as bf16 (int8: per-token quantized) token groups (GEMM experts). A
//      decode call (fewer tokens than a GEMM expert takes) quantizes x while thread 0 plans;
//   1. items = (shard, active expert, chunk of that shard's intermediate rows): gate and up for every token of
//      the expert, silu(g) * u stored as the down projection's input (int8 blocks or packed bf16; int8 GEMM:
//      fp32, then 1b. per token group, quantized per token over the whole I and packed). GEMM experts come
//      first, most tokens first, each as one GEMM run of 16 gate + 16 up rows per panel;
//   2. items = (shard, chunk of H rows) over all active experts: each thread owns its output rows, so the
//      weighted sum needs no atomics. With several NUMA shards each writes a partial sum ...
//   3. ... which one more pass adds up.
// Threads take items of their own node's shard first, then help the others. A decode thread takes its next item
// where its prefetch reaches the end of the current one, so the prefetch runs on into that item's rows.
#include "tandem/moe.h"

#include <algorithm>
#include <atomic>
#include <time.h>
#include <sched.h>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#include "tandem/cpu_features.h"
#include "tandem/kernels.h"
#include "tandem/read_ahead.h"

namespace tandem {

namespace {

inline float silu(float g) { return g / (1.f + std::exp(-g)); }  // gated activation: swap here for others

inline int64_t read_id(const void* ids, int dtype, int64_t i) {
  return dtype == DT_I32 ? (int64_t)((const int32_t*)ids)[i] : ((const int64_t*)ids)[i];
}

// n values from value `at` of a float32 or bf16 buffer
inline void load_f32(const void* src, int dtype, int64_t at, int n, float* dst) {
  if (dtype == DT_F32) {
    std::memcpy(dst, (const float*)src + at, (size_t)n * 4);
  } else {
    const bf16_t* s = (const bf16_t*)src + at;
    for (int j = 0; j < n; j++) dst[j] = bf16_to_f32(s[j]);
  }
}

WTypeInfo info_of(int type) {
  WTypeInfo info;
  if (!wtype_info(type, &info)) throw std::invalid_argument("unknown weight type " + std::to_string(type));
  return info;
}

inline size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }
inline int round_down(int n, int m) { return n / m * m; }

ActRow shifted(ActRow a, int i0, int B) {  // the view of values i0.. of a row (i0 a multiple of B and 16)
  if (B == 0) {
    a.f += i0;
  } else {
    a.qs += i0;
    a.d += i0 / B;
    a.isum += i0 / B;
    a.bsum16 += i0 / 16;
  }
  return a;
}

std::atomic<int> g_gemm_min{-1};

bool env_flag(const char* name, bool dflt) {
  const char* env = std::getenv(name);
  return env && *env ? env[0] != '0' : dflt;
}

// int8_row layers: the int8 GEMM where the kernel path has one (TANDEM_CPU_GEMM_I8=0: decode path only, for
// measuring).
bool gemm_i8_on() {
  static const bool on = env_flag("TANDEM_CPU_GEMM_I8", true);
  return on;
}

// AMX: dequantize the next weight chunk between the tile products (TANDEM_CPU_GEMM_OVERLAP=0: one after the
// other, for measuring).
bool gemm_overlap_on() {
  static const bool on = env_flag("TANDEM_CPU_GEMM_OVERLAP", true);
  return on;
}

// GEMM down items per thread, at least (TANDEM_CPU_DOWN_ITEMS, 1..8, default 2; for measuring): each item reads
// every GEMM expert's packed h, so fewer, larger items read it fewer times. H200 Xeon, int8_row T = 2048: 2 vs 4
// per thread DS-V3 65.5 vs 82.3 ms, Qwen3 11.2 vs 11.9 ms (bench/results/cpu_moe-xeon-h200.md).
int down_items_per_thread() {
  static const int n = [] {
    const char* env = std::getenv("TANDEM_CPU_DOWN_ITEMS");
    return env && *env ? std::clamp((int)std::strtol(env, nullptr, 10), 1, 8) : 2;
  }();
  return n;
}

// Decode down items per thread of a shard (before the tail): 2 on Intel (16-core Xeon, Qwen3 int4 T = 1, 3 runs
// each: 0.222-0.237 ms vs 0.231-0.240 with 4: longer runs per expert), 4 on AMD (2-core EPYC: runs of ~61 KB
// streamed best). TANDEM_CPU_DECODE_DOWN_ITEMS sets it (1..16).
int decode_down_items() {
  const char* env = std::getenv("TANDEM_CPU_DECODE_DOWN_ITEMS");
  return env && *env ? std::clamp((int)std::strtol(env, nullptr, 10), 1, 16) : cpu_is_amd() ? 4 : 2;
}

// Decode items end in 16-row ones (phases end within a small item of each thread) with >= 4 threads per shard;
// with 2 the larger runs stream better (2-core EPYC). TANDEM_CPU_TAIL=0 / 1 forces it.
bool tail_on(int threads) {
  const char* env = std::getenv("TANDEM_CPU_TAIL");
  if (env && *env) return std::strcmp(env, "0") != 0;
  return threads >= 4;
}

// TANDEM_CPU_PROFILE=1: each forward prints per-phase wall times (mean / max over threads) to stderr.
bool profile_on() {
  static const bool on = env_flag("TANDEM_CPU_PROFILE", false);
  return on;
}

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Items of `units` equal work units for `threads` threads: the fewest items (at least min_per_thread per
// thread) whose last round keeps >= 90 % of the threads busy; returns units per item.
int balanced_chunk(int units, int threads, int min_per_thread) {
  int best = 1;
  double best_eff = 0;
  for (int m = min_per_thread; m <= 8; m++) {
    const int per = std::max(1, (units + m * threads - 1) / (m * threads)), items = (units + per - 1) / per;
    const double eff = (double)items / ((double)((items + threads - 1) / threads) * threads);
    if (eff > best_eff + 1e-9) {
      best = per;
      best_eff = eff;
    }
    if (eff >= 0.9) return per;
  }
  return best;
}

// Decode streams each weight row once: ask for the next rows ahead (into L2), across the 4 KB page edges where
// the hardware streamer stops -- on Intel. On AMD (Zen 4/5) the streamer keeps up by itself and a row's burst of
// prefetches costs: one thread streaming int4_g32 rows of 7168 on the 2-core EPYC, 31.5 GB/s without vs 17.9
// GB/s with (bench/results/cpu_moe-epyc-2core.md). TANDEM_CPU_PREFETCH=0/1 forces it (measuring, tests).
bool prefetch_on() { return env_flag("TANDEM_CPU_PREFETCH", !cpu_is_amd()); }  // read per call (MoEJob)

inline void prefetch_row(const uint8_t* p, size_t n) {
  for (size_t o = 0; o < n; o += 64) __builtin_prefetch(p + o, 0, 2);
}

// Decode's prefetch of the next rows spread over the current row's dot (kernels' dot_pf), not in one burst
// before it. TANDEM_CPU_PF_INLINE=0/1 (read per call, for measuring).
bool pf_inline_on() { return env_flag("TANDEM_CPU_PF_INLINE", true); }

// Decode's prefetch distance in bytes of a run (the next row at least; 0: gate/up 1 row, down 2 rows ahead).
// TANDEM_CPU_PF_BYTES (read per call, for measuring).
int prefetch_bytes() {
  const char* env = std::getenv("TANDEM_CPU_PF_BYTES");
  return env && *env ? std::clamp((int)std::strtol(env, nullptr, 10), 0, 1 << 20) : 0;
}

// Decode reads an item's rows as this many runs side by side (row i of every run, then row i + 1): a Xeon core
// keeps more reads in flight with several streams (H200 host, 15 threads reading 4 GiB: 114 GB/s with one run per
// thread, 141 with two, 156 with four); on the 2-core EPYC (Zen 5) more runs read slower (DS-V3 int4 T = 1:
// 4.8 / 6.0 / 10 ms with 1 / 2 / 4), so one there. The row order changes nothing in the results.
// TANDEM_CPU_STREAMS sets it.
int decode_streams() {  // read once per call (MoEJob::streams_)
  const char* env = std::getenv("TANDEM_CPU_STREAMS");
  return env && *env ? std::clamp((int)std::strtol(env, nullptr, 10), 1, 8) : cpu_is_amd() ? 1 : 2;
}

// Row i of [r0, r1) read as `streams` runs of len rows: row i is run i % streams, its (i / streams)-th row.
struct RowOrder {
  int r0, r1, streams, len;
  RowOrder(int a, int b, int s)
      : r0(a), r1(b), streams(std::max(1, std::min(s, (b - a) / 4))), len((b - a + streams - 1) / streams) {}
  int count() const { return len * streams; }
  int row(int i) const { return r0 + i % streams * len + i / streams; }  // >= r1 for the last run's padding
  // What position i prefetches: the row d on in its run; from d rows before the runs' end on, the row as far into
  // `next`, the rows this thread reads after these (the next expert of a down item, the next item it took), so
  // the reads stay ahead across the edge. row -1: none.
  struct Ahead {
    int row;
    bool in_next;
  };
  Ahead ahead(int i, int d, const RowOrder& next) const {
    const int q = i + d * streams;  // run i % streams, d rows on
    if (q < count()) return {row(q) < r1 ? row(q) : -1, false};
    const int qn = q - count();
    if (qn >= next.count() || next.row(qn) >= next.r1) return {-1, false};
    return {next.row(qn), true};
  }
};
const RowOrder kNoRows(0, 0, 1);

constexpr int kTokenTile = 64;  // decode: tokens per pass over a chunk of weight rows (activations stay in L2)
constexpr int kNT = 4;          // decode: tokens per kernel call (register blocking)

struct Item {
  int shard, ai, r0, r1;
};

class MoEJob : public Job {
 public:
  MoEJob(const Experts& ex, const ForwardArgs& a, const KernelTable* kt, ThreadPool& pool)
      : ex_(ex), a_(a), kt_(kt), P_(pool), bar_(pool.size()), nthreads_(pool.size()), S_((int)ex.shards().size()) {
    Bx_ = info_of(ex.type(0)).act_blck;
    Bd_ = info_of(ex.type(2)).act_blck;
    xrow_ = act_row_bytes(ex.H(), Bx_);
    hrow_ = act_row_bytes(ex.I(), Bd_);
    bool gemm = kt->gemm_bf16 && kt->silu_pack && kt->scatter_add && ex.H() % 32 == 0;
    for (const Shard& s : ex.shards()) gemm = gemm && (s.i1 - s.i0) % 32 == 0;
    for (int p = 0; p < 3; p++) gemm = gemm && kt->dequant_bf16[wtype_slot(ex.type(p))];
    bool i8 = kt->gemm_i8 && kt->pack_tokens_i8 && kt->silu_store && kt->h_scale && kt->h_pack && kt->scatter_add &&
              gemm_i8_on();
    for (int p = 0; p < 3; p++) i8 = i8 && ex.type(p) == W_I8_ROW;  // H, I: multiples of its 64-value blocks
    i8_ = i8;
    gemm_ok_ = gemm || i8;
    for (int s = 0; s < S_; s++) next1_[s] = next2_[s] = 0;
    if (profile_on()) {
      made_ = now_s();
      marks_.reset(new double[(size_t)nthreads_ * kMarks]());
    }
  }

  void run(int tid, int) override {
    tls_tid_ = tid;
    Clock clk(nullptr);
    mark(tid, 0);
    const int T = tokens();
    const XSplit xs = x_split(T);
    uint8_t* const x_early = early_x(T);
    if (tid == 0) {
      if (profile_on()) clk.start(prof_ = new double[(size_t)nthreads_ * kPhases]());  // read after the barrier
      plan(x_early);
      clk.lap(0);
      mark(tid, 1);
    }
    if (x_early) quantize_x(T, xs, x_early, true);
    wait(clk);
    mark(tid, 2);
    if (tid != 0 && prof_) clk.start(prof_ + (size_t)tid * kPhases);
    // Each thread takes its first gate/up item now and asks for its first rows while x is quantized; it takes
    // each next item where its prefetch reaches the end of the current one, and the prefetch runs on into it.
    const int home = P_.thread_node(tid) % S_;
    const Item* item = take_gate_up(home);
    bool warm = item && owned_[tid].empty() && warm_up(*item);
    if (!x_early) quantize_x(T, xs, xact_, false);
    for (int i; (i = next0b_.fetch_add(1)) < (int)pack_items_.size();) pack(i);
    clk.lap(1);
    mark(tid, 3);
    if (!x_early || !pack_items_.empty()) wait(clk);
    mark(tid, 4);
    for (const Item& own : owned_[tid]) {  // rows this thread read ahead: in its L2
      gate_up(own, [] { return (const Item*)nullptr; });
      clk.lap(3);
    }
    while (item) {
      const Item* next = nullptr;
      warm = gate_up(*item, [&] { return next = take_gate_up(home); }, warm);
      clk.lap(gemm_[item->ai] ? 2 : 3);
      item = next;
    }
    mark(tid, 5);
    Item rows{}, next_rows{};  // the first down item's first rows while the other threads finish gate/up
    bool have = take_down(home, &rows);
    warm = have && warm_down(rows);
    wait(clk);
    mark(tid, 6);
    if (tid == 0 && decode_call(T)) P_.scratch(1).get(xrow_ * T);  // x is read no more: grown for next calls
    if (i8_ && !pack_items_.empty()) {
      for (int i; (i = next1b_.fetch_add(1)) < (int)pack_items_.size();) quant_h(i);
      clk.lap(8);
      wait(clk);
    }
    while (have) {
      bool more = false;
      warm = down(rows, [&] { return (more = take_down(home, &next_rows)) ? &next_rows : nullptr; }, warm);
      rows = next_rows;
      have = more;
    }
    clk.lap(4);
    mark(tid, 7);
    if (S_ > 1) {
      wait(clk);
      for (int it; (it = next3_.fetch_add(1)) < n_items3_;) finish(it);
      clk.lap(5);
    }
    if (prof_) {
      wait(clk);
      if (tid == 0) report();
    }
  }

  ~MoEJob() override { delete[] prof_; }

 private:
  static constexpr int kMaxShards = 16;
  // Profile phases: plan, prepare, gate/up GEMM items, gate/up decode items, down, finish, barrier waits; the
  // GEMM epilogues (silu_pack / silu_store, scatter_add), a part of gate/up GEMM and down; h's quantization
  // (int8 GEMM).
  static constexpr int kPhases = 9, kWait = 6, kEpilogue = 7;
  struct Clock {
    double* acc;
    double t;
    explicit Clock(double* a) : acc(a), t(a ? now_s() : 0) {}  // acc: this thread's kPhases sums
    void start(double* a) {
      acc = a;
      t = now_s();
    }
    void lap(int phase) {
      if (!acc) return;
      const double n = now_s();
      acc[phase] += n - t;
      t = n;
    }
  };
  // TANDEM_CPU_PROFILE timeline: when each thread passed each point, after the job was made (submitted); `posted`:
  // when the pool made it the running job (a job queued behind another waits for it).
  static constexpr int kMarks = 8;
  void mark(int tid, int k) {
    if (marks_) marks_[(size_t)tid * kMarks + k] = now_s() - made_;
  }
  std::string timeline() const {
    static const char* names[kMarks] = {"enter", "plan", "bar0", "prepared", "bar1", "gate_up", "bar2", "down"};
    char buf[64];
    const double posted = std::chrono::duration<double>(posted_at.time_since_epoch()).count() - made_;
    std::snprintf(buf, sizeof buf, " | us after submit: posted %.1f, first-last thread:", 1e6 * posted);
    std::string line = buf;
    for (int k = 0; k < kMarks; k++) {
      double lo = 1e9, hi = 0;
      for (int t = 0; t < nthreads_; t++)
        if (const double v = marks_[(size_t)t * kMarks + k]; v > 0) lo = std::min(lo, v), hi = std::max(hi, v);
      std::snprintf(buf, sizeof buf, " %s %.1f-%.1f", names[k], 1e6 * lo, 1e6 * hi);
      line += buf;
    }
    return line;
  }

  void wait(Clock& clk) {
    bar_.arrive_and_wait();
    clk.lap(kWait);
  }
  void report() const {
    static const char* names[kPhases] = {"plan", "prepare", "gate_up_gemm", "gate_up_decode", "down", "finish",
                                         "wait", "epilogue", "h_quant"};
    int n_gemm = 0;
    for (int g : gemm_) n_gemm += g;
    std::string line = "tandem moe T=" + std::to_string(T_) + " experts=" + std::to_string(active_.size()) +
                       " gemm=" + std::to_string(n_gemm) + (i8_ ? " int8" : "") + " ms mean/max:";
    for (int ph = 0; ph < kPhases; ph++) {
      double sum = 0, mx = 0;
      for (int t = 0; t < nthreads_; t++) {
        sum += prof_[(size_t)t * kPhases + ph];
        mx = std::max(mx, prof_[(size_t)t * kPhases + ph]);
      }
      char buf[96];
      std::snprintf(buf, sizeof buf, " %s %.2f/%.2f", names[ph], 1e3 * sum / nthreads_, 1e3 * mx);
      line += buf;
    }
    std::fprintf(stderr, "%s%s\n", line.c_str(), timeline().c_str());
  }

  template <typename Sizes>
  bool take(std::atomic<int>* next, const Sizes& sizes, int home, int* s, int* it) {
    for (int k = 0; k < S_; k++) {
      const int sh = (home + k) % S_;
      if (next[sh].load(std::memory_order_relaxed) >= size_of(sizes, sh)) continue;
      const int i = next[sh].fetch_add(1);
      if (i < size_of(sizes, sh)) {
        *s = sh;
        *it = i;
        return true;
      }
    }
    return false;
  }
  const Item* take_gate_up(int home) {
    int s, it;
    return take(next1_, items1_, home, &s, &it) ? &items1_[s][it] : nullptr;
  }
  bool take_down(int home, Item* rows) {  // rows: {shard, -1, h0, h1}
    int s, it;
    if (!take(next2_, n_items2_, home, &s, &it)) return false;
    const auto [h0, h1] = down_rows(it);
    *rows = {s, -1, h0, h1};
    return true;
  }
  static int size_of(const std::vector<std::vector<Item>>& v, int s) { return (int)v[s].size(); }
  static int size_of(const std::vector<int>& v, int s) { return v[s]; }

  // Tokens of this call (a CUDA graph's GPU side may have written how many to T_ptr).
  int tokens() const { return a_.T_ptr ? std::clamp(*a_.T_ptr, 0, a_.T) : a_.T; }

  // x's quantization in items of a token row's part, whole 128-value groups, so that at T = 1 the threads share it
  // instead of waiting for one of them (~5-10 us for H = 2048 alone).
  struct XSplit {
    int part, parts;  // values per part, parts per row
  };
  XSplit x_split(int T) const {
    const int H = ex_.H(), unit = std::max(128, Bx_);
    const int parts = T > 0 ? std::clamp(nthreads_ / T, 1, std::max(1, H / unit)) : 1;
    const int part = (int)round_up((H + parts - 1) / parts, unit);
    return {part, (H + part - 1) / part};
  }

  // Where a decode call (fewer tokens than a GEMM expert takes) quantizes x while thread 0 plans: scratch slot 1,
  // which thread 0 grows only after gate/up (x's last reader), so every thread finds the same size here; nullptr:
  // too small yet, x is quantized after the plan.
  uint8_t* early_x(int T) const {
    Scratch& buf = P_.scratch(1);
    return decode_call(T) && buf.size() >= xrow_ * T ? buf.data() : nullptr;
  }
  bool decode_call(int T) const { return T > 0 && T < min_tok_; }

  // Token rows' parts (all rows, or those a decode expert reads), into x's activation rows at dst.
  void quantize_x(int T, const XSplit& xs, uint8_t* dst, bool all) {
    const int H = ex_.H();
    static thread_local std::vector<float> row;
    for (int it; (it = next0_.fetch_add(1)) < T * xs.parts;) {
      const int t = it / xs.parts, i0 = it % xs.parts * xs.part, n = std::min(H, i0 + xs.part) - i0;
      if (!all && !need_x_[t]) continue;
      row.resize(n);
      load_f32(a_.x, a_.x_dtype, (int64_t)t * H + i0, n, row.data());
      quantize_act(row.data(), n, Bx_, dst + (size_t)t * xrow_, H, i0);
    }
  }

  // Thread 0: routing, decode/GEMM choice, work items, scratch buffers; x_early: x's rows, quantized meanwhile.
  void plan(uint8_t* x_early) {
    T_ = tokens();
    const int E = ex_.E(), K = a_.K, I = ex_.I(), H = ex_.H(), T = T_;
    std::vector<int> count(E + 1, 0);
    for (int64_t i = 0; i < (int64_t)T * K; i++) {
      const int64_t e = read_id(a_.ids, a_.ids_dtype, i);
      if (e >= 0 && e < E) count[e]++;
    }
    off_.assign(1, 0);
    std::vector<int> pos(E, 0);
    for (int e = 0; e < E; e++)
      if (count[e]) {
        pos[e] = off_.back();
        active_.push_back(e);
        off_.push_back(off_.back() + count[e]);
      }
    const int n_slots = off_.back();
    slot_tok_.resize(n_slots);
    slot_w_.resize(n_slots);
    for (int64_t i = 0; i < (int64_t)T * K; i++) {
      const int64_t e = read_id(a_.ids, a_.ids_dtype, i);
      if (e < 0 || e >= E) continue;
      slot_tok_[pos[e]] = (int)(i / K);
      slot_w_[pos[e]++] = a_.weights[i];
    }
    // Decode or GEMM per expert; buffers: decode slots get compact rows, GEMM experts packed token groups.
    const int n_act = (int)active_.size();
    gemm_.assign(n_act, 0);
    dpos_.assign(n_act, -1);
    xp_off_.assign(n_act, 0);
    hp_off_.assign(n_act, 0);
    need_x_.assign(T, 0);
    int n_dec_slots = 0, max_ntg = 0;
    size_t xp = 0, hp = 0;
    for (int ai = 0; ai < n_act; ai++) {
      const int n = off_[ai + 1] - off_[ai];
      if (gemm_ok_ && n >= min_tok_) {
        gemm_[ai] = 1;
        const int ntg = (n + kGemmTokens - 1) / kGemmTokens;
        max_ntg = std::max(max_ntg, ntg);
        xp_off_[ai] = xp;
        hp_off_[ai] = hp;
        xp += (size_t)ntg * kGemmTokens * H;
        hp += (size_t)ntg * kGemmTokens * I;  // every shard's rows: shard s at columns i0.. of a K = I-i0 view
        for (int g = 0; g < ntg; g++) pack_items_.push_back({ai, g});
      } else {
        dpos_[ai] = n_dec_slots;
        dec_.push_back(ai);
        n_dec_slots += n;
        for (int s = off_[ai]; s < off_[ai + 1]; s++) need_x_[slot_tok_[s]] = 1;
      }
    }
    ThreadPool& P = P_;
    size_t need = 0;
    auto carve = [&need](size_t bytes) { const size_t at = need; need += round_up(bytes, 64); return at; };
    const size_t es = i8_ ? 1 : 2;  // bytes per packed value: int8 or bf16
    const size_t o_xact = carve(x_early ? 0 : xrow_ * T), o_hact = carve(hrow_ * n_dec_slots),
                 o_hbuf = carve((size_t)n_dec_slots * I * 4), o_xp = carve(xp * es), o_hp = carve(hp * es);
    // int8 GEMM: h in fp32 ([group][I][16] per expert) until its per-token scale is known; per-token scales
    const size_t o_hf = carve(i8_ ? hp * 4 : 0), o_xs = carve(i8_ ? xp / H * 4 : 0), o_hs = carve(i8_ ? xp / H * 4 : 0);
    const size_t o_part = carve(S_ > 1 || a_.out_dtype != DT_F32 ? (size_t)S_ * T * H * 4 : 0);  // fp32 sums
    panel_stride_ = round_up(ring_bytes() + (size_t)kGemmRows * max_ntg * kGemmTokens * 4, 64);
    const size_t o_thr = carve(max_ntg ? panel_stride_ * nthreads_ : 0);
    uint8_t* base = P.scratch(0).get(std::max<size_t>(need, 64));
    xact_ = x_early ? x_early : base + o_xact;
    hact_ = base + o_hact;
    hbuf_ = (float*)(base + o_hbuf);
    xp_ = (bf16_t*)(base + o_xp);
    hp_ = (bf16_t*)(base + o_hp);
    xq_ = (int8_t*)(base + o_xp);
    hq_ = (int8_t*)(base + o_hp);
    hf_ = (float*)(base + o_hf);
    xs_ = (float*)(base + o_xs);
    hs_ = (float*)(base + o_hs);
    part_ = (float*)(base + o_part);
    thr_ = base + o_thr;
    // Phase 1 items per shard: GEMM experts (most tokens first: the short ones fill the end) in runs of up
    // to 256 rows, ~8 items per thread (each item reads its expert's packed tokens into L2 once); decode
    // experts in chunks of 16 rows, sized for ~8 items per thread of the shard's share (whole 256-row down
    // activation blocks left 24 items for 16 threads at Qwen3's T = 1); the item that completes a down
    // activation block quantizes it (hdone_ counts its rows).
    const int unit = 16;
    hdone_.reset(Bd_ > 0 ? new std::atomic<int>[(size_t)n_act * (I / Bd_)]() : nullptr);
    const int per_shard_threads = std::max(1, nthreads_ / S_);
    std::vector<int> by_size;
    for (int ai = 0; ai < n_act; ai++)
      if (gemm_[ai]) by_size.push_back(ai);
    std::stable_sort(by_size.begin(), by_size.end(),
                     [this](int a, int b) { return off_[a + 1] - off_[a] > off_[b + 1] - off_[b]; });
    items1_.assign(S_, {});
    owned_.assign(nthreads_, {});
    const std::shared_ptr<ReadAheadRecord> rec = n_act ? read_ahead_take(&ex_, P_) : nullptr;
    for (int s = 0; s < S_; s++) {
      const Shard& sh = ex_.shards()[s];
      const int In = sh.i1 - sh.i0;
      const size_t g_want = (size_t)8 * per_shard_threads, g_rows = by_size.size() * (size_t)In;
      const int run = (int)std::clamp<size_t>(round_up((g_rows + g_want - 1) / g_want, 16), 32, 256);
      for (int ai : by_size)
        for (int r = 0; r < In; r += run) items1_[s].push_back({s, ai, r, std::min(In, r + run)});
      const int n_dec = n_act - (int)by_size.size();
      if (!n_dec) continue;
      const size_t rows = (size_t)n_dec * In, want = (size_t)8 * per_shard_threads;
      const int chunk = (int)std::min<size_t>(round_up(In, unit), round_up((rows + want - 1) / want, unit));
      // the last rows of every expert in 16-row items at the end of the list: the threads then reach the
      // barrier within a small item of each other (a 64-row Qwen3 item takes ~20 us of one thread's bandwidth)
      const int tail_want = (int)round_up(per_shard_threads * chunk / (2 * n_dec), unit);
      const int tail = tail_on(per_shard_threads) ? std::min(round_down(In / 4, unit), tail_want) : 0;
      std::vector<int> read_ahead(n_act, -1);  // rank of each decode expert among the read-ahead's ids
      if (rec)
        for (int ai = 0; ai < n_act; ai++) {
          const auto at = std::find(rec->ids.begin(), rec->ids.end(), active_[ai]);
          if (!gemm_[ai] && at != rec->ids.end()) read_ahead[ai] = (int)(at - rec->ids.begin());
        }
      for (int ai = 0; ai < n_act; ai++)
        if (!gemm_[ai] && read_ahead[ai] < 0)
          for (int r = 0; r < In - tail; r += chunk) items1_[s].push_back({s, ai, r, std::min(In - tail, r + chunk)});
      for (int ai = 0; ai < n_act; ai++)
        if (read_ahead[ai] >= 0) split_read_ahead(*rec, s, ai, read_ahead[ai], In, chunk);
      for (int ai = 0; ai < n_act; ai++)
        if (!gemm_[ai] && read_ahead[ai] < 0)
          for (int r = In - tail; r < In; r += unit) items1_[s].push_back({s, ai, r, std::min(In, r + unit)});
    }
    // Phase 2 items: chunks of H rows. With GEMM experts, whole panels in balanced items (each item reads
    // every GEMM expert's packed h once, from L3); else about 4 per thread of the shard: an item streams each
    // expert's rows [h0, h1) as one run, and 8 per thread cut Qwen3's runs to 61 KB (2-core EPYC, T = 1: down
    // 0.23 -> 0.19 ms).
    tail2_ = 0;
    if (max_ntg) {  // >= 2 per thread: larger items re-read each expert's packed h less (see down_items_per_thread)
      chunk2_ = kGemmRows * balanced_chunk(H / kGemmRows, per_shard_threads, down_items_per_thread());
    } else if (tail_on(per_shard_threads)) {
      // the same number of big items for every thread over about 3/4 of H, the rest in 16-row items: the call
      // ends within a small item of each thread (and a thread that took a big item ahead is not the last)
      const int m = decode_down_items() * per_shard_threads;
      chunk2_ = 16 * std::max(1, H / 16 * 3 / 4 / m);
      tail2_ = H - std::min(m, H / chunk2_) * chunk2_;
    } else {
      chunk2_ = (int)std::max<size_t>(16, round_up(H / (decode_down_items() * per_shard_threads), 16));
    }
    nbig2_ = (H - tail2_ + chunk2_ - 1) / chunk2_;
    n_items2_.assign(S_, T > 0 ? nbig2_ + (tail2_ + 15) / 16 : 0);  // also with no active expert: zero out
    chunk3_ = 256;
    n_items3_ = T > 0 ? (int)(((size_t)T * H + chunk3_ - 1) / chunk3_) : 0;
  }

  // A read-ahead expert's gate/up rows of shard s: what each reader read becomes that thread's own item, the rest
  // shared items of at most `chunk` rows.
  void split_read_ahead(const ReadAheadRecord& rec, int s, int ai, int rank, int In, int chunk) {
    const Shard& sh = ex_.shards()[s];
    uint64_t used = 0;
    for (int j = 0; j < rec.readers(); j++) {
      const int lo = ReadAheadRecord::slice_lo(In, j, rec.readers()), hi = ReadAheadRecord::slice_lo(In, j + 1,
                                                                                                    rec.readers());
      const int n = rec.rows_read(rank, s, j, In);
      if (n > 0) owned_[rec.reader_tid(j)].push_back({s, ai, lo, lo + n});
      for (int r = lo + n; r < hi; r += chunk) items1_[s].push_back({s, ai, r, std::min(hi, r + chunk)});
      used += (uint64_t)n * (sh.m[0].row_bytes + sh.m[1].row_bytes);
    }
    read_ahead_count_used(used);
  }

  ActRow xview(int t) const { return act_row_view(xact_ + (size_t)t * xrow_, ex_.H(), Bx_); }
  ActRow hview(int c) const { return act_row_view(hact_ + (size_t)c * hrow_, ex_.I(), Bd_); }

  // Phase 0 item: pack one GEMM token group.
  void pack(int it) {
    const int H = ex_.H();
    static thread_local std::vector<float> row;
    const auto [ai, g] = pack_items_[it];
    const int s0 = off_[ai] + g * kGemmTokens, n = std::min(kGemmTokens, off_[ai + 1] - s0);
    if (i8_)
      return kt_->pack_tokens_i8(a_.x, a_.x_dtype == DT_BF16, H, slot_tok_.data() + s0, n,
                                 xq_ + xp_off_[ai] + (size_t)g * kGemmTokens * H, xs_ + gslot(ai) + g * kGemmTokens);
    if (kt_->pack_tokens && (int64_t)a_.T * H * 4 < ((int64_t)1 << 31))  // byte offsets of rows fit int32
      return kt_->pack_tokens(a_.x, a_.x_dtype == DT_BF16, H, slot_tok_.data() + s0, n,
                              xp_ + xp_off_[ai] + (size_t)g * kGemmTokens * H);
    uint32_t* dst = (uint32_t*)(xp_ + xp_off_[ai] + (size_t)g * kGemmTokens * H);  // [H/2][16] bf16 pairs
    for (int t = 0; t < kGemmTokens; t++) {
      if (t >= n) {
        for (int kk = 0; kk < H / 2; kk++) dst[kk * kGemmTokens + t] = 0;
        continue;
      }
      if (a_.x_dtype == DT_BF16) {  // bf16 pairs as they are
        const uint32_t* src = (const uint32_t*)((const bf16_t*)a_.x + (size_t)slot_tok_[s0 + t] * H);
        for (int kk = 0; kk < H / 2; kk++) dst[kk * kGemmTokens + t] = src[kk];
        continue;
      }
      row.resize(H);
      load_f32(a_.x, a_.x_dtype, (int64_t)slot_tok_[s0 + t] * H, H, row.data());
      for (int kk = 0; kk < H / 2; kk++)
        dst[kk * kGemmTokens + t] = f32_to_bf16(row[2 * kk]) | ((uint32_t)f32_to_bf16(row[2 * kk + 1]) << 16);
    }
  }

  // A thread's GEMM scratch: the ring of two dequantized weight chunks, then the C buffer.
  static size_t ring_bytes() { return round_up((size_t)2 * kGemmRows * kGemmLd * 2, 64); }
  bf16_t* ring(int tid) const { return (bf16_t*)(thr_ + panel_stride_ * tid); }
  float* cbuf(int tid) const { return (float*)(thr_ + panel_stride_ * tid + ring_bytes()); }
  GemmHalf half_of(const ExpertMatrix& m) const {
    const WTypeInfo info = info_of(m.type);
    return {kt_->dequant_bf16[wtype_slot(m.type)], m.row_bytes, info.blck, info.bytes};
  }

  // Bytes of weight rows a thread asks for ahead of its first gate/up item (while x is quantized) and of its first
  // down item (while the other threads finish gate/up).
  static constexpr size_t kWarmUpBytes = 16 << 10, kWarmDownBytes = 8 << 10;

  // The first rows of each run of a decode item's gate and up; returns whether it asked for them.
  bool warm_up(const Item& item) const {
    if (!prefetch_ || gemm_[item.ai] || off_[item.ai + 1] - off_[item.ai] > kTokenTile) return false;
    const Shard& sh = ex_.shards()[item.shard];
    const ExpertMatrix &G = sh.m[0], &U = sh.m[1];
    const RowOrder order(item.r0, item.r1, streams_);
    const size_t per_row = order.streams * (G.row_bytes + U.row_bytes);  // a row of each run, gate and up
    const int n = std::max<int>(ahead_rows(G.row_bytes, 1), kWarmUpBytes / per_row);
    for (int k = 0; k < order.streams; k++) {
      const int r = order.row(k), m = std::min(n, item.r1 - r);
      prefetch_row(G.row(active_[item.ai], r), G.row_bytes * std::max(0, m));
      prefetch_row(U.row(active_[item.ai], r), U.row_bytes * std::max(0, m));
    }
    return true;
  }

  // The first rows of each run of a down item's first decode expert; returns whether it asked for them.
  bool warm_down(const Item& rows) const {
    if (!prefetch_ || dec_.empty() || off_[dec_[0] + 1] - off_[dec_[0]] > kTokenTile) return false;
    const ExpertMatrix& D = ex_.shards()[rows.shard].m[2];
    const RowOrder order(rows.r0, rows.r1, streams_);
    const int n = std::max<int>(ahead_rows(D.row_bytes, 2), kWarmDownBytes / (order.streams * D.row_bytes));
    for (int k = 0; k < order.streams; k++) {
      const int h = order.row(k);
      prefetch_row(D.row(active_[dec_[0]], h), D.row_bytes * std::max(0, std::min(n, rows.r1 - h)));
    }
    return true;
  }

  // Gate/up rows of an item. take_next() gives the item this thread computes next (or nullptr); it is called once,
  // where the prefetch reaches the end of this item, and the prefetch runs on into that item's rows. `warm`: the
  // item before asked for this one's first rows. Returns whether this one asked for the next one's.
  template <typename TakeNext>
  bool gate_up(const Item& item, TakeNext&& take_next, bool warm = false) {
    if (gemm_[item.ai]) {
      gate_up_gemm(item);
      take_next();
      return false;
    }
    const int I = ex_.I(), H = ex_.H();
    const Shard& sh = ex_.shards()[item.shard];
    const int e = active_[item.ai], r0 = item.r0, r1 = item.r1;
    const int s0 = off_[item.ai], s1 = off_[item.ai + 1], c0 = dpos_[item.ai];
    const ExpertMatrix &G = sh.m[0], &U = sh.m[1];
    const vec_dot_fn dg = kt_->dot[wtype_slot(G.type)], du = kt_->dot[wtype_slot(U.type)];
    const vec_dot_pf_fn pg = pf_inline_ ? kt_->dot_pf[wtype_slot(G.type)] : nullptr,
                        pu = pf_inline_ ? kt_->dot_pf[wtype_slot(U.type)] : nullptr;
    const Item* next = nullptr;
    bool asked = false;
    RowOrder after = kNoRows;  // the next item's rows, once taken (decode, one pass)
    ActRow acts[kTokenTile];
    const bool pf = prefetch_;
    for (int st = s0; st < s1; st += kTokenTile) {
      const int ns = std::min(kTokenTile, s1 - st);
      for (int j = 0; j < ns; j++) acts[j] = xview(slot_tok_[st + j]);
      const RowOrder order(r0, r1, streams_);
      const int d = ahead_rows(G.row_bytes, 1);
      for (int k = 0; d > 1 && pf && st == s0 && !warm && k < order.streams; k++) {  // each run's first rows
        const int r = order.row(k), n = std::min(d, r1 - r);
        if (n <= 0) continue;
        prefetch_row(G.row(e, r), G.row_bytes * n);
        prefetch_row(U.row(e, r), U.row_bytes * n);
      }
      const int at = pf && s1 - s0 <= kTokenTile ? std::max(0, order.count() - d * order.streams) : -1;
      for (int i = 0; i < order.count(); i++) {
        if (i == at) {  // the prefetch reaches the end of the runs: take the next item
          asked = true;
          next = take_next();
          if (next && !gemm_[next->ai]) after = RowOrder(next->r0, next->r1, streams_);
        }
        const int r = order.row(i);
        if (r >= r1) continue;
        const uint8_t *wg = G.row(e, r), *wu = U.row(e, r);
        const RowOrder::Ahead a = pf && st == s0 ? order.ahead(i, d, after) : RowOrder::Ahead{-1, false};
        const ExpertMatrix *Gn = a.in_next ? &ex_.shards()[next->shard].m[0] : &G,
                           *Un = a.in_next ? &ex_.shards()[next->shard].m[1] : &U;
        const int ea = a.in_next ? active_[next->ai] : e;
        const uint8_t* ng = a.row < 0 ? nullptr : Gn->row(ea, a.row);
        const uint8_t* nu = a.row < 0 ? nullptr : Un->row(ea, a.row);
        if (ng && !pg) prefetch_row(ng, G.row_bytes);
        if (nu && !pu) prefetch_row(nu, U.row_bytes);
        for (int j = 0; j < ns; j += kNT) {
          const int m = std::min(kNT, ns - j);
          float g[kNT], u[kNT];
          if (ng && j == 0 && pg) pg(H, wg, acts + j, m, g, ng);
          else dg(H, wg, acts + j, m, g);
          if (nu && j == 0 && pu) pu(H, wu, acts + j, m, u, nu);
          else du(H, wu, acts + j, m, u);
          for (int l = 0; l < m; l++) hbuf_[(size_t)(c0 + st - s0 + j + l) * I + sh.i0 + r] = silu(g[l]) * u[l];
        }
      }
    }
    if (!asked) take_next();
    const bool ran_on = after.count() > 0;
    if (Bd_ == 0) {  // fp32 activations: copied as they are
      for (int c = c0; c < c0 + s1 - s0; c++)
        quantize_act(hbuf_ + (size_t)c * I + sh.i0 + r0, r1 - r0, 0, hact_ + (size_t)c * hrow_, I, sh.i0 + r0);
      return ran_on;
    }
    for (int k0 = (sh.i0 + r0) / Bd_ * Bd_; k0 < sh.i0 + r1; k0 += Bd_) {  // blocks this item wrote rows of
      const int rows = std::min(k0 + Bd_, sh.i0 + r1) - std::max(k0, sh.i0 + r0);
      // acq_rel: the last item to add sees every other item's rows of hbuf
      if (hdone_[(size_t)item.ai * (I / Bd_) + k0 / Bd_].fetch_add(rows, std::memory_order_acq_rel) + rows != Bd_)
        continue;
      for (int c = c0; c < c0 + s1 - s0; c++)
        quantize_act(hbuf_ + (size_t)c * I + k0, Bd_, Bd_, hact_ + (size_t)c * hrow_, I, k0);
    }
    return ran_on;
  }

  // Rows [r0, r1) of gate and up for all tokens of a GEMM expert: one GEMM run, a panel = 16 gate + 16 up
  // rows (the packed tokens read once for both), h = silu(g) * u packed as bf16 by the epilogue.
  // Epilogue time, when profiling (the epilogues run inside the GEMM kernels).
  struct EpilogueClock {
    const MoEJob* job;
    double t;
    explicit EpilogueClock(const MoEJob* j) : job(j), t(j->prof_ ? now_s() : 0) {}
    ~EpilogueClock() {
      if (job->prof_) job->prof_[(size_t)tls_tid_ * kPhases + kEpilogue] += now_s() - t;
    }
  };

  struct GateUpCtx {
    const MoEJob* job;
    const KernelTable* kt;
    bf16_t* hp;
    int n, In, r0;
  };
  static void gate_up_epilogue(void* ctx, int p, const float* C, int ldc) {
    const GateUpCtx& c = *(const GateUpCtx*)ctx;
    EpilogueClock clk(c.job);
    c.kt->silu_pack(C, C + (size_t)16 * ldc, ldc, 16, c.n, c.In, c.r0 + 16 * p, c.hp);
  }

  // int8 GEMM: h = silu(g) * u in fp32 at its rows i0 + r0 + 16 p of the expert's [group][I][16] buffer.
  struct GateUpI8Ctx {
    const MoEJob* job;
    float* hf;
    int n, k0;
  };
  static void gate_up_epilogue_i8(void* ctx, int p, const float* C, int ldc) {
    const GateUpI8Ctx& c = *(const GateUpI8Ctx*)ctx;
    EpilogueClock clk(c.job);
    c.job->kt_->silu_store(C, C + (size_t)16 * ldc, ldc, 16, c.n, c.k0 + 16 * p, c.job->ex_.I(), c.hf);
  }

  // First token slot of GEMM expert ai among the GEMM experts' (16-padded) slots.
  size_t gslot(int ai) const { return xp_off_[ai] / ex_.H(); }

  void gate_up_gemm(const Item& item) {
    const int tid = my_tid();
    const Shard& sh = ex_.shards()[item.shard];
    const int In = sh.i1 - sh.i0, e = active_[item.ai];
    const int n = off_[item.ai + 1] - off_[item.ai], ntg = (n + kGemmTokens - 1) / kGemmTokens;
    const ExpertMatrix &G = sh.m[0], &U = sh.m[1];
    std::vector<GemmPanel> panels;
    if (i8_) {
      const int8_t* X = xq_ + xp_off_[item.ai];
      const float* xs = xs_ + gslot(item.ai);
      for (int r = item.r0; r < item.r1; r += 16) panels.push_back({{G.row(e, r), U.row(e, r)}, X, ntg, xs});
      GateUpI8Ctx ctx{this, hf_ + hp_off_[item.ai], n, sh.i0 + item.r0};
      const GemmRun run{ex_.H(), {half_of(G), half_of(U)}, panels.data(), (int)panels.size(), ring(tid), cbuf(tid),
                        gate_up_epilogue_i8, &ctx, gemm_overlap_on()};
      return kt_->gemm_i8(run);
    }
    const bf16_t* X = xp_ + xp_off_[item.ai];
    for (int r = item.r0; r < item.r1; r += 16) panels.push_back({{G.row(e, r), U.row(e, r)}, X, ntg});
    GateUpCtx ctx{this, kt_, hp_ + hp_off_[item.ai] + (size_t)ntg * kGemmTokens * sh.i0, n, In, item.r0};
    const GemmRun run{ex_.H(), {half_of(G), half_of(U)}, panels.data(), (int)panels.size(), ring(tid), cbuf(tid),
                      gate_up_epilogue, &ctx, gemm_overlap_on()};
    kt_->gemm_bf16(run);
  }

  // Down rows [h0, h1) of every GEMM expert as one GEMM run (32 rows per panel), weighted into the output.
  struct DownCtx {
    const MoEJob* job;
    const int* panel_ai;
    int h0, panels_per_expert;
    float* o;
  };
  static void down_epilogue(void* ctx, int p, const float* C, int ldc) {
    const DownCtx& c = *(const DownCtx*)ctx;
    const MoEJob& J = *c.job;
    EpilogueClock clk(c.job);
    const int ai = c.panel_ai[p], s0 = J.off_[ai], n = J.off_[ai + 1] - s0;
    const int hb = c.h0 + p % c.panels_per_expert * kGemmRows;
    J.kt_->scatter_add(C, ldc, n, J.slot_tok_.data() + s0, J.slot_w_.data() + s0, c.o + hb, J.ex_.H());
  }

  // Phase 1b item (int8 GEMM): one token group of h, quantized per token over the whole I (the scale shared by
  // the NUMA shards) and packed into each shard's K = i1 - i0 view.
  void quant_h(int it) {
    const auto [ai, g] = pack_items_[it];
    const int I = ex_.I(), ntg = (off_[ai + 1] - off_[ai] + kGemmTokens - 1) / kGemmTokens;
    const float* Hf = hf_ + hp_off_[ai] + (size_t)g * I * kGemmTokens;
    alignas(64) float inv[kGemmTokens];
    kt_->h_scale(Hf, I, hs_ + gslot(ai) + g * kGemmTokens, inv);
    for (const Shard& sh : ex_.shards()) {
      const int In = sh.i1 - sh.i0;
      int8_t* dst = hq_ + hp_off_[ai] + (size_t)ntg * kGemmTokens * sh.i0 + (size_t)g * kGemmTokens * In;
      kt_->h_pack(Hf + (size_t)sh.i0 * kGemmTokens, In, inv, dst);
    }
  }

  void down_gemm(const Shard& sh, int h0, int h1, float* o) {
    const int tid = my_tid(), In = sh.i1 - sh.i0;
    const ExpertMatrix& D = sh.m[2];
    std::vector<GemmPanel> panels;
    std::vector<int> panel_ai;
    for (size_t ai = 0; ai < active_.size(); ai++) {
      if (!gemm_[ai]) continue;
      const int e = active_[ai], ntg = (off_[ai + 1] - off_[ai] + kGemmTokens - 1) / kGemmTokens;
      const size_t at = hp_off_[ai] + (size_t)ntg * kGemmTokens * sh.i0;
      const void* X = i8_ ? (const void*)(hq_ + at) : (const void*)(hp_ + at);
      const float* xs = i8_ ? hs_ + gslot((int)ai) : nullptr;
      for (int hb = h0; hb < h1; hb += kGemmRows) {
        panels.push_back({{D.row(e, hb), D.row(e, hb + 16)}, X, ntg, xs});
        panel_ai.push_back((int)ai);
      }
    }
    if (panels.empty()) return;
    DownCtx ctx{this, panel_ai.data(), h0, (h1 - h0) / kGemmRows, o};
    const GemmRun run{In, {half_of(D), half_of(D)}, panels.data(), (int)panels.size(), ring(tid), cbuf(tid),
                      down_epilogue, &ctx, gemm_overlap_on()};
    (i8_ ? kt_->gemm_i8 : kt_->gemm_bf16)(run);
  }

  int my_tid() const { return tls_tid_; }

  // Rows [h0, h1) of H that down item `it` computes.
  std::pair<int, int> down_rows(int it) const {
    const int H = ex_.H(), hb = H - tail2_;  // big items cover [0, hb), 16-row ones the rest
    const int h0 = it < nbig2_ ? it * chunk2_ : hb + (it - nbig2_) * 16;
    return {h0, it < nbig2_ ? std::min(hb, h0 + chunk2_) : std::min(H, h0 + 16)};
  }

  // Phase 2: rows [h0, h1) of the output (or of shard s's partial sum) over every active expert (rows: {s, -1, h0,
  // h1}). The decode experts' prefetch runs on into the next expert's rows, and from the last one into the item
  // take_next() gives (called once, where the prefetch gets there); `warm`: the item before asked for this one's
  // first rows. Returns whether this one asked for the next one's.
  template <typename TakeNext>
  bool down(const Item& rows, TakeNext&& take_next, bool warm) {
    const int H = ex_.H(), T = T_, s = rows.shard, h0 = rows.r0, h1 = rows.r1;
    const Shard& sh = ex_.shards()[s];
    const int In = sh.i1 - sh.i0;
    float* o = S_ == 1 && a_.out_dtype == DT_F32 ? (float*)a_.out : part_ + (size_t)s * T * H;
    for (int t = 0; t < T; t++) std::fill(o + (size_t)t * H + h0, o + (size_t)t * H + h1, 0.f);
    if (gemm_ok_) down_gemm(sh, h0, h1, o);
    const ExpertMatrix& D = sh.m[2];
    const vec_dot_fn dd = kt_->dot[wtype_slot(D.type)];
    const vec_dot_pf_fn pd = pf_inline_ ? kt_->dot_pf[wtype_slot(D.type)] : nullptr;
    ActRow acts[kTokenTile];
    const bool pf = prefetch_;
    const int d = ahead_rows(D.row_bytes, 2);
    const RowOrder order(h0, h1, streams_);
    const Item* next = nullptr;
    bool asked = false, into = warm;  // into: this expert's first rows were asked for already
    for (size_t k = 0; k < dec_.size(); k++) {
      const int ai = dec_[k], e = active_[ai], s0 = off_[ai], s1 = off_[ai + 1], c0 = dpos_[ai];
      const bool last = k + 1 == dec_.size(), one_pass = pf && s1 - s0 <= kTokenTile;
      const ExpertMatrix* Dn = &D;  // the rows read after e's: the next expert's, after the last the next item's
      int en = last ? -1 : active_[dec_[k + 1]];
      RowOrder after = one_pass && !last ? order : kNoRows;
      for (int st = s0; st < s1; st += kTokenTile) {
        const int ns = std::min(kTokenTile, s1 - st);
        for (int j = 0; j < ns; j++) acts[j] = shifted(hview(c0 + st - s0 + j), sh.i0, Bd_);
        for (int q = 0; pf && st == s0 && !into && q < order.streams; q++)  // each run's first rows
          prefetch_row(D.row(e, order.row(q)), D.row_bytes * std::min(d, h1 - order.row(q)));
        const int at = last && one_pass ? std::max(0, order.count() - d * order.streams) : -1;
        for (int i = 0; i < order.count(); i++) {
          if (i == at) {  // the prefetch reaches the end of the last expert's runs: take the next item
            asked = true;
            if ((next = take_next())) {
              after = RowOrder(next->r0, next->r1, streams_);
              Dn = &ex_.shards()[next->shard].m[2];
              en = active_[dec_[0]];
            }
          }
          const int h = order.row(i);
          if (h >= h1) continue;
          const uint8_t* wd = D.row(e, h);
          const RowOrder::Ahead a = pf && st == s0 ? order.ahead(i, d, after) : RowOrder::Ahead{-1, false};
          const uint8_t* nd = a.row < 0 ? nullptr : a.in_next ? Dn->row(en, a.row) : D.row(e, a.row);
          if (nd && !pd) prefetch_row(nd, D.row_bytes);
          for (int j = 0; j < ns; j += kNT) {
            const int m = std::min(kNT, ns - j);
            float r[kNT];
            if (nd && j == 0 && pd) pd(In, wd, acts + j, m, r, nd);
            else dd(In, wd, acts + j, m, r);
            for (int l = 0; l < m; l++) o[(size_t)slot_tok_[st + j + l] * H + h] += slot_w_[st + j + l] * r[l];
          }
        }
      }
      into = after.count() > 0;
    }
    if (!asked) take_next();
    if (S_ == 1 && a_.out_dtype == DT_BF16)  // one shard: this item's rows are final, round them here
      for (int t = 0; t < T; t++)
        for (int h = h0; h < h1; h++) ((bf16_t*)a_.out)[(size_t)t * H + h] = f32_to_bf16(o[(size_t)t * H + h]);
    return !dec_.empty() && into;
  }

  // Phase 3: out = sum of the shards' partial sums, in the output dtype.
  void finish(int it) {
    const size_t n = (size_t)T_ * ex_.H(), i0 = (size_t)it * chunk3_, i1 = std::min(n, i0 + chunk3_);
    for (size_t i = i0; i < i1; i++) {
      float v = part_[i];
      for (int s = 1; s < S_; s++) v += part_[(size_t)s * n + i];
      if (a_.out_dtype == DT_F32) ((float*)a_.out)[i] = v;
      else ((bf16_t*)a_.out)[i] = f32_to_bf16(v);
    }
  }

  const Experts& ex_;
  ForwardArgs a_;
  const KernelTable* kt_;
  ThreadPool& P_;
  Barrier bar_;
  int nthreads_, S_;
  int Bx_, Bd_, T_ = 0;
  size_t xrow_, hrow_;
  bool gemm_ok_ = false, i8_ = false;  // i8_: GEMM experts take the int8 GEMM (int8_row layer)
  std::vector<int> active_, off_, slot_tok_, gemm_, dpos_, need_x_;
  std::vector<int> dec_;  // the decode experts (indices into active_), in order
  std::vector<float> slot_w_;
  std::vector<size_t> xp_off_, hp_off_;
  std::vector<std::pair<int, int>> pack_items_;  // (active expert, token group)
  std::vector<std::vector<Item>> items1_;
  std::vector<std::vector<Item>> owned_;  // per thread: gate/up rows it read ahead, computed before items1_
  std::unique_ptr<std::atomic<int>[]> hdone_;  // rows of h written per (active expert, down activation block)
  std::vector<int> n_items2_;
  uint8_t *xact_ = nullptr, *hact_ = nullptr, *thr_ = nullptr;
  float *hbuf_ = nullptr, *part_ = nullptr;
  bf16_t *xp_ = nullptr, *hp_ = nullptr;
  int8_t *xq_ = nullptr, *hq_ = nullptr;        // int8 GEMM: the same buffers as xp_ / hp_, int8 quads
  float *hf_ = nullptr, *xs_ = nullptr, *hs_ = nullptr;  // int8 GEMM: fp32 h, per-token scales of x and h
  size_t panel_stride_ = 0;
  double* prof_ = nullptr;  // TANDEM_CPU_PROFILE: kPhases seconds per thread
  std::unique_ptr<double[]> marks_;  // TANDEM_CPU_PROFILE: kMarks points per thread (timeline())
  double made_ = 0;
  std::atomic<int> next0_{0}, next0b_{0}, next1b_{0}, next3_{0};
  std::atomic<int> next1_[kMaxShards], next2_[kMaxShards];
  const int streams_ = decode_streams();
  const bool prefetch_ = prefetch_on(), pf_inline_ = pf_inline_on();
  const int pf_bytes_ = prefetch_bytes();
  int ahead_rows(size_t row_bytes, int dflt) const {  // how far ahead in its run a row is prefetched
    return pf_bytes_ > 0 ? std::max<int>(1, (int)((pf_bytes_ + row_bytes - 1) / row_bytes)) : dflt;
  }
  int n_items3_ = 0, chunk2_ = 16, chunk3_ = 256, tail2_ = 0, nbig2_ = 0;
  const int min_tok_ = gemm_min_tokens();
  static thread_local int tls_tid_;
};

thread_local int MoEJob::tls_tid_ = 0;

// Weight conversion from fp32/bf16 rows into every shard: 16-row items shared by the pool threads.
class QuantJob : public Job {
 public:
  QuantJob(Experts& ex, int proj, const void* src, int dtype, int64_t row0, int64_t nrows, bool quantize)
      : ex_(ex), proj_(proj), src_(src), dtype_(dtype), row0_(row0), nrows_(nrows), quantize_(quantize) {}
  void run(int, int) override {
    const int cols = proj_ < 2 ? ex_.H() : ex_.I(), rows = proj_ < 2 ? ex_.I() : ex_.H();
    const WTypeInfo info = info_of(ex_.type(proj_));
    const size_t rb = row_bytes_of(info, cols);
    std::vector<float> row(quantize_ ? cols : 0);
    std::vector<uint8_t> q(rb);
    const int64_t n_items = (nrows_ + 15) / 16;
    for (int64_t it; (it = next_.fetch_add(1)) < n_items;)
      for (int64_t r = it * 16; r < std::min(nrows_, it * 16 + 16); r++) {
        const uint8_t* bytes;
        if (quantize_) {
          load_f32(src_, dtype_, (int64_t)r * cols, cols, row.data());
          quantize_row(ex_.type(proj_), row.data(), q.data(), cols);
          bytes = q.data();
        } else {
          bytes = (const uint8_t*)src_ + r * rb;
        }
        const int64_t R = row0_ + r;
        const int e = (int)(R / rows), rr = (int)(R % rows);
        for (const Shard& sh : ex_.shards()) {
          const ExpertMatrix& m = sh.m[proj_];
          if (proj_ < 2) {
            if (rr >= sh.i0 && rr < sh.i1) std::memcpy((uint8_t*)m.row(e, rr - sh.i0), bytes, rb);
          } else {  // down: the shard's columns, whole blocks
            slice_row(m.type, bytes, cols, sh.i0, sh.i1, (uint8_t*)m.row(e, rr));
          }
        }
      }
  }

 private:
  Experts& ex_;
  int proj_;
  const void* src_;
  int dtype_;
  int64_t row0_, nrows_;
  bool quantize_;
  std::atomic<int64_t> next_{0};
};

}  // namespace

void set_gemm_min_tokens(int n) { g_gemm_min.store(std::max(1, n)); }

int gemm_min_tokens() {
  int n = g_gemm_min.load();
  if (n > 0) return n;
  const char* env = std::getenv("TANDEM_CPU_GEMM_MIN_TOKENS");
  n = env && *env ? std::max(1, (int)std::strtol(env, nullptr, 10)) : 16;
  g_gemm_min.store(n);
  return n;
}

Experts::Experts(int E, int I, int H, int gate_type, int up_type, int down_type, int numa_nodes)
    : E_(E), I_(I), H_(H), types_{gate_type, up_type, down_type} {
  if (E <= 0 || I <= 0 || H <= 0) throw std::invalid_argument("E, I, H must be positive");
  const int cols[3] = {H, H, I};
  for (int p = 0; p < 3; p++) {
    WTypeInfo info;
    if (!wtype_info(types_[p], &info) || wtype_slot(types_[p]) < 0)
      throw std::invalid_argument("unsupported weight type " + std::to_string(types_[p]));
    if (cols[p] % info.blck)
      throw std::invalid_argument("dimension " + std::to_string(cols[p]) + " is not a multiple of the block size " +
                                  std::to_string(info.blck));
  }
  if (info_of(gate_type).act_blck != info_of(up_type).act_blck)
    throw std::invalid_argument("gate and up formats need the same activation block size");
  // NUMA split of I: whole down blocks / activation blocks / GEMM panels (multiples of `unit`) per node.
  ThreadPool& P = pool();
  int n = numa_nodes > 0 ? numa_nodes : P.nodes();
  const WTypeInfo di = info_of(down_type);
  const int unit = std::max({32, di.blck, di.act_blck});
  n = std::max(1, std::min(n, I % unit == 0 ? I / unit : 1));
  for (int s = 0; s < n; s++) {
    Shard sh;
    sh.i0 = (int)((int64_t)I / unit * s / n) * unit;
    sh.i1 = s + 1 == n ? I : (int)((int64_t)I / unit * (s + 1) / n) * unit;
    sh.node = n == P.nodes() ? P.node_os_id(s) : -1;
    const int In = sh.i1 - sh.i0;
    const int srows[3] = {In, In, H}, scols[3] = {H, H, In};
    for (int p = 0; p < 3; p++) {
      const WTypeInfo info = info_of(types_[p]);
      ExpertMatrix& m = sh.m[p];
      m.type = types_[p];
      m.E = E;
      m.rows = srows[p];
      m.cols = scols[p];
      m.row_bytes = row_bytes_of(info, scols[p]);
    }
    shards_.push_back(std::move(sh));
  }
}

int Experts::type(int proj) const {
  if (proj < 0 || proj > 2) throw std::invalid_argument("proj must be 0 (gate), 1 (up) or 2 (down)");
  return types_[proj];
}

size_t Experts::nbytes(int proj) const {
  type(proj);
  size_t n = 0;
  for (const Shard& s : shards_) n += s.m[proj].bytes();
  return n;
}

void Experts::own(int proj) {
  for (Shard& s : shards_) {
    ExpertMatrix& m = s.m[proj];
    if (m.owned) continue;
    m.owned = std::make_unique<NodeMemory>(std::max<size_t>(64, m.bytes()), s.node);
    m.data = m.owned->p;
  }
}

void Experts::quantize_from(int proj, const void* src, int src_dtype, int64_t row0, int64_t nrows) {
  const int rows = proj < 2 ? I_ : H_;
  if (type(proj) < 0 || row0 < 0 || nrows < 0 || row0 + nrows > (int64_t)E_ * rows)
    throw std::out_of_range("rows out of range");
  if (src_dtype != DT_F32 && src_dtype != DT_BF16) throw std::invalid_argument("source must be fp32 or bf16");
  if (!has_quantizer(types_[proj]))
    throw std::invalid_argument("no converter to weight type " + std::to_string(types_[proj]) +
                                " (GGUF block formats are loaded as-is)");
  own(proj);
  auto job = std::make_shared<QuantJob>(*this, proj, src, src_dtype, row0, nrows, true);
  pool().submit(job);
  job->wait();
}

void Experts::map_blocks(int proj, const void* data, size_t nbytes, bool copy) {
  const size_t want = nbytes_of_full(proj);
  if (nbytes != want)
    throw std::invalid_argument("expected " + std::to_string(want) + " bytes, got " + std::to_string(nbytes));
  if (shards_.size() == 1 && !copy) {
    ExpertMatrix& m = shards_[0].m[proj];
    m.owned.reset();
    m.data = (const uint8_t*)data;
    return;
  }
  own(proj);  // each shard's slice is copied into its node's memory
  const int64_t rows = (int64_t)E_ * (proj < 2 ? I_ : H_);
  auto job = std::make_shared<QuantJob>(*this, proj, data, DT_F32, 0, rows, false);
  pool().submit(job);
  job->wait();
}

size_t Experts::nbytes_of_full(int proj) const {
  const WTypeInfo info = info_of(type(proj));
  const int rows = proj < 2 ? I_ : H_, cols = proj < 2 ? H_ : I_;
  return (size_t)E_ * rows * row_bytes_of(info, cols);
}

void Experts::dequantize(int proj, int e, float* dst) const {
  type(proj);
  for (const Shard& s : shards_)
    if (!s.m[proj].data) throw std::runtime_error("weights not set");
  if (e < 0 || e >= E_) throw std::out_of_range("expert out of range");
  for (const Shard& s : shards_) {
    const ExpertMatrix& m = s.m[proj];
    if (proj < 2) {
      for (int r = 0; r < m.rows; r++) dequantize_row(m.type, m.row(e, r), dst + (size_t)(s.i0 + r) * H_, H_);
    } else {
      for (int h = 0; h < H_; h++) dequantize_row(m.type, m.row(e, h), dst + (size_t)h * I_ + s.i0, m.cols);
    }
  }
}

static void check_args(const Experts& ex, const ForwardArgs& a) {
  for (const Shard& s : ex.shards())
    for (int p = 0; p < 3; p++)
      if (!s.m[p].data) throw std::runtime_error("expert weights not set");
  if (a.T < 0 || a.K <= 0) throw std::invalid_argument("bad T or K");
  if (a.x_dtype != DT_F32 && a.x_dtype != DT_BF16) throw std::invalid_argument("x must be fp32 or bf16");
  if (a.out_dtype != DT_F32 && a.out_dtype != DT_BF16) throw std::invalid_argument("out must be fp32 or bf16");
  if (a.ids_dtype != DT_I32 && a.ids_dtype != DT_I64) throw std::invalid_argument("ids must be int32 or int64");
  if (a.T_ptr) return;  // contents filled later (host function in a CUDA graph): out-of-range ids are skipped
  for (int64_t i = 0; i < (int64_t)a.T * a.K; i++)
    if (read_id(a.ids, a.ids_dtype, i) >= ex.E())
      throw std::out_of_range("topk id " + std::to_string(read_id(a.ids, a.ids_dtype, i)) + " >= E");
}

std::shared_ptr<Job> Experts::make_job(const ForwardArgs& a, ThreadPool& pool) const {
  check_args(*this, a);
  return std::make_shared<MoEJob>(*this, a, kernels(), pool);
}

std::shared_ptr<Job> Experts::submit(const ForwardArgs& a) const {
  ThreadPool& p = pool();
  auto job = make_job(a, p);
  p.submit(job);
  return job;
}

void Experts::forward(const ForwardArgs& a) const { submit(a)->wait(); }

static std::vector<HostCall> g_trace;       // sized by host_trace_start while no host call runs
static std::atomic<int> g_trace_next{0}, g_trace_cap{0};

void host_trace_start(int capacity) {
  g_trace_cap.store(0);
  g_trace.assign(std::max(0, capacity), HostCall{});
  g_trace_next.store(0);
  g_trace_cap.store(std::max(0, capacity));
}

std::vector<HostCall> host_trace_take() {
  const int n = std::min(g_trace_next.load(), g_trace_cap.load());
  return std::vector<HostCall>(g_trace.begin(), g_trace.begin() + n);
}

static int64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int64_t host_trace_clock() { return g_trace_cap.load(std::memory_order_relaxed) ? monotonic_ns() : 0; }

void host_trace_record(const HostJob& h, int64_t t0) {
  if (!g_trace_cap.load(std::memory_order_relaxed)) return;
  const int slot = g_trace_next.fetch_add(1);
  if (slot < g_trace_cap.load())
    g_trace[slot] = {t0, monotonic_ns(), sched_getcpu(), h.args.T_ptr ? *h.args.T_ptr : h.args.T};
}

extern "C" void tandem_cpu_host_entry(void* host_job) {
  const HostJob* h = (const HostJob*)host_job;
  pin_to_free_cores();
  const int64_t t0 = host_trace_clock();
  try {
    h->experts->forward(h->args);
  } catch (...) {
    // No exception may cross into the CUDA runtime; the output is left as it was.
  }
  host_trace_record(*h, t0);
}

}  // namespace tandem

namespace tandem {
namespace {
// Memory read bandwidth probe: every pool thread sums its slice of the buffer as 64-bit words, reading it as
// `streams` interleaved runs (the kernels read gate and up rows side by side: more reads in flight per core), a piece
// of `chunk` bytes of each run in turn (64: line by line; a decode kernel reads a whole weight row of one run).
class ReadJob : public Job {
 public:
  ReadJob(const uint8_t* p, size_t n, int streams, int prefetch, int chunk)
      : p_(p), n_(n), streams_(std::max(1, streams)), ahead_(std::max(0, prefetch) / 64),
        piece_(std::max<size_t>(1, (size_t)std::max(0, chunk) / 64)) {}
  void run(int tid, int nthreads) override {
    const size_t lines = n_ / 64, per = (lines + nthreads - 1) / nthreads;
    const size_t l0 = std::min(lines, per * tid), l1 = std::min(lines, per * (tid + 1));
    const size_t run = (l1 - l0) / streams_;  // lines per stream; the remainder read after
    const uint64_t* w = (const uint64_t*)p_;
    uint64_t s[8] = {0};
    for (size_t i = 0; i < run; i += piece_)
      for (int k = 0; k < streams_; k++)
        for (size_t j = i; j < std::min(run, i + piece_); j++) {
          const uint64_t* line = w + (l0 + k * run + j) * 8;
          if (ahead_ && j + ahead_ < run) __builtin_prefetch(line + ahead_ * 8, 0, 2);  // as the kernel's rows
          for (int l = 0; l < 8; l++) s[l] += line[l];
        }
    for (size_t i = l0 + run * streams_; i < l1; i++)
      for (int l = 0; l < 8; l++) s[l] += w[i * 8 + l];
    uint64_t t = 0;
    for (int l = 0; l < 8; l++) t += s[l];
    sink_.fetch_add(t, std::memory_order_relaxed);
  }
  std::atomic<uint64_t> sink_{0};

 private:
  const uint8_t* p_;
  size_t n_;
  int streams_;
  size_t ahead_;  // lines prefetched ahead of the one read (0: none)
  size_t piece_;  // lines of one run read before the next run's
};
}  // namespace

// The probe's read patterns: runs per thread, prefetch distance, bytes of a run read before the next run's. Line by
// line without and with a prefetch 4 KB ahead (the decode kernel prefetches its next rows on Intel, whose L2 streamer
// stops at 4 KB pages), and in pieces of 1-8 KB per run as the decode kernel reads whole weight rows: on the H200
// host's Xeon the pieces read 3-18% more than the best line-by-line pattern (bench/results/cpu_moe-xeon-h200.md).
const ReadPattern kReadPatterns[kNumReadPatterns] = {
    {1, 0, 64},    {2, 0, 64},    {4, 0, 64},    {8, 0, 64},     {1, 4096, 64},   {2, 4096, 64},
    {4, 4096, 64}, {8, 4096, 64}, {4, 4096, 1024}, {2, 8192, 1024}, {2, 4096, 4096}, {2, 8192, 8192}};

double bandwidth_probe(size_t nbytes, int reps) {
  NodeMemory mem(nbytes, -1);
  std::memset(mem.p, 1, nbytes);  // fault the (huge) pages in before timing
  double best = 0;
  for (const ReadPattern& v : kReadPatterns)
    for (int r = 0; r <= reps; r++) {
      const auto t0 = std::chrono::steady_clock::now();
      read_buffer(mem.p, nbytes, v.streams, v.prefetch, v.chunk);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (r > 0) best = std::max(best, nbytes / s / 1e9);
    }
  return best;
}

uint64_t read_buffer(const void* p, size_t nbytes, int streams, int prefetch, int chunk) {
  auto job = std::make_shared<ReadJob>((const uint8_t*)p, nbytes, streams, prefetch, chunk);
  pool().submit(job);
  job->wait();
  return job->sink_.load();
}
}  // namespace tandem
