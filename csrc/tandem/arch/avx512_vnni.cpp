// AVX512-VNNI path: int8 dot products (vpdpbusd) on activations quantized per block, several tokens per
// weight load. Weight nibbles/bytes are the unsigned operand; signed int8 weights use |w| and sign(x, w).
#define TANDEM_ISA_NS isa_avx512_vnni
#include "tandem/arch/vec_dot_generic.inc"
#include "tandem/arch/avx512_common.inc"

namespace tandem {
namespace isa_avx512_vnni {

static inline float h2f(fp16_t h) { return _cvtsh_ss(h); }

// Two fp32 scales broadcast to the low and high 8 lanes.
static inline __m512 scale2(float s0, float s1) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(s0)), _mm256_set1_ps(s1), 1);
}

template <int NT>
static inline void dot_q8_0_nt(int n, const block_q8_0* w, const ActRow* a, float* out) {
  const int nb = n / QK8_0;
  __m512 acc[NT];
  for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
  int b = 0;
  for (; b + 2 <= nb; b += 2) {
    const __m512i wv = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)w[b].qs)),
                                          _mm256_loadu_si256((const __m256i*)w[b + 1].qs), 1);
    const __m512i aw = _mm512_abs_epi8(wv);
    const __mmask64 neg = _mm512_movepi8_mask(wv);
    const float d0 = h2f(w[b].d), d1 = h2f(w[b + 1].d);
    for (int t = 0; t < NT; t++) {
      __m512i x = _mm512_loadu_si512(a[t].qs + b * QK8_0);
      x = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);  // sign(x, w)
      const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, x);
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale2(d0 * a[t].d[b], d1 * a[t].d[b + 1]), acc[t]);
    }
  }
  for (int t = 0; t < NT; t++) {
    float s = _mm512_reduce_add_ps(acc[t]);
    for (int bb = b; bb < nb; bb++) {
      int si = 0;
      for (int j = 0; j < QK8_0; j++) si += w[bb].qs[j] * a[t].qs[bb * QK8_0 + j];
      s += h2f(w[bb].d) * a[t].d[bb] * (float)si;
    }
    out[t] = s;
  }
}

// q4_0 (value d*(q-8)), two blocks per 512-bit register.
template <int NT, bool HAS_MIN, typename Block>
static inline void dot_4bit32_nt(int n, const Block* w, const ActRow* a, float* out) {
  const int nb = n / 32;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m512 acc[NT];
  float accm[NT];
  for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps(), accm[t] = 0.f;
  int b = 0;
  for (; b + 2 <= nb; b += 2) {
    const __m256i q = _mm256_set_m128i(_mm_loadu_si128((const __m128i*)w[b + 1].qs),
                                       _mm_loadu_si128((const __m128i*)w[b].qs));
    const __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
    __m512i wv = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);  // b0lo b1lo b0hi b1hi
    wv = _mm512_shuffle_i64x2(wv, wv, _MM_SHUFFLE(3, 1, 2, 0));             // b0lo b0hi b1lo b1hi
    const float d0 = h2f(w[b].d), d1 = h2f(w[b + 1].d);
    float m0, m1;
    if constexpr (HAS_MIN) m0 = h2f(w[b].m), m1 = h2f(w[b + 1].m);
    else m0 = -8.f * d0, m1 = -8.f * d1;
    for (int t = 0; t < NT; t++) {
      const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, _mm512_loadu_si512(a[t].qs + b * 32));
      const float* ad = a[t].d + b;
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale2(d0 * ad[0], d1 * ad[1]), acc[t]);
      accm[t] += m0 * ad[0] * (float)a[t].isum[b] + m1 * ad[1] * (float)a[t].isum[b + 1];
    }
  }
  for (int t = 0; t < NT; t++) {
    float s = _mm512_reduce_add_ps(acc[t]) + accm[t];
    for (int bb = b; bb < nb; bb++) {
      const int8_t* x = a[t].qs + bb * 32;
      int si = 0;
      for (int j = 0; j < 16; j++) si += (w[bb].qs[j] & 0xF) * x[j] + (w[bb].qs[j] >> 4) * x[j + 16];
      const float d = h2f(w[bb].d);
      float m;
      if constexpr (HAS_MIN) m = h2f(w[bb].m);
      else m = -8.f * d;
      s += a[t].d[bb] * (d * (float)si + m * (float)a[t].isum[bb]);
    }
    out[t] = s;
  }
}

