// AMX path (Sapphire Rapids and later): the VNNI decode kernels, the prefill GEMM on AMX-BF16 tiles with the
// weights' dequantization to bf16 interleaved between the tile products, and for int8_row weights the same run
// on AMX-INT8 tiles (int8 weight chunks copied into the ring, int8 tokens, int32 sums rescaled per panel).
// Tile config (palette 1, every tile 16 rows x 64 bytes): tmm0..3 = C (16 weight rows x 16 tokens, fp32 or
// int32: rows 0-15/16-31 x groups g/g+1), tmm4/5 = A (16 weight rows x 32 bf16 / 64 int8 of K), tmm6/7 = B
// (16 k pairs x 16 tokens x 2 bf16, or 16 k quads x 16 tokens x 4 int8). One tdpbf16ps: C[m][n] += sum over
// 16 k pairs of A[m][2k..2k+1] . B[k][2n..2n+1]; one tdpbssd: C[m][n] += sum over 16 k quads of
// A[m][4k..4k+3] . B[k][4n..4n+3] (signed x signed) -- the packed activation layouts of kernels.h read as 16
// consecutive 64-byte rows. The OS grants tile state per process
// (arch_prctl ARCH_REQ_XCOMP_PERM, asked in cpu_features.cpp before the path is offered); the config is
// per thread, so every call loads it and releases the tiles at the end.
#define TANDEM_ISA_NS isa_amx
#include "tandem/arch/vec_dot_generic.inc"
#include "tandem/arch/avx512_common.inc"
#include "tandem/arch/avx512_vnni.inc"
#include "tandem/arch/dequant_bf16.inc"
#include "tandem/arch/int8_gemm.inc"

