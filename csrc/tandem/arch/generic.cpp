// Baseline path: the reference kernels built for the baseline target (x86-64 SSE2, or any other CPU).
#define TANDEM_ISA_NS isa_generic
#include "tandem/arch/vec_dot_generic.inc"

namespace tandem {
const KernelTable* kernels_generic() {
  static const KernelTable t = isa_generic::generic_table("generic");
  return &t;
}
}  // namespace tandem
