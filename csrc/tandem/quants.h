// Quantized block layouts: each declared once here, with its size asserted. Shared by every ISA file.
// GGUF layouts (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K) are facts of the file format; values are dequantized as
// stated per struct. tandem's own formats (int8 = Q8_0 layout, int4_g32, int4_g128, int8_row) are documented
// likewise.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace tandem {

using fp16_t = uint16_t;  // IEEE half, raw bits
using bf16_t = uint16_t;  // bfloat16, raw bits

// Weight formats. The numeric values of the GGUF ones are ggml's type ids.
enum WType : int {
  W_F32 = 0,
  W_Q4_0 = 2,
  W_Q8_0 = 8,   // also tandem "int8": symmetric, one scale per 32
  W_Q4_K = 12,
  W_Q5_K = 13,
  W_Q6_K = 14,
  W_BF16 = 30,
  W_I4_G32 = 1001,   // tandem "int4_g32": scale and min per 32
  W_I4_G128 = 1002,  // tandem "int4_g128": scale and min per 128
  W_I8_ROW = 1003,   // tandem "int8_row": symmetric, one fp32 scale per row (AMX-INT8 / VNNI prefill)
};

#define QK8_0 32
struct block_q8_0 {
  fp16_t d;            // scale; value = d * qs[j]
  int8_t qs[QK8_0];    // quants in [-127, 127]
};
static_assert(sizeof(block_q8_0) == 2 + QK8_0, "block_q8_0 size");

#define QK4_0 32
struct block_q4_0 {
  fp16_t d;             // scale; value = d * (q - 8)
  uint8_t qs[QK4_0 / 2];  // element j: low nibble of qs[j]; element j + 16: high nibble of qs[j]
};
static_assert(sizeof(block_q4_0) == 2 + QK4_0 / 2, "block_q4_0 size");

#define QK_I4_G32 32
#define QK_I4_G32X4 128
// int4_g32: groups of 32 with a scale and a min, stored four groups per block so one 64-byte load feeds a
// 512-bit register and the 8 fp16 scales/mins one 128-bit load. Group g (elements 32g .. 32g + 31) lives in
// qs[16g .. 16g + 15]: element 32g + j in the low nibble of qs[16g + j], element 32g + 16 + j in the high.
struct block_i4_g32 {
  fp16_t d[4];              // scales; value = d[g] * q + m[g], q in [0, 15]
  fp16_t m[4];              // mins (offsets)
  uint8_t qs[QK_I4_G32X4 / 2];
};
static_assert(sizeof(block_i4_g32) == 16 + QK_I4_G32X4 / 2, "block_i4_g32 size");

#define QK_I4_G128 128
struct block_i4_g128 {
  fp16_t d;                  // scale; value = d * q + m, q in [0, 15]
  fp16_t m;                  // min (offset)
  uint8_t qs[QK_I4_G128 / 2];  // element j: low nibble of qs[j]; element j + 64: high nibble (one 64-byte load)
};
static_assert(sizeof(block_i4_g128) == 4 + QK_I4_G128 / 2, "block_i4_g128 size");

// int8_row: a row of n values (n a multiple of 64) is n int8 quants in order, then a row_i8_tail: value j =
// d * qs[j]. One scale over the whole row lets a GEMM accumulate a whole row's products in int32 (AMX-INT8
// tdpbssd, VNNI vpdpbusd) and rescale once; rowsum serves the unsigned-activation form (x + 128) of vpdpbusd.
// The values keep the plain row order, so an AMX A tile (16 rows x 64 values) is 16 row slices and the decode
// kernels read a row as they read Q8_0's quants. Rows are row_bytes = n + 8 apart (not 64-byte aligned).
#define QK_I8_ROW 64
struct row_i8_tail {
  float d;         // scale: amax / 127
  int32_t rowsum;  // sum of the row's quants
};
static_assert(sizeof(row_i8_tail) == 8, "row_i8_tail size");

#define QK_K 256
#define K_SCALE_SIZE 12
struct block_q4_K {
  fp16_t d;                       // super-block scale for the 6-bit scales
  fp16_t dmin;                    // super-block scale for the 6-bit mins
  uint8_t scales[K_SCALE_SIZE];   // 8 scales + 8 mins, 6 bits each (get_scale_min_k4)
  uint8_t qs[QK_K / 2];           // per 64 elements, 32 bytes: low nibbles = first 32, high = next 32
};                                // value = d * sc[s] * q - dmin * m[s], s = sub-block of 32
static_assert(sizeof(block_q4_K) == 4 + K_SCALE_SIZE + QK_K / 2, "block_q4_K size");

struct block_q5_K {
  fp16_t d;
  fp16_t dmin;
  uint8_t scales[K_SCALE_SIZE];   // as in q4_K
  uint8_t qh[QK_K / 8];           // 5th bit: element l of sub-block s has bit s of qh[l]
  uint8_t qs[QK_K / 2];           // low 4 bits, as q4_K
};
static_assert(sizeof(block_q5_K) == 4 + K_SCALE_SIZE + QK_K / 8 + QK_K / 2, "block_q5_K size");

struct block_q6_K {
  uint8_t ql[QK_K / 2];   // low 4 bits
  uint8_t qh[QK_K / 4];   // high 2 bits
  int8_t scales[QK_K / 16];  // one signed scale per 16
  fp16_t d;               // value = d * scales[s] * (q - 32), q in [0, 63]
};
static_assert(sizeof(block_q6_K) == QK_K / 2 + QK_K / 4 + QK_K / 16 + 2, "block_q6_K size");

