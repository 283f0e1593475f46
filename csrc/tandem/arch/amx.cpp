// AMX path (Sapphire Rapids and later): the VNNI decode kernels, and the prefill GEMM on AMX-BF16 tiles.
// Tile config (palette 1): tmm0..3 = C (16 weight rows x 16 tokens fp32: rows 0-15/16-31 x groups g/g+1),
// tmm4/5 = A (16 weight rows x 32 bf16 of K: 64 bytes), tmm6/7 = B (16 k pairs x 16 tokens x 2 bf16: 64 bytes).
// One tdpbf16ps: C[m][n] += sum over 16 k pairs of A[m][2k..2k+1] . B[k][2n..2n+1], i.e. the packed
// activation layout of kernels.h read as 16 consecutive 64-byte rows. The OS grants tile state per process
// (arch_prctl ARCH_REQ_XCOMP_PERM, asked in cpu_features.cpp before the path is offered); the config is
// per thread, so every call loads it and releases the tiles at the end.
#define TANDEM_ISA_NS isa_amx
#include "tandem/arch/vec_dot_generic.inc"
#include "tandem/arch/avx512_common.inc"
#include "tandem/arch/avx512_vnni.inc"
#include "tandem/arch/dequant_bf16.inc"

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

// With more than one pair of token groups, K goes in chunks: the A chunk (32 rows x 256 bf16 = 16 KB) stays in
// L1 while every pair passes over it, C tiles parked in the C buffer between chunks.
constexpr int kChunk = 256;

template <bool PAIR>
static inline void amx_pass(int k0, int k1, const bf16_t* A, const bf16_t* A1, size_t sa, const bf16_t* x0,
                            const bf16_t* x1, float* c00, float* c10, size_t sc) {
  if (k0 == 0) {
    _tile_zero(0);
    _tile_zero(2);
    if (PAIR) {
      _tile_zero(1);
      _tile_zero(3);
    }
  } else {
    _tile_loadd(0, c00, sc);
    _tile_loadd(2, c10, sc);
    if (PAIR) {
      _tile_loadd(1, c00 + kGemmTokens, sc);
      _tile_loadd(3, c10 + kGemmTokens, sc);
    }
  }
  for (int k = k0; k < k1; k += 32) {
    _tile_loadd(4, A + k, sa);
    _tile_loadd(5, A1 + k, sa);
    _tile_loadd(6, x0 + (size_t)k * kGemmTokens, 64);
    if (PAIR) _tile_loadd(7, x1 + (size_t)k * kGemmTokens, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if (PAIR) {
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c00, sc);
  _tile_stored(2, c10, sc);
  if (PAIR) {
      _tile_stored(1, c00 + kGemmTokens, sc);
      _tile_stored(3, c10 + kGemmTokens, sc);
    }
}

static void gemm_bf16_amx(int K, const bf16_t* A, int lda, const bf16_t* Xp, int ntg, float* C, int ldc) {
  load_tile_config();
  const size_t sa = (size_t)lda * 2, sc = (size_t)ldc * 4, group = (size_t)K * kGemmTokens;
  const bf16_t* A1 = A + (size_t)16 * lda;
  float* C1 = C + (size_t)16 * ldc;
  const int chunk = ntg > 2 ? kChunk : K;
  for (int k0 = 0; k0 < K; k0 += chunk) {
    const int k1 = K - k0 < chunk ? K : k0 + chunk;
    int g = 0;
    for (; g + 2 <= ntg; g += 2)
      amx_pass<true>(k0, k1, A, A1, sa, Xp + g * group, Xp + (g + 1) * group, C + g * kGemmTokens,
                     C1 + g * kGemmTokens, sc);
    if (g < ntg)
      amx_pass<false>(k0, k1, A, A1, sa, Xp + g * group, nullptr, C + g * kGemmTokens, C1 + g * kGemmTokens, sc);
  }
  _tile_release();
}

}  // namespace isa_amx

const KernelTable* kernels_amx() {
  static const KernelTable t = [] {
    using namespace isa_amx;
    KernelTable k = vnni_table("amx");
    fill_dequant_bf16(k);
    k.gemm_bf16 = gemm_bf16_amx;
    return k;
  }();
  return &t;
}

}  // namespace tandem
