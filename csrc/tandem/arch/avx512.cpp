// AVX-512F/BW/VL/DQ path (no VNNI): hand-written bf16 kernel, the AVX2 K-quant kernels, the other integer
// formats vectorized by the compiler.
#define TANDEM_ISA_NS isa_avx512
#include "tandem/arch/vec_dot_generic.inc"
#include "tandem/arch/avx512_common.inc"
#include "tandem/arch/kquants_avx2.inc"

namespace tandem {
const KernelTable* kernels_avx512() {
  static const KernelTable t = [] {
    KernelTable k = isa_avx512::generic_table("avx512");
    k.dot[wtype_slot(W_BF16)] = isa_avx512::dot_bf16_avx512;
    isa_avx512::set_kquants_avx2(k);
    return k;
  }();
  return &t;
}
}  // namespace tandem
