// AVX512-VNNI path (no BF16): int8 decode kernels; int8_row layers have the int8 vpdpbusd prefill GEMM, the
// other formats take the per-row path for every expert.
#define TANDEM_ISA_NS isa_avx512_vnni
#include "tandem/arch/vec_dot_generic.inc"
#include "tandem/arch/avx512_common.inc"
#include "tandem/arch/avx512_vnni.inc"
#include "tandem/arch/int8_gemm.inc"

namespace tandem {
const KernelTable* kernels_avx512_vnni() {
  static const KernelTable t = [] {
    KernelTable k = isa_avx512_vnni::vnni_table("avx512_vnni");
    isa_avx512_vnni::fill_i8(k);
    k.gemm_i8 = isa_avx512_vnni::gemm_run_vnni_i8;
    return k;
  }();
  return &t;
}
}  // namespace tandem
