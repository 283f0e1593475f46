// AVX2 + FMA + F16C path: hand-written K-quant kernels, the other formats' reference kernels vectorized by
// the compiler for 256-bit registers.
#define TANDEM_ISA_NS isa_avx2
#include "tandem/arch/vec_dot_generic.inc"
#include "tandem/arch/kquants_avx2.inc"

namespace tandem {
const KernelTable* kernels_avx2() {
  static const KernelTable t = [] {
    KernelTable k = isa_avx2::generic_table("avx2");
    isa_avx2::set_kquants_avx2(k);
    return k;
  }();
  return &t;
}
}  // namespace tandem
