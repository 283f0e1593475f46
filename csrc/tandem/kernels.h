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

enum Isa : int { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512_VNNI = 3, ISA_AMX = 4, ISA_COUNT = 5 };

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
};

// One per ISA file; each returns nullptr when that ISA was not compiled in.
const KernelTable* kernels_generic();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();
const KernelTable* kernels_avx512_vnni();

}  // namespace tandem