namespace tandem {
namespace isa_amx {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "AMX tile config is 64 bytes");

static inline void load_tile_config() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; t++) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// One k step of a pass: 2 A tiles (the chunk's rows 0-15 / 16-31, in L1) x 1 or 2 B tiles (token groups g, g+1).
// The token tiles are read once per panel and step (from L2): loaded with the streaming hint, so they do not
// push the weight chunks out of L1 (measured: 3-17 % faster than plain loads; prefetching them into L1 two
// steps ahead instead: 5-20 % slower).
template <bool I8, bool PAIR>
static inline void tile_step(const uint8_t* A0, const uint8_t* A1, const uint8_t* x0, const uint8_t* x1) {
  constexpr size_t sa = kGemmLd * 2;
  _tile_loadd(4, A0, sa);
  _tile_loadd(5, A1, sa);
  _tile_stream_loadd(6, x0, 64);
  if (PAIR) _tile_stream_loadd(7, x1, 64);
  if constexpr (I8) {
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(2, 5, 6);
    if (PAIR) {
      _tile_dpbssd(1, 4, 7);
      _tile_dpbssd(3, 5, 7);
    }
  } else {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if (PAIR) {
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
}

template <bool PAIR>
static inline void tiles_zero() {
  _tile_zero(0);
  _tile_zero(2);
  if (PAIR) {
    _tile_zero(1);
    _tile_zero(3);
  }
}

// C tiles of token groups g (, g + 1): tmm0/1 = rows 0-15 at c0, tmm2/3 = rows 16-31 at c1.
template <bool PAIR>
static inline void tiles_load(const float* c0, const float* c1, size_t sc) {
  _tile_loadd(0, c0, sc);
  _tile_loadd(2, c1, sc);
  if (PAIR) {
    _tile_loadd(1, c0 + kGemmTokens, sc);
    _tile_loadd(3, c1 + kGemmTokens, sc);
  }
}

template <bool PAIR>
static inline void tiles_store(float* c0, float* c1, size_t sc) {
  _tile_stored(0, c0, sc);
  _tile_stored(2, c1, sc);
  if (PAIR) {
    _tile_stored(1, c0 + kGemmTokens, sc);
    _tile_stored(3, c1 + kGemmTokens, sc);
  }
}

// The run goes in units = (panel, chunk of kGemmChunk values). Unit u's chunk (32 rows) sits in ring slot u & 1
// (L1) while its tile products run over every token group; between k steps the next unit's rows are
// dequantized into the other slot, and the unit after that is prefetched. One pass over the token groups
// (ntg <= 2): C stays in the tiles across the panel's chunks; more: C parked in the C buffer between chunks.
// I8: int8_row weights x int8 tokens (chunks of kGemmChunkI8 values copied into the ring, tdpbssd, the panel's
// int32 sums rescaled to fp32 before its epilogue); else bf16 (chunks of kGemmChunk dequantized, tdpbf16ps).
template <bool I8>
class AmxRun {
  static constexpr int kChunk = I8 ? kGemmChunkI8 : kGemmChunk;  // K values per unit
  static constexpr int kStep = I8 ? 64 : 32;                     // K values per tile product
  static constexpr int kEs = I8 ? 1 : 2;                         // bytes per value (ring and packed tokens)

 public:
  explicit AmxRun(const GemmRun& j)
      : j_(j), nch_((j.K + kChunk - 1) / kChunk), U_(j.n * nch_),
        slot_{(uint8_t*)j.ring, (uint8_t*)j.ring + (size_t)kGemmRows * kGemmLd * 2} {}

  void run() {
    load_tile_config();
    for (int r = 0; r < kGemmRows; r++) deq_row(0, r);
    for (int u = 0; u < U_; u++) unit(u);
    _tile_release();
  }

 private:
  int k0(int u) const { return u % nch_ * kChunk; }
  int kc(int u) const { return std::min(kChunk, j_.K - k0(u)); }

  void deq_row(int u, int r) {  // row r of unit u into its slot; prefetch row r of unit u + 1
    uint8_t* dst = slot_[u & 1] + (size_t)r * kGemmLd * 2;
    if constexpr (I8) {
      const uint8_t* src = chunk_src(j_, j_.panels[u / nch_], r, k0(u));
      for (int o = 0; o < kc(u); o += 64) _mm512_storeu_si512(dst + o, _mm512_loadu_si512(src + o));
    } else {
      deq_chunk_row(j_, j_.panels[u / nch_], r, k0(u), kc(u), (bf16_t*)dst);
    }
    if (u + 1 < U_) prefetch_chunk_row(j_, j_.panels[(u + 1) / nch_], r, k0(u + 1), kc(u + 1));
  }

  // After k step `step` of `steps`: the next unit's rows dequantized so far, in proportion.
  inline void pump(int u, int step, int steps) {
    if (!j_.overlap || u + 1 >= U_) return;
    for (const int want = (step * kGemmRows + steps - 1) / steps; done_ < want; done_++) deq_row(u + 1, done_);
  }

  template <bool PAIR>
  void pass(int u, const uint8_t* x0, const uint8_t* x1, int steps, int* step) {
    const uint8_t* A0 = slot_[u & 1];
    const uint8_t* A1 = A0 + (size_t)16 * kGemmLd * 2;
    const int n = kc(u);
    for (int k = 0; k < n; k += kStep) {
      const size_t xo = (size_t)k * kGemmTokens * kEs;
      tile_step<I8, PAIR>(A0 + k * kEs, A1 + k * kEs, x0 + xo, x1 + xo);
      pump(u, ++*step, steps);
    }
  }

  void unit(int u) {
    const int p = u / nch_, c = u % nch_;
    const GemmPanel& P = j_.panels[p];
    const int ntg = P.ntg, ldc = ntg * kGemmTokens, npass = (ntg + 1) / 2, steps = npass * (kc(u) / kStep);
    const size_t sc = (size_t)ldc * 4, group = (size_t)j_.K * kGemmTokens * kEs;
    const uint8_t* X = (const uint8_t*)P.X + (size_t)k0(u) * kGemmTokens * kEs;
    float* C0 = j_.C;
    float* C1 = j_.C + (size_t)16 * ldc;
    const bool first = c == 0, last = c == nch_ - 1;
    done_ = 0;
    int step = 0;
    if (npass == 1) {
      if (ntg == 2) {
        if (first) tiles_zero<true>();
        pass<true>(u, X, X + group, steps, &step);
        if (last) tiles_store<true>(C0, C1, sc);
      } else {
        if (first) tiles_zero<false>();
        pass<false>(u, X, X, steps, &step);
        if (last) tiles_store<false>(C0, C1, sc);
      }
    } else {
      for (int g = 0; g < ntg; g += 2) {
        float *c0 = C0 + g * kGemmTokens, *c1 = C1 + g * kGemmTokens;
        const uint8_t* x0 = X + g * group;
        if (g + 1 < ntg) {
          if (first) tiles_zero<true>();
          else tiles_load<true>(c0, c1, sc);
          pass<true>(u, x0, x0 + group, steps, &step);
          tiles_store<true>(c0, c1, sc);
        } else {
          if (first) tiles_zero<false>();
          else tiles_load<false>(c0, c1, sc);
          pass<false>(u, x0, x0, steps, &step);
          tiles_store<false>(c0, c1, sc);
        }
      }
    }
    if (u + 1 < U_)
      for (; done_ < kGemmRows; done_++) deq_row(u + 1, done_);
    if (!last) return;
    if constexpr (I8) rescale_i8(j_, P, j_.C, ldc, false);
    j_.epilogue(j_.ctx, p, j_.C, ldc);
  }

  const GemmRun& j_;
  const int nch_, U_;
  uint8_t* const slot_[2];
  int done_ = 0;
};

static void gemm_run_amx(const GemmRun& j) {
  if (j.n > 0) AmxRun<false>(j).run();
}

static void gemm_run_amx_i8(const GemmRun& j) {
  if (j.n > 0) AmxRun<true>(j).run();
}

}  // namespace isa_amx

const KernelTable* kernels_amx() {
  static const KernelTable t = [] {
    using namespace isa_amx;
    KernelTable k = vnni_table("amx");
    fill_dequant_bf16(k);
    k.gemm_bf16 = gemm_run_amx;
    fill_i8(k);
    k.gemm_i8 = gemm_run_amx_i8;
    return k;
  }();
  return &t;
}

}  // namespace tandem
