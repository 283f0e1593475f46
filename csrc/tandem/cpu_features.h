// Run-time CPU feature detection and the choice of kernel table.
#pragma once
#include "tandem/kernels.h"

namespace tandem {

const char* isa_name(int isa);
int isa_from_name(const char* name);  // -1 if unknown
bool isa_supported(int isa);           // compiled in, implemented, and the CPU (and OS) has it
int isa_best();
// The active ISA: TANDEM_CPU_ISA at first use, else the best supported; set_isa overrides (false if the
// ISA cannot run here).
int isa_current();
bool set_isa(int isa);
const KernelTable* kernels();
bool cpu_is_amd();  // CPUID vendor AuthenticAMD (decode prefetch default, moe.cpp)

}  // namespace tandem
