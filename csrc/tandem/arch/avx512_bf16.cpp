// AVX512-BF16 path: the VNNI decode kernels, plus a register-blocked bf16 GEMM (vdpbf16ps) for experts that
// receive many tokens: weight rows dequantized to bf16 panels, activations packed in token pairs (kernels.h);
// int8_row layers take the int8 vpdpbusd GEMM of int8_gemm.inc instead.
#define TANDEM_ISA_NS isa_avx512_bf16
#include "tandem/arch/vec_dot_generic.inc"
#include "tandem/arch/avx512_common.inc"
#include "tandem/arch/avx512_vnni.inc"
#include "tandem/arch/dequant_bf16.inc"
#include "tandem/arch/int8_gemm.inc"

namespace tandem {
namespace isa_avx512_bf16 {

// RB rows of a chunk (row stride kGemmLd, K values [k0, k0 + kc) of the run) x NG token groups of
// accumulators; C zeroed on the panel's first chunk, accumulated after.
template <int RB, int NG>
static inline void gemm_block(int K, int k0, int kc, const bf16_t* A, const bf16_t* Xp, int g0, float* C, int ldc,
                              bool first) {
  __m512 acc[RB][NG];
  for (int r = 0; r < RB; r++)
    for (int g = 0; g < NG; g++)
      acc[r][g] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(C + (size_t)r * ldc + (g0 + g) * kGemmTokens);
  const bf16_t* x[NG];
  for (int g = 0; g < NG; g++) x[g] = Xp + (size_t)(g0 + g) * K * kGemmTokens + (size_t)k0 * kGemmTokens;
  for (int kk = 0; kk < kc / 2; kk++) {
    __m512bh b[NG];
    for (int g = 0; g < NG; g++) b[g] = (__m512bh)_mm512_loadu_si512(x[g] + kk * 32);
    for (int r = 0; r < RB; r++) {
      int32_t pair;
      std::memcpy(&pair, A + (size_t)r * kGemmLd + 2 * kk, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int g = 0; g < NG; g++) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], a, b[g]);
    }
  }
  for (int r = 0; r < RB; r++)
    for (int g = 0; g < NG; g++) _mm512_storeu_ps(C + (size_t)r * ldc + (g0 + g) * kGemmTokens, acc[r][g]);
}

// Panel by panel, chunk by chunk: dequantize the chunk's 32 rows (prefetching the next chunk's), multiply.
static void gemm_run_avx512(const GemmRun& j) {
  const int K = j.K;
  bf16_t* A = j.ring;
  for (int p = 0; p < j.n; p++) {
    const GemmPanel& P = j.panels[p];
    const int ntg = P.ntg, ldc = ntg * kGemmTokens;
    for (int k0 = 0; k0 < K; k0 += kGemmChunk) {
      const int kc = std::min(kGemmChunk, K - k0);
      for (int r = 0; r < kGemmRows; r++) {
        deq_chunk_row(j, P, r, k0, kc, A + (size_t)r * kGemmLd);
        if (k0 + kc < K) prefetch_chunk_row(j, P, r, k0 + kc, std::min(kGemmChunk, K - k0 - kc));
      }
      const bool first = k0 == 0;
      int g = 0;
      for (; g + 2 <= ntg; g += 2)
        for (int r = 0; r < kGemmRows; r += 8)
          gemm_block<8, 2>(K, k0, kc, A + (size_t)r * kGemmLd, (const bf16_t*)P.X, g, j.C + (size_t)r * ldc, ldc, first);
      if (g < ntg)
        for (int r = 0; r < kGemmRows; r += 16)
          gemm_block<16, 1>(K, k0, kc, A + (size_t)r * kGemmLd, (const bf16_t*)P.X, g, j.C + (size_t)r * ldc, ldc, first);
    }
    j.epilogue(j.ctx, p, j.C, ldc);
  }
}

}  // namespace isa_avx512_bf16

const KernelTable* kernels_avx512_bf16() {
  static const KernelTable t = [] {
    using namespace isa_avx512_bf16;
    KernelTable k = vnni_table("avx512_bf16");
    fill_dequant_bf16(k);
    k.gemm_bf16 = gemm_run_avx512;
    fill_i8(k);
    k.gemm_i8 = gemm_run_vnni_i8;
    return k;
  }();
  return &t;
}

}  // namespace tandem
