// Kernel entry points: generic reference quantizers and the per-ISA dispatch table of dot kernels.
#pragma once
#include "tandem/quants.h"

namespace tandem {

// Row conversions (reference, scalar). quantize_row supports W_F32, W_BF16, W_Q8_0, W_I4_G32, W_I4_G128;
// dequantize_row supports every WType.
bool has_quantizer(int type);
bool quantize_row(int type, const float* src, void* dst, int n);
bool dequantize_row(int type, const void* src, float* dst, int n);

// Quantize n activations x (n a multiple of B) into the activation row at `row` (act_row_bytes layout of a
// row of n_total values), starting at element i0 (a multiple of B). B == 0: copy as fp32.
void quantize_act(const float* x, int n, int B, uint8_t* row, int n_total, int i0);

// out[j] = dot(weight row w of n values, activation row a[j]) for j < na (na <= 4).
typedef void (*vec_dot_fn)(int n, const void* w, const ActRow* a, int na, float* out);

// ---- prefill GEMM (bf16 operands, fp32 accumulation) ---------------------------------------------------
// A weight row of n values (a multiple of 32) -> n bf16 values (round to nearest even), per format.
typedef void (*dequant_bf16_fn)(const void* w, int n, bf16_t* dst);

// Activations of one expert's tokens, packed in groups of kGemmTokens tokens: group g of a K-long row set
// lives at base + g * K * 16, element (token t, index k) at [(k / 2) * 32 + t * 2 + (k & 1)] -- the pair
// layout both vdpbf16ps (one 64-byte row per k pair) and AMX B tiles (16 rows of 16 token pairs) read.
constexpr int kGemmTokens = 16;
constexpr int kGemmRows = 32;  // weight rows per GEMM call (two AMX A tiles)
static inline size_t packed_index(int K, int t, int k) {
  return (size_t)(t / kGemmTokens) * K * kGemmTokens + (size_t)(k / 2) * 32 + (t % kGemmTokens) * 2 + (k & 1);
}

// C[r][t] = sum_k A[r][k] * X[t][k] for r < kGemmRows, t < 16 * ntg: A = kGemmRows bf16 rows of K values
// (row stride lda elements), X packed as above (ntg token groups), C row stride ldc floats. K % 32 == 0.
typedef void (*gemm_bf16_fn)(int K, const bf16_t* A, int lda, const bf16_t* Xp, int ntg, float* C, int ldc);

// GEMM epilogue of gate/up: h[t][k0 + r] = silu(Cg[r][t]) * Cu[r][t] for r < kGemmRows, t < ldc (0 for t >= n),
// stored as bf16 into the packed layout of a K-long row set (K = the shard's I, k0 even) at Hp.
typedef void (*silu_pack_fn)(const float* Cg, const float* Cu, int ldc, int n, int K, int k0, bf16_t* Hp);
// GEMM epilogue of down: out[tok[t]][r] += w[t] * C[r][t] for r < kGemmRows, t < n (out rows of H floats).
typedef void (*scatter_add_fn)(const float* C, int ldc, int n, const int* tok, const float* w, float* out, int H);

enum Isa : int {
  ISA_GENERIC = 0,
  ISA_AVX2 = 1,
  ISA_AVX512 = 2,
  ISA_AVX512_VNNI = 3,
  ISA_AVX512_BF16 = 4,
  ISA_AMX = 5,
  ISA_COUNT = 6
};

// Dense index of a WType in the table (-1 if unknown).
static inline int wtype_slot(int t) {
  switch (t) {
    case W_F32: return 0;
    case W_BF16: return 1;
    case W_Q8_0: return 2;
    case W_Q4_0: return 3;
    case W_I4_G32: return 4;
    case W_I4_G128: return 5;
    case W_Q4_K: return 6;
    case W_Q5_K: return 7;
    case W_Q6_K: return 8;
    default: return -1;
  }
}
constexpr int N_WSLOTS = 9;

struct KernelTable {
  const char* name;
  vec_dot_fn dot[N_WSLOTS];
  dequant_bf16_fn dequant_bf16[N_WSLOTS];  // nullptr: this format stays on the per-row path (fp32)
  gemm_bf16_fn gemm_bf16;                  // nullptr: no prefill GEMM on this path
  silu_pack_fn silu_pack;
  scatter_add_fn scatter_add;
};

// One per ISA file; each returns nullptr when that ISA was not compiled in.
const KernelTable* kernels_generic();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();
const KernelTable* kernels_avx512_vnni();
const KernelTable* kernels_avx512_bf16();
const KernelTable* kernels_amx();

}  // namespace tandem
