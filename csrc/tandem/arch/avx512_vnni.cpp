// AVX512-VNNI path (no BF16): int8 decode kernels; every expert takes the per-row path.
#define TANDEM_ISA_NS isa_avx512_vnni
#include "tandem/arch/vec_dot_generic.inc"
#include "tandem/arch/avx512_common.inc"
#include "tandem/arch/avx512_vnni.inc"

namespace tandem {
const KernelTable* kernels_avx512_vnni() {
  static const KernelTable t = isa_avx512_vnni::vnni_table("avx512_vnni");
  return &t;
}
}  // namespace tandem
