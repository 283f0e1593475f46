// AVX2 + FMA + F16C path: reference kernels vectorized by the compiler for 256-bit registers.
#define TANDEM_ISA_NS isa_avx2
#include "tandem/arch/vec_dot_generic.inc"

namespace tandem {
const KernelTable* kernels_avx2() {
  static const KernelTable t = isa_avx2::generic_table("avx2");
  return &t;
}
}  // namespace tandem
