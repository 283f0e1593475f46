// AVX512-BF16 path: the VNNI decode kernels, plus a register-blocked bf16 GEMM (vdpbf16ps) for experts that
// receive many tokens: weight rows dequantized to bf16 panels, activations packed in token pairs (kernels.h).
#define TANDEM_ISA_NS isa_avx512_bf16
#include "tandem/arch/vec_dot_generic.inc"
#include "tandem/arch/avx512_common.inc"
#include "tandem/arch/avx512_vnni.inc"
#include "tandem/arch/dequant_bf16.inc"

namespace tandem {
namespace isa_avx512_bf16 {

constexpr int kChunk = 256;  // K values per pass: A rows (8 x 512 B) and the token groups' slice stay in L1

// RB weight rows x NG token groups of accumulators, over K values [k0, k0 + kc); accumulates into C.
template <int RB, int NG>
static inline void gemm_block(int K, int k0, int kc, const bf16_t* A, int lda, const bf16_t* Xp, int g0, float* C,
                              int ldc) {
  __m512 acc[RB][NG];
  for (int r = 0; r < RB; r++)
    for (int g = 0; g < NG; g++)
      acc[r][g] = k0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(C + (size_t)r * ldc + (g0 + g) * kGemmTokens);
  const bf16_t* x[NG];
  for (int g = 0; g < NG; g++) x[g] = Xp + (size_t)(g0 + g) * K * kGemmTokens + (size_t)k0 * kGemmTokens;
  for (int kk = 0; kk < kc / 2; kk++) {
    __m512bh b[NG];
    for (int g = 0; g < NG; g++) b[g] = (__m512bh)_mm512_loadu_si512(x[g] + kk * 32);
    for (int r = 0; r < RB; r++) {
      int32_t pair;
      std::memcpy(&pair, A + (size_t)r * lda + k0 + 2 * kk, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int g = 0; g < NG; g++) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], a, b[g]);
    }
  }
  for (int r = 0; r < RB; r++)
    for (int g = 0; g < NG; g++) _mm512_storeu_ps(C + (size_t)r * ldc + (g0 + g) * kGemmTokens, acc[r][g]);
}

static void gemm_bf16_avx512(int K, const bf16_t* A, int lda, const bf16_t* Xp, int ntg, float* C, int ldc) {
  for (int k0 = 0; k0 < K; k0 += kChunk) {
    const int kc = K - k0 < kChunk ? K - k0 : kChunk;
    int g = 0;
    for (; g + 2 <= ntg; g += 2)
      for (int r = 0; r < kGemmRows; r += 8) gemm_block<8, 2>(K, k0, kc, A + (size_t)r * lda, lda, Xp, g, C + (size_t)r * ldc, ldc);
    if (g < ntg)
      for (int r = 0; r < kGemmRows; r += 16)
        gemm_block<16, 1>(K, k0, kc, A + (size_t)r * lda, lda, Xp, g, C + (size_t)r * ldc, ldc);
  }
}

}  // namespace isa_avx512_bf16

const KernelTable* kernels_avx512_bf16() {
  static const KernelTable t = [] {
    using namespace isa_avx512_bf16;
    KernelTable k = vnni_table("avx512_bf16");
    fill_dequant_bf16(k);
    k.gemm_bf16 = gemm_bf16_avx512;
    return k;
  }();
  return &t;
}

}  // namespace tandem
