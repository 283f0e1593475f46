// Kernel entry points: generic reference quantizers and the per-ISA dispatch table of dot kernels.
#pragma once
#include "tandem/quants.h"

namespace tandem {

// Row conversions (reference, scalar). quantize_row supports W_F32, W_BF16, W_Q8_0, W_I4_G32, W_I4_G128,
// W_I8_ROW; dequantize_row supports every WType. A row of n values is row_bytes_of(info, n) bytes.
bool has_quantizer(int type);
bool quantize_row(int type, const float* src, void* dst, int n);
bool dequantize_row(int type, const void* src, float* dst, int n);
// Columns [c0, c1) (multiples of the block) of a row of n values as a row of c1 - c0 values (int8_row: its
// scale kept, its rowsum that of the slice). NUMA shards hold such slices of the down projection.
void slice_row(int type, const void* src, int n, int c0, int c1, void* dst);

// Quantize n activations x (n a multiple of B) into the activation row at `row` (act_row_bytes layout of a
// row of n_total values), starting at element i0 (a multiple of B). B == 0: copy as fp32.
void quantize_act(const float* x, int n, int B, uint8_t* row, int n_total, int i0);

// out[j] = dot(weight row w of n values, activation row a[j]) for j < na (na <= 4).
typedef void (*vec_dot_fn)(int n, const void* w, const ActRow* a, int na, float* out);
// The same, and the row at pf (as many bytes as w's, read later) asked into L2 as w is read: about one prefetch
// per line read, spread over the row rather than in one burst (decode on Intel, whose L2 streamer stops at 4 KB).
typedef void (*vec_dot_pf_fn)(int n, const void* w, const ActRow* a, int na, float* out, const void* pf);

// ---- prefill GEMM (bf16 operands, fp32 accumulation) ---------------------------------------------------
// A weight row of n values (a multiple of 32) -> n bf16 values (round to nearest even), per format.
typedef void (*dequant_bf16_fn)(const void* w, int n, bf16_t* dst);

// Activations of one expert's tokens, packed in groups of kGemmTokens tokens: group g of a K-long row set
// lives at base + g * K * 16, element (token t, index k) at [(k / 2) * 32 + t * 2 + (k & 1)] -- the pair
// layout both vdpbf16ps (one 64-byte row per k pair) and AMX B tiles (16 rows of 16 token pairs) read.
constexpr int kGemmTokens = 16;
constexpr int kGemmRows = 32;             // weight rows per panel: two 16-row halves (two AMX A tiles)
constexpr int kGemmChunk = 256;           // K values per step: a panel's chunk (32 x 256 bf16 = 16 KB) stays in L1
constexpr int kGemmLd = kGemmChunk + 32;  // row stride of a chunk (bf16): rows 576 B apart spread over L1 sets
static inline size_t packed_index(int K, int t, int k) {
  return (size_t)(t / kGemmTokens) * K * kGemmTokens + (size_t)(k / 2) * 32 + (t % kGemmTokens) * 2 + (k & 1);
}

// Where one 16-row half of a panel comes from: 16 consecutive weight rows, row_bytes apart, in one format
// whose blocks (blck values in blck_bytes) divide kGemmChunk.
struct GemmHalf {
  dequant_bf16_fn deq;
  size_t row_bytes;
  int blck, blck_bytes;
};
// int8 GEMM (gemm_i8, int8_row weights): the tokens quantized per token (symmetric int8, scale amax / 127 over
// the row) and packed in groups of kGemmTokens: group g of a K-long row set at base + g * K * 16 bytes, element
// (t, k) at [(k / 4) * 64 + t * 4 + (k & 3)] -- an AMX-INT8 B tile is 16 of those 64-byte rows (a k quad of
// 16 tokens each), and one such row is the zmm vpdpbusd takes. Per panel chunk 512 K values (16 KB of L1).
constexpr int kGemmChunkI8 = 2 * kGemmChunk;
static inline size_t packed_index_i8(int K, int t, int k) {
  return (size_t)(t / kGemmTokens) * K * kGemmTokens + (size_t)(k / 4) * 64 + (t % kGemmTokens) * 4 + (k & 3);
}

// A panel: rows 0-15 from src[0], rows 16-31 from src[1], times one expert's packed tokens X (ntg groups;
// bf16 pairs for gemm_bf16, int8 quads for gemm_i8, whose token scales are xs[0 .. 16 * ntg), 0 for padding).
struct GemmPanel {
  const uint8_t* src[2];
  const void* X;
  int ntg;
  const float* xs = nullptr;
};
// A run of panels sharing K (a multiple of 32) and the halves' formats. For each panel p in order:
// C[r][t] = sum_k W[r][k] * X[t][k] for r < 32, t < 16 * ntg (C row stride ldc = 16 * ntg floats), then
// epilogue(ctx, p, C, ldc). Weights are dequantized chunk by chunk (kGemmChunk values of the 32 rows) into
// `ring` (2 * kGemmRows * kGemmLd bf16); C needs kGemmRows * 16 * max ntg floats. overlap: dequantize the
// next chunk between the tile products of this one (AMX; the vector units are idle while the tiles multiply).
// gemm_i8 (both halves int8_row, rows of K values + row_i8_tail): int32 products over the whole K, then
// C[r][t] = d_w[r] * xs[t] * sum_k q_w[r][k] q_x[t][k] in fp32 before the epilogue; the ring holds int8 chunks
// (kGemmChunkI8 values, rows kGemmLd * 2 bytes apart).
struct GemmRun {
  int K;
  GemmHalf half[2];
  const GemmPanel* panels;
  int n;
  bf16_t* ring;
  float* C;
  void (*epilogue)(void* ctx, int p, const float* C, int ldc);
  void* ctx;
  bool overlap;
};
typedef void (*gemm_run_fn)(const GemmRun& run);

// GEMM epilogue of gate/up: h[t][k0 + r] = silu(Cg[r][t]) * Cu[r][t] for r < rows (even), t < ldc (0 for t >= n),
// stored as bf16 into the packed layout of a K-long row set (K = the shard's I, k0 even) at Hp.
typedef void (*silu_pack_fn)(const float* Cg, const float* Cu, int ldc, int rows, int n, int K, int k0, bf16_t* Hp);
// Pack one token group: rows tok[0..n) (n <= 16) of x (H values each, bf16 or fp32; byte offsets of every row
// below 2^31) as bf16 pairs into the packed layout at dst (a group of a K = H row set), zeros for t >= n.
typedef void (*pack_tokens_fn)(const void* x, bool x_bf16, int H, const int* tok, int n, bf16_t* dst);
// GEMM epilogue of down: out[tok[t]][r] += w[t] * C[r][t] for r < kGemmRows, t < n (out rows of H floats).
typedef void (*scatter_add_fn)(const float* C, int ldc, int n, const int* tok, const float* w, float* out, int H);
// int8 GEMM: pack one token group like pack_tokens, quantized per token: d[t] = amax_t / 127 (0 for t >= n),
// int8 quads in the packed_index_i8 layout at dst.
typedef void (*pack_tokens_i8_fn)(const void* x, bool x_bf16, int H, const int* tok, int n, int8_t* dst, float* d);
// int8 GEMM epilogue of gate/up: Hf[(k0 + r) * 16 + t] = silu(Cg[r][t]) * Cu[r][t] for r < rows and the token
// group's 16 columns of each of the ldc / 16 groups (group g at Hf + g * I * 16), 0 for t >= n.
typedef void (*silu_store_fn)(const float* Cg, const float* Cu, int ldc, int rows, int n, int k0, int I, float* Hf);
// int8 GEMM, h of one token group ([I][16] fp32 at Hf): d[t] = amax over I / 127 and inv[t] = 1 / d[t] (0 if 0).
typedef void (*h_scale_fn)(const float* Hf, int I, float* d, float* inv);
// ... and rows [0, K) of it (Hf already offset to a shard's first row) as one packed int8 group at dst.
typedef void (*h_pack_fn)(const float* Hf, int K, const float* inv, int8_t* dst);

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
    case W_I8_ROW: return 9;
    default: return -1;
  }
}
constexpr int N_WSLOTS = 10;

struct KernelTable {
  const char* name;
  vec_dot_fn dot[N_WSLOTS];
  vec_dot_pf_fn dot_pf[N_WSLOTS];          // nullptr: the caller prefetches the next row in one burst
  dequant_bf16_fn dequant_bf16[N_WSLOTS];  // nullptr: this format stays on the per-row path (fp32)
  gemm_run_fn gemm_bf16;                   // nullptr: no prefill GEMM on this path
  silu_pack_fn silu_pack;
  pack_tokens_fn pack_tokens;
  scatter_add_fn scatter_add;
  gemm_run_fn gemm_i8;  // nullptr: no int8 GEMM (int8_row layers take gemm_bf16, dequantized, or decode)
  pack_tokens_i8_fn pack_tokens_i8;
  silu_store_fn silu_store;
  h_scale_fn h_scale;
  h_pack_fn h_pack;
};

// One per ISA file; each returns nullptr when that ISA was not compiled in.
const KernelTable* kernels_generic();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();
const KernelTable* kernels_avx512_vnni();
const KernelTable* kernels_avx512_bf16();
const KernelTable* kernels_amx();

}  // namespace tandem
