// Fused MoE layer: out[t] = sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = ids[t,k].
//
// One job on the pool, three phases split by barriers:
//   0. every thread quantizes some rows of x to the gate/up activation format; thread 0 groups the
//      (token, k) slots by expert;
//   1. items = (active expert, chunk of I rows): gate and up rows are dotted against every token of that
//      expert while the rows sit in L1, silu(g) * u goes to an fp32 buffer, and the chunk is quantized at
//      once to the down activation format (chunks are whole activation blocks, so no extra barrier);
//   2. items = chunks of H rows over all active experts: each thread owns its output rows, so the weighted
//      sum needs no atomics.
#include "tandem/moe.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "tandem/cpu_features.h"
#include "tandem/kernels.h"

namespace tandem {

namespace {

struct Buf {  // 64-byte aligned scratch
  uint8_t* p = nullptr;
  Buf() = default;
  explicit Buf(size_t n) {
    if (n && posix_memalign((void**)&p, 64, n) != 0) throw std::bad_alloc();
  }
  ~Buf() { free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

inline float silu(float g) { return g / (1.f + std::exp(-g)); }  // gated activation: swap here for others

inline int64_t read_id(const void* ids, int dtype, int64_t i) {
  return dtype == DT_I32 ? (int64_t)((const int32_t*)ids)[i] : ((const int64_t*)ids)[i];
}

inline void load_row_f32(const void* src, int dtype, int64_t row, int n, float* dst) {
  if (dtype == DT_F32) {
    std::memcpy(dst, (const float*)src + row * n, (size_t)n * 4);
  } else {
    const bf16_t* s = (const bf16_t*)src + row * n;
    for (int j = 0; j < n; j++) dst[j] = bf16_to_f32(s[j]);
  }
}

int act_blck(int type) {
  WTypeInfo info;
  if (!wtype_info(type, &info)) throw std::invalid_argument("unknown weight type " + std::to_string(type));
  return info.act_blck;
}

constexpr int kTokenTile = 64;  // tokens per pass over a chunk of weight rows (their activations stay in L2)
constexpr int kNT = 4;          // tokens per kernel call (register blocking)

class MoEJob : public Job {
 public:
  MoEJob(const Experts& ex, const ForwardArgs& a, const KernelTable* kt, int nthreads)
      : ex_(ex), a_(a), kt_(kt), bar_(nthreads), nthreads_(nthreads) {
    const int H = ex.H(), I = ex.I();
    Bx_ = act_blck(ex.mat(0).type);
    Bd_ = act_blck(ex.mat(2).type);
    xrow_ = act_row_bytes(H, Bx_);
    hrow_ = act_row_bytes(I, Bd_);
    const size_t S = (size_t)a.T * a.K;
    xact_ = std::make_unique<Buf>(std::max<size_t>(1, xrow_ * a.T));
    hact_ = std::make_unique<Buf>(std::max<size_t>(1, hrow_ * S));
    hbuf_ = std::make_unique<Buf>(std::max<size_t>(1, S * I * 4));
    if (a.out_dtype != DT_F32) acc_ = std::make_unique<Buf>(std::max<size_t>(1, (size_t)a.T * H * 4));
  }

  void run(int tid, int nthreads) override {
    const int H = ex_.H();
    const int T = a_.T_ptr ? std::clamp(*a_.T_ptr, 0, a_.T) : a_.T;
    {  // phase 0
      std::vector<float> row(H);
      for (int t = tid; t < T; t += nthreads) {
        load_row_f32(a_.x, a_.x_dtype, t, H, row.data());
        quantize_act(row.data(), H, Bx_, xact_->p + (size_t)t * xrow_, H, 0);
      }
      if (tid == 0) group(T);
    }
    bar_.arrive_and_wait();
    for (int it; (it = next1_.fetch_add(1)) < n_items1_;) gate_up(it);
    bar_.arrive_and_wait();
    for (int it; (it = next2_.fetch_add(1)) < n_items2_;) down(it, T);
  }

 private:
  void group(int T) {
    const int E = ex_.E(), K = a_.K, I = ex_.I(), H = ex_.H();
    std::vector<int> count(E + 1, 0);
    for (int64_t i = 0; i < (int64_t)T * K; i++) {
      const int64_t e = read_id(a_.ids, a_.ids_dtype, i);
      if (e >= 0 && e < E) count[e]++;
    }
    off_.assign(1, 0);
    active_.clear();
    std::vector<int> pos(E, 0);
    for (int e = 0; e < E; e++)
      if (count[e]) {
        pos[e] = off_.back();
        active_.push_back(e);
        off_.push_back(off_.back() + count[e]);
      }
    slot_tok_.resize(off_.back());
    slot_w_.resize(off_.back());
    for (int64_t i = 0; i < (int64_t)T * K; i++) {
      const int64_t e = read_id(a_.ids, a_.ids_dtype, i);
      if (e < 0 || e >= E) continue;
      slot_tok_[pos[e]] = (int)(i / K);
      slot_w_[pos[e]++] = a_.weights[i];
    }
    // Phase 1 items: about 4 per thread in all, chunks a whole number of down-activation blocks.
    const int n_act = (int)active_.size();
    const int unit = Bd_ > 0 ? Bd_ : 16;
    int per_e = std::max(1, (4 * nthreads_ + n_act - 1) / std::max(1, n_act));
    chunk1_ = std::min(I, (((I + per_e - 1) / per_e + unit - 1) / unit) * unit);
    per_e_ = (I + chunk1_ - 1) / chunk1_;
    n_items1_ = n_act * per_e_;
    // Phase 2 items: chunks of H rows, 16-row multiples, about 8 per thread.
    chunk2_ = std::max(16, ((H / (8 * nthreads_) + 15) / 16) * 16);
    n_items2_ = T > 0 ? (H + chunk2_ - 1) / chunk2_ : 0;  // also when no expert is active: zero the output
  }

  ActRow xview(int t) const { return act_row_view(xact_->p + (size_t)t * xrow_, ex_.H(), Bx_); }
  ActRow hview(int s) const { return act_row_view(hact_->p + (size_t)s * hrow_, ex_.I(), Bd_); }

  void gate_up(int it) {
    const int I = ex_.I(), H = ex_.H();
    const int ai = it / per_e_, c = it % per_e_, e = active_[ai];
    const int r0 = c * chunk1_, r1 = std::min(I, r0 + chunk1_);
    const int s0 = off_[ai], s1 = off_[ai + 1];
    const ExpertMatrix &G = ex_.mat(0), &U = ex_.mat(1);
    const vec_dot_fn dg = kt_->dot[wtype_slot(G.type)], du = kt_->dot[wtype_slot(U.type)];
    float* hb = (float*)hbuf_->p;
    ActRow acts[kTokenTile];
    for (int st = s0; st < s1; st += kTokenTile) {
      const int ns = std::min(kTokenTile, s1 - st);
      for (int j = 0; j < ns; j++) acts[j] = xview(slot_tok_[st + j]);
      for (int r = r0; r < r1; r++) {
        const uint8_t *wg = G.row(e, r), *wu = U.row(e, r);
        for (int j = 0; j < ns; j += kNT) {
          const int m = std::min(kNT, ns - j);
          float g[kNT], u[kNT];
          dg(H, wg, acts + j, m, g);
          du(H, wu, acts + j, m, u);
          for (int l = 0; l < m; l++) hb[(size_t)(st + j + l) * I + r] = silu(g[l]) * u[l];
        }
      }
    }
    for (int s = s0; s < s1; s++)
      quantize_act(hb + (size_t)s * I + r0, r1 - r0, Bd_, hact_->p + (size_t)s * hrow_, I, r0);
  }

  void down(int it, int T) {
    const int H = ex_.H(), I = ex_.I();
    const int h0 = it * chunk2_, h1 = std::min(H, h0 + chunk2_);
    float* o = a_.out_dtype == DT_F32 ? (float*)a_.out : (float*)acc_->p;
    for (int t = 0; t < T; t++) std::fill(o + (size_t)t * H + h0, o + (size_t)t * H + h1, 0.f);
    const ExpertMatrix& D = ex_.mat(2);
    const vec_dot_fn dd = kt_->dot[wtype_slot(D.type)];
    ActRow acts[kTokenTile];
    for (size_t ai = 0; ai < active_.size(); ai++) {
      const int e = active_[ai], s0 = off_[ai], s1 = off_[ai + 1];
      for (int st = s0; st < s1; st += kTokenTile) {
        const int ns = std::min(kTokenTile, s1 - st);
        for (int j = 0; j < ns; j++) acts[j] = hview(st + j);
        for (int h = h0; h < h1; h++) {
          const uint8_t* wd = D.row(e, h);
          for (int j = 0; j < ns; j += kNT) {
            const int m = std::min(kNT, ns - j);
            float r[kNT];
            dd(I, wd, acts + j, m, r);
            for (int l = 0; l < m; l++) o[(size_t)slot_tok_[st + j + l] * H + h] += slot_w_[st + j + l] * r[l];
          }
        }
      }
    }
    if (a_.out_dtype == DT_BF16) {
      bf16_t* ob = (bf16_t*)a_.out;
      for (int t = 0; t < T; t++)
        for (int h = h0; h < h1; h++) ob[(size_t)t * H + h] = f32_to_bf16(o[(size_t)t * H + h]);
    }
  }

  const Experts& ex_;
  ForwardArgs a_;
  const KernelTable* kt_;
  Barrier bar_;
  int nthreads_;
  int Bx_, Bd_;
  size_t xrow_, hrow_;
  std::unique_ptr<Buf> xact_, hact_, hbuf_, acc_;
  std::vector<int> active_, off_, slot_tok_;
  std::vector<float> slot_w_;
  std::atomic<int> next1_{0}, next2_{0};
  int n_items1_ = 0, n_items2_ = 0, chunk1_ = 1, per_e_ = 1, chunk2_ = 16;
};

// Weight conversion from fp32/bf16 rows: 16-row items shared by the pool threads.
class QuantJob : public Job {
 public:
  QuantJob(ExpertMatrix& m, const void* src, int dtype, int64_t row0, int64_t nrows)
      : m_(m), src_(src), dtype_(dtype), row0_(row0), nrows_(nrows) {}
  void run(int, int) override {
    std::vector<float> row(m_.cols);
    const int64_t n_items = (nrows_ + 15) / 16;
    for (int64_t it; (it = next_.fetch_add(1)) < n_items;)
      for (int64_t r = it * 16; r < std::min(nrows_, it * 16 + 16); r++) {
        load_row_f32(src_, dtype_, r, m_.cols, row.data());
        quantize_row(m_.type, row.data(), (uint8_t*)m_.data + (row0_ + r) * m_.row_bytes, m_.cols);
      }
  }

 private:
  ExpertMatrix& m_;
  const void* src_;
  int dtype_;
  int64_t row0_, nrows_;
  std::atomic<int64_t> next_{0};
};

}  // namespace

Experts::Experts(int E, int I, int H, int gate_type, int up_type, int down_type) : E_(E), I_(I), H_(H) {
  if (E <= 0 || I <= 0 || H <= 0) throw std::invalid_argument("E, I, H must be positive");
  const int types[3] = {gate_type, up_type, down_type};
  const int rows[3] = {I, I, H}, cols[3] = {H, H, I};
  for (int p = 0; p < 3; p++) {
    WTypeInfo info;
    if (!wtype_info(types[p], &info) || wtype_slot(types[p]) < 0)
      throw std::invalid_argument("unsupported weight type " + std::to_string(types[p]));
    if (cols[p] % info.blck)
      throw std::invalid_argument("dimension " + std::to_string(cols[p]) + " is not a multiple of the block size " +
                                  std::to_string(info.blck));
    ExpertMatrix& m = m_[p];
    m.type = types[p];
    m.E = E;
    m.rows = rows[p];
    m.cols = cols[p];
    m.row_bytes = (size_t)(cols[p] / info.blck) * info.bytes;
  }
  if (act_blck(gate_type) != act_blck(up_type))
    throw std::invalid_argument("gate and up formats need the same activation block size");
}

ExpertMatrix& Experts::mat(int proj) {
  if (proj < 0 || proj > 2) throw std::invalid_argument("proj must be 0 (gate), 1 (up) or 2 (down)");
  return m_[proj];
}

void Experts::quantize_from(int proj, const void* src, int src_dtype, int64_t row0, int64_t nrows) {
  ExpertMatrix& m = mat(proj);
  if (row0 < 0 || nrows < 0 || row0 + nrows > (int64_t)m.E * m.rows) throw std::out_of_range("rows out of range");
  if (src_dtype != DT_F32 && src_dtype != DT_BF16) throw std::invalid_argument("source must be fp32 or bf16");
  if (!m.owned) {
    void* p = nullptr;
    if (posix_memalign(&p, 64, std::max<size_t>(64, m.bytes())) != 0) throw std::bad_alloc();
    m.owned = std::unique_ptr<uint8_t, void (*)(void*)>((uint8_t*)p, free);
    m.data = m.owned.get();
  }
  if (!has_quantizer(m.type))
    throw std::invalid_argument("no converter to weight type " + std::to_string(m.type) +
                                " (GGUF block formats are loaded as-is)");
  auto job = std::make_shared<QuantJob>(m, src, src_dtype, row0, nrows);
  pool().submit(job);
  job->wait();
}

void Experts::map_blocks(int proj, const void* data, size_t nbytes) {
  ExpertMatrix& m = mat(proj);
  if (nbytes != m.bytes())
    throw std::invalid_argument("expected " + std::to_string(m.bytes()) + " bytes, got " + std::to_string(nbytes));
  m.owned.reset();
  m.data = (const uint8_t*)data;
}

void Experts::dequantize(int proj, int e, float* dst) const {
  const ExpertMatrix& m = mat(proj);
  if (!m.data) throw std::runtime_error("weights not set");
  if (e < 0 || e >= m.E) throw std::out_of_range("expert out of range");
  for (int r = 0; r < m.rows; r++) dequantize_row(m.type, m.row(e, r), dst + (size_t)r * m.cols, m.cols);
}

static void check_args(const Experts& ex, const ForwardArgs& a) {
  for (int p = 0; p < 3; p++)
    if (!ex.mat(p).data) throw std::runtime_error("expert weights not set");
  if (a.T < 0 || a.K <= 0) throw std::invalid_argument("bad T or K");
  if (a.x_dtype != DT_F32 && a.x_dtype != DT_BF16) throw std::invalid_argument("x must be fp32 or bf16");
  if (a.out_dtype != DT_F32 && a.out_dtype != DT_BF16) throw std::invalid_argument("out must be fp32 or bf16");
  if (a.ids_dtype != DT_I32 && a.ids_dtype != DT_I64) throw std::invalid_argument("ids must be int32 or int64");
  if (a.T_ptr) return;  // contents filled later (host function in a CUDA graph): out-of-range ids are skipped
  for (int64_t i = 0; i < (int64_t)a.T * a.K; i++)
    if (read_id(a.ids, a.ids_dtype, i) >= ex.E())
      throw std::out_of_range("topk id " + std::to_string(read_id(a.ids, a.ids_dtype, i)) + " >= E");
}

std::shared_ptr<Job> Experts::submit(const ForwardArgs& a) const {
  check_args(*this, a);
  ThreadPool& p = pool();
  auto job = std::make_shared<MoEJob>(*this, a, kernels(), p.size());
  p.submit(job);
  return job;
}

void Experts::forward(const ForwardArgs& a) const { submit(a)->wait(); }

extern "C" void tandem_cpu_host_entry(void* host_job) {
  const HostJob* h = (const HostJob*)host_job;
  try {
    h->experts->forward(h->args);
  } catch (...) {
    // No exception may cross into the CUDA runtime; the output is left as it was.
  }
}

}  // namespace tandem

namespace tandem {
namespace {
// Memory read bandwidth probe: every pool thread sums its slice of the buffer as 64-bit words.
class ReadJob : public Job {
 public:
  ReadJob(const uint8_t* p, size_t n) : p_(p), n_(n) {}
  void run(int tid, int nthreads) override {
    const size_t words = n_ / 8, per = (words + nthreads - 1) / nthreads;
    const uint64_t* w = (const uint64_t*)p_ + std::min(words, per * tid);
    const size_t cnt = std::min(words, per * (tid + 1)) - std::min(words, per * tid);
    uint64_t s[8] = {0};
    size_t i = 0;
    for (; i + 8 <= cnt; i += 8)
      for (int l = 0; l < 8; l++) s[l] += w[i + l];
    for (; i < cnt; i++) s[0] += w[i];
    uint64_t t = 0;
    for (int l = 0; l < 8; l++) t += s[l];
    sink_.fetch_add(t, std::memory_order_relaxed);
  }
  std::atomic<uint64_t> sink_{0};

 private:
  const uint8_t* p_;
  size_t n_;
};
}  // namespace

uint64_t read_buffer(const void* p, size_t nbytes) {
  auto job = std::make_shared<ReadJob>((const uint8_t*)p, nbytes);
  pool().submit(job);
  job->wait();
  return job->sink_.load();
}
}  // namespace tandem
