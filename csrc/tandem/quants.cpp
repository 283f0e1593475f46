// Reference (scalar) quantizers and dequantizers, and activation quantization.
#include <algorithm>
#include <cmath>

#include "tandem/kernels.h"

namespace tandem {

static void quantize_row_q8_0(const float* x, block_q8_0* y, int n) {
  for (int b = 0; b < n / QK8_0; b++, x += QK8_0) {
    float amax = 0.f;
    for (int j = 0; j < QK8_0; j++) amax = std::max(amax, std::fabs(x[j]));
    y[b].d = f32_to_fp16(amax / 127.f);
    const float d = fp16_to_f32(y[b].d);  // quantize against the stored (rounded) scale
    const float id = d > 0.f ? 1.f / d : 0.f;
    for (int j = 0; j < QK8_0; j++)
      y[b].qs[j] = (int8_t)std::clamp((int)std::nearbyint(x[j] * id), -127, 127);
  }
}

// Asymmetric 4-bit group of 32: value = d * q + m with m = min, d = (max - min) / 15; element j in the low
// nibble of qs[j], element j + 16 in the high nibble.
static void quantize_group_i4(const float* x, int QK, fp16_t* dh, fp16_t* mh, uint8_t* qs) {
  float lo = x[0], hi = x[0];
  for (int j = 1; j < QK; j++) lo = std::min(lo, x[j]), hi = std::max(hi, x[j]);
  *dh = f32_to_fp16((hi - lo) / 15.f);
  *mh = f32_to_fp16(lo);
  const float d = fp16_to_f32(*dh), m = fp16_to_f32(*mh);
  const float id = d > 0.f ? 1.f / d : 0.f;
  for (int j = 0; j < QK / 2; j++) {
    const int q0 = std::clamp((int)std::nearbyint((x[j] - m) * id), 0, 15);
    const int q1 = std::clamp((int)std::nearbyint((x[j + QK / 2] - m) * id), 0, 15);
    qs[j] = (uint8_t)(q0 | (q1 << 4));
  }
}

static void quantize_row_i4_g32(const float* x, block_i4_g32* y, int n) {
  for (int b = 0; b < n / QK_I4_G32X4; b++)
    for (int g = 0; g < 4; g++, x += QK_I4_G32) quantize_group_i4(x, QK_I4_G32, &y[b].d[g], &y[b].m[g], y[b].qs + 16 * g);
}

static void quantize_row_i4_g128(const float* x, block_i4_g128* y, int n) {
  for (int b = 0; b < n / QK_I4_G128; b++, x += QK_I4_G128) quantize_group_i4(x, QK_I4_G128, &y[b].d, &y[b].m, y[b].qs);
}

// int8_row: d = amax / 127 over the whole row (fp32, kept exactly), q = round(x / d) in [-127, 127].
static void quantize_row_i8_row(const float* x, uint8_t* y, int n) {
  float amax = 0.f;
  for (int j = 0; j < n; j++) amax = std::max(amax, std::fabs(x[j]));
  row_i8_tail t{amax / 127.f, 0};
  const float id = amax > 0.f ? 127.f / amax : 0.f;
  int8_t* qs = (int8_t*)y;
  for (int j = 0; j < n; j++) {
    qs[j] = (int8_t)std::clamp((int)std::nearbyint(x[j] * id), -127, 127);
    t.rowsum += qs[j];
  }
  std::memcpy(y + n, &t, sizeof t);
}

bool has_quantizer(int type) {
  return type == W_F32 || type == W_BF16 || type == W_Q8_0 || type == W_I4_G32 || type == W_I4_G128 ||
         type == W_I8_ROW;
}

void slice_row(int type, const void* src, int n, int c0, int c1, void* dst) {
  WTypeInfo info;
  if (!wtype_info(type, &info)) return;
  const uint8_t* s = (const uint8_t*)src;
  std::memcpy(dst, s + (size_t)(c0 / info.blck) * info.bytes, (size_t)((c1 - c0) / info.blck) * info.bytes);
  if (type != W_I8_ROW) return;
  row_i8_tail t;
  std::memcpy(&t, s + n, sizeof t);
  t.rowsum = 0;
  for (int j = c0; j < c1; j++) t.rowsum += (int8_t)s[j];
  std::memcpy((uint8_t*)dst + (c1 - c0), &t, sizeof t);
}

bool quantize_row(int type, const float* src, void* dst, int n) {
  switch (type) {
    case W_F32: std::memcpy(dst, src, (size_t)n * 4); return true;
    case W_BF16:
      for (int j = 0; j < n; j++) ((bf16_t*)dst)[j] = f32_to_bf16(src[j]);
      return true;
    case W_Q8_0: quantize_row_q8_0(src, (block_q8_0*)dst, n); return true;
    case W_I4_G32: quantize_row_i4_g32(src, (block_i4_g32*)dst, n); return true;
    case W_I4_G128: quantize_row_i4_g128(src, (block_i4_g128*)dst, n); return true;
    case W_I8_ROW: quantize_row_i8_row(src, (uint8_t*)dst, n); return true;
    default: return false;
  }
}

bool dequantize_row(int type, const void* src, float* y, int n) {
  switch (type) {
    case W_F32: std::memcpy(y, src, (size_t)n * 4); return true;
    case W_BF16:
      for (int j = 0; j < n; j++) y[j] = bf16_to_f32(((const bf16_t*)src)[j]);
      return true;
    case W_Q8_0:
      for (const block_q8_0* b = (const block_q8_0*)src; n > 0; b++, n -= QK8_0, y += QK8_0)
        for (int j = 0; j < QK8_0; j++) y[j] = fp16_to_f32(b->d) * b->qs[j];
      return true;
    case W_I8_ROW: {
      row_i8_tail t;
      std::memcpy(&t, (const uint8_t*)src + n, sizeof t);
      for (int j = 0; j < n; j++) y[j] = t.d * ((const int8_t*)src)[j];
      return true;
    }
    case W_Q4_0:
      for (const block_q4_0* b = (const block_q4_0*)src; n > 0; b++, n -= QK4_0, y += QK4_0) {
        const float d = fp16_to_f32(b->d);
        for (int j = 0; j < QK4_0 / 2; j++) {
          y[j] = d * ((b->qs[j] & 0xF) - 8);
          y[j + QK4_0 / 2] = d * ((b->qs[j] >> 4) - 8);
        }
      }
      return true;
    case W_I4_G32:
      for (const block_i4_g32* b = (const block_i4_g32*)src; n > 0; b++, n -= QK_I4_G32X4)
        for (int g = 0; g < 4; g++, y += QK_I4_G32) {
          const float d = fp16_to_f32(b->d[g]), m = fp16_to_f32(b->m[g]);
          for (int j = 0; j < 16; j++) {
            y[j] = d * (b->qs[16 * g + j] & 0xF) + m;
            y[j + 16] = d * (b->qs[16 * g + j] >> 4) + m;
          }
        }
      return true;
    case W_I4_G128:
      for (const block_i4_g128* b = (const block_i4_g128*)src; n > 0; b++, n -= QK_I4_G128, y += QK_I4_G128) {
        const float d = fp16_to_f32(b->d), m = fp16_to_f32(b->m);
        for (int j = 0; j < QK_I4_G128 / 2; j++) {
          y[j] = d * (b->qs[j] & 0xF) + m;
          y[j + QK_I4_G128 / 2] = d * (b->qs[j] >> 4) + m;
        }
      }
      return true;
    case W_Q4_K:
      for (const block_q4_K* b = (const block_q4_K*)src; n > 0; b++, n -= QK_K) {
        const float d = fp16_to_f32(b->d), dmin = fp16_to_f32(b->dmin);
        const uint8_t* q = b->qs;
        for (int j = 0, is = 0; j < QK_K; j += 64, is += 2, q += 32) {
          uint8_t sc, m;
          get_scale_min_k4(is, b->scales, &sc, &m);
          const float d1 = d * sc, m1 = dmin * m;
          get_scale_min_k4(is + 1, b->scales, &sc, &m);
          const float d2 = d * sc, m2 = dmin * m;
          for (int l = 0; l < 32; l++) *y++ = d1 * (q[l] & 0xF) - m1;
          for (int l = 0; l < 32; l++) *y++ = d2 * (q[l] >> 4) - m2;
        }
      }
      return true;
    case W_Q5_K:
      for (const block_q5_K* b = (const block_q5_K*)src; n > 0; b++, n -= QK_K) {
        const float d = fp16_to_f32(b->d), dmin = fp16_to_f32(b->dmin);
        const uint8_t* ql = b->qs;
        uint8_t u1 = 1, u2 = 2;
        for (int j = 0, is = 0; j < QK_K; j += 64, is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
          uint8_t sc, m;
          get_scale_min_k4(is, b->scales, &sc, &m);
          const float d1 = d * sc, m1 = dmin * m;
          get_scale_min_k4(is + 1, b->scales, &sc, &m);
          const float d2 = d * sc, m2 = dmin * m;
          for (int l = 0; l < 32; l++) *y++ = d1 * ((ql[l] & 0xF) + (b->qh[l] & u1 ? 16 : 0)) - m1;
          for (int l = 0; l < 32; l++) *y++ = d2 * ((ql[l] >> 4) + (b->qh[l] & u2 ? 16 : 0)) - m2;
        }
      }
      return true;
    case W_Q6_K:
      for (const block_q6_K* b = (const block_q6_K*)src; n > 0; b++, n -= QK_K) {
        const float d = fp16_to_f32(b->d);
        const uint8_t* ql = b->ql;
        const uint8_t* qh = b->qh;
        const int8_t* sc = b->scales;
        for (int h = 0; h < QK_K; h += 128, y += 128, ql += 64, qh += 32, sc += 8) {
          for (int l = 0; l < 32; l++) {
            const int is = l / 16;
            y[l + 0] = d * sc[is + 0] * ((int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
            y[l + 32] = d * sc[is + 2] * ((int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
            y[l + 64] = d * sc[is + 4] * ((int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            y[l + 96] = d * sc[is + 6] * ((int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
          }
        }
      }
      return true;
    default: return false;
  }
}

void quantize_act(const float* x, int n, int B, uint8_t* row, int n_total, int i0) {
  if (B == 0) {
    std::memcpy((float*)row + i0, x, (size_t)n * 4);
    return;
  }
  ActRow r = act_row_view(row, n_total, B);
  int8_t* qs = (int8_t*)r.qs + i0;
  float* d = (float*)r.d + i0 / B;
  int32_t* isum = (int32_t*)r.isum + i0 / B;
  int16_t* bsum = (int16_t*)r.bsum16 + i0 / 16;
  for (int b = 0; b < n / B; b++, x += B, qs += B) {
    float amax = 0.f;
    for (int j = 0; j < B; j++) amax = std::max(amax, std::fabs(x[j]));
    const float db = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
    int s = 0;
    for (int j = 0; j < B; j++) {
      qs[j] = (int8_t)std::clamp((int)std::nearbyint(x[j] * id), -127, 127);
      s += qs[j];
    }
    d[b] = db;
    isum[b] = s;
    for (int j = 0; j < B; j += 16) {
      int s16 = 0;
      for (int l = 0; l < 16; l++) s16 += qs[j + l];
      *bsum++ = (int16_t)s16;
    }
    if (r.qx) {  // the int4_g32 layout (quants.h): block k of the row is group g = k % 4 of its 128
      const int k = i0 / B + b, c = k / 4 * 128, g = k % 4;
      std::memcpy((int8_t*)r.qx + c + 16 * g, qs, 16);
      std::memcpy((int8_t*)r.qx + c + 64 + 16 * g, qs + 16, 16);
      ((float*)r.dsum)[k] = db * (float)s;
    }
  }
}

}  // namespace tandem