// ---- scalar conversions -------------------------------------------------------------------------------
static inline float fp16_to_f32(fp16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) { mant <<= 1; exp--; }
      mant &= 0x3ff;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static inline fp16_t f32_to_fp16(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return (fp16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0));
  if (ax >= 0x477ff000u) return (fp16_t)(sign | 0x7c00);  // overflow -> inf
  if (ax < 0x38800000u) {  // subnormal or zero in half
    if (ax < 0x33000000u) return (fp16_t)sign;
    const uint32_t e = ax >> 23, m = (ax & 0x7fffff) | 0x800000;
    const uint32_t shift = 126 - e;  // 14 + (113 - e)
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) r++;
    return (fp16_t)(sign | r);
  }
  uint32_t r = ((ax >> 13) - (112u << 10));
  const uint32_t rem = ax & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) r++;
  return (fp16_t)(sign | r);
}

static inline float bf16_to_f32(bf16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static inline bf16_t f32_to_bf16(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((x >> 16) | 0x40);  // quiet NaN
  x += 0x7fff + ((x >> 16) & 1);
  return (bf16_t)(x >> 16);
}

static inline void get_scale_min_k4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
  }
}

// ---- per-format traits --------------------------------------------------------------------------------
struct WTypeInfo {
  int blck;        // elements per block
  int bytes;       // bytes per block
  int act_blck;    // activation quantization block (0: activations stay fp32)
  int row_extra = 0;  // bytes after a row's blocks (int8_row: its row_i8_tail)
};

static inline bool wtype_info(int t, WTypeInfo* out) {
  switch (t) {
    case W_F32: *out = {1, 4, 0}; return true;
    case W_BF16: *out = {1, 2, 0}; return true;
    case W_Q8_0: *out = {QK8_0, (int)sizeof(block_q8_0), 32}; return true;
    case W_Q4_0: *out = {QK4_0, (int)sizeof(block_q4_0), 32}; return true;
    case W_I4_G32: *out = {QK_I4_G32X4, (int)sizeof(block_i4_g32), 32}; return true;
    case W_I4_G128: *out = {QK_I4_G128, (int)sizeof(block_i4_g128), 128}; return true;
    case W_Q4_K: *out = {QK_K, (int)sizeof(block_q4_K), QK_K}; return true;
    case W_Q5_K: *out = {QK_K, (int)sizeof(block_q5_K), QK_K}; return true;
    case W_Q6_K: *out = {QK_K, (int)sizeof(block_q6_K), QK_K}; return true;
    case W_I8_ROW: *out = {QK_I8_ROW, QK_I8_ROW, 32, (int)sizeof(row_i8_tail)}; return true;
    default: return false;
  }
}

// Bytes of one row of n values (n a multiple of the block).
static inline size_t row_bytes_of(const WTypeInfo& info, int n) {
  return (size_t)(n / info.blck) * info.bytes + info.row_extra;
}

// ---- quantized activations ----------------------------------------------------------------------------
// One activation row of n values quantized to int8 in blocks of B (B = the weight format's act_blck):
// value ~ d[b] * qs[j]. isum[b] = sum of qs over block b (for formats with an offset or a min), bsum16 =
// sums per 16 (K-quants' sub-blocks). Stored structure-of-arrays in one buffer, 64-byte aligned parts.
struct ActRow {
  const int8_t* qs;
  const float* d;
  const int32_t* isum;
  const int16_t* bsum16;
  const float* f;  // fp32 activations (formats with act_blck == 0)
  // B == 32 and n a multiple of 128: the quants again in int4_g32's nibble order, so its VNNI kernels with
  // several tokens per weight load need no shuffle of them per token. Per 128 values (4 groups of 32): qx =
  // [values 0-15 of groups 0..3][values 16-31 of groups 0..3] (what a block's low and high nibbles meet);
  // dsum[b] = d[b] * isum[b]. A view of values i0.. (moe.cpp's `shifted`) moves qs, d, isum and bsum16 only:
  // a kernel finds its part of qx and dsum at offset x4_offset() = qs - qs0. nullptr where absent.
  const int8_t* qs0 = nullptr;
  const int8_t* qx = nullptr;
  const float* dsum = nullptr;
};

static inline bool has_x4(int n, int B) { return B == 32 && n % 128 == 0; }
static inline std::ptrdiff_t x4_offset(const ActRow& a) { return a.qs - a.qs0; }  // values from the row's start

static inline size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

// Bytes of one activation row: n values, block B (0 = fp32).
static inline size_t act_row_bytes(int n, int B) {
  if (B == 0) return align64((size_t)n * 4);
  const int nb = n / B;
  const size_t x4 = has_x4(n, B) ? align64(n) + align64(nb * 4) : 0;
  return align64(n) + align64(nb * 4) + align64(nb * 4) + align64((n / 16) * 2) + x4;
}

static inline ActRow act_row_view(uint8_t* base, int n, int B) {
  ActRow r{};
  if (B == 0) {
    r.f = (const float*)base;
    return r;
  }
  const int nb = n / B;
  r.qs = (const int8_t*)base;
  base += align64(n);
  r.d = (const float*)base;
  base += align64(nb * 4);
  r.isum = (const int32_t*)base;
  base += align64(nb * 4);
  r.bsum16 = (const int16_t*)base;
  base += align64((n / 16) * 2);
  if (has_x4(n, B)) {
    r.qs0 = r.qs;
    r.qx = (const int8_t*)base;
    base += align64(n);
    r.dsum = (const float*)base;
  }
  return r;
}

}  // namespace tandem