// int4_g32: 4 groups (128 values) per block. Lane l of a dpbusd result covers values 4l..4l+3 of one
// 16-value half of a group: the low nibbles (group g in 128-bit lane g) meet the first 16 activations of
// each group, the high nibbles the second 16.
template <int NT>
static inline void dot_i4_g32_nt(int n, const block_i4_g32* w, const ActRow* a, float* out) {
  const int nb = n / QK_I4_G32X4;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i lane4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 acc[NT];
  __m128 accm[NT];
  for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps(), accm[t] = _mm_setzero_ps();
  for (int b = 0; b < nb; b++) {
    const __m512i q = _mm512_loadu_si512(w[b].qs);
    const __m512i lo = _mm512_and_si512(q, m4), hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);
    const __m256 dm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)w[b].d));  // d0..d3 m0..m3
    const __m128 dw = _mm256_castps256_ps128(dm), mw = _mm256_extractf128_ps(dm, 1);
    for (int t = 0; t < NT; t++) {
      const int8_t* x = a[t].qs + b * QK_I4_G32X4;
      const __m512i x0 = _mm512_loadu_si512(x), x1 = _mm512_loadu_si512(x + 64);  // groups 0,1 | 2,3
      const __m512i xlo = _mm512_shuffle_i64x2(x0, x1, _MM_SHUFFLE(2, 0, 2, 0));
      const __m512i xhi = _mm512_shuffle_i64x2(x0, x1, _MM_SHUFFLE(3, 1, 3, 1));
      __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo);
      s = _mm512_dpbusd_epi32(s, hi, xhi);
      const __m128 dx = _mm_loadu_ps(a[t].d + 4 * b);
      const __m512 sc = _mm512_permutexvar_ps(lane4, _mm512_castps128_ps512(_mm_mul_ps(dw, dx)));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[t]);
      const __m128 xs = _mm_mul_ps(dx, _mm_cvtepi32_ps(_mm_loadu_si128((const __m128i*)(a[t].isum + 4 * b))));
      accm[t] = _mm_fmadd_ps(mw, xs, accm[t]);
    }
  }
  for (int t = 0; t < NT; t++) {
    __m128 m = accm[t];
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    out[t] = _mm512_reduce_add_ps(acc[t]) + _mm_cvtss_f32(m);
  }
}

// int4, groups of 128: one 64-byte load gives elements 0..63 (low nibbles) and 64..127 (high nibbles).
template <int NT>
static inline void dot_i4_g128_nt(int n, const block_i4_g128* w, const ActRow* a, float* out) {
  const int nb = n / QK_I4_G128;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  __m512 acc[NT];
  float accm[NT];
  for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps(), accm[t] = 0.f;
  for (int b = 0; b < nb; b++) {
    const __m512i q = _mm512_loadu_si512(w[b].qs);
    const __m512i lo = _mm512_and_si512(q, m4), hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);
    const float d = h2f(w[b].d), m = h2f(w[b].m);
    for (int t = 0; t < NT; t++) {
      const int8_t* x = a[t].qs + b * QK_I4_G128;
      __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(x));
      s = _mm512_dpbusd_epi32(s, hi, _mm512_loadu_si512(x + 64));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(d * a[t].d[b]), acc[t]);
      accm[t] += m * a[t].d[b] * (float)a[t].isum[b];
    }
  }
  for (int t = 0; t < NT; t++) out[t] = _mm512_reduce_add_ps(acc[t]) + accm[t];
}

#define TANDEM_NT_DISPATCH(fname, call)                                          \
  static void fname(int n, const void* w, const ActRow* a, int na, float* out) { \
    switch (na) {                                                                \
      case 4: call(4); break;                                                    \
      case 3: call(3); break;                                                    \
      case 2: call(2); break;                                                    \
      case 1: call(1); break;                                                    \
      default: break;                                                            \
    }                                                                            \
  }
#define CALL_Q8(NT) dot_q8_0_nt<NT>(n, (const block_q8_0*)w, a, out)
#define CALL_Q4_0(NT) dot_4bit32_nt<NT, false>(n, (const block_q4_0*)w, a, out)
#define CALL_I4_32(NT) dot_i4_g32_nt<NT>(n, (const block_i4_g32*)w, a, out)
#define CALL_I4_128(NT) dot_i4_g128_nt<NT>(n, (const block_i4_g128*)w, a, out)
TANDEM_NT_DISPATCH(dot_q8_0_vnni, CALL_Q8)
TANDEM_NT_DISPATCH(dot_q4_0_vnni, CALL_Q4_0)
TANDEM_NT_DISPATCH(dot_i4_g32_vnni, CALL_I4_32)
TANDEM_NT_DISPATCH(dot_i4_g128_vnni, CALL_I4_128)

}  // namespace isa_avx512_vnni

const KernelTable* kernels_avx512_vnni() {
  static const KernelTable t = [] {
    using namespace isa_avx512_vnni;
    KernelTable k = generic_table("avx512_vnni");
    k.dot[wtype_slot(W_BF16)] = dot_bf16_avx512;
    k.dot[wtype_slot(W_Q8_0)] = dot_q8_0_vnni;
    k.dot[wtype_slot(W_Q4_0)] = dot_q4_0_vnni;
    k.dot[wtype_slot(W_I4_G32)] = dot_i4_g32_vnni;
    k.dot[wtype_slot(W_I4_G128)] = dot_i4_g128_vnni;
    return k;
  }();
  return &t;
}

}  // namespace tandem
