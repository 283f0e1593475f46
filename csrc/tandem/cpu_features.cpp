#include "tandem/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(TANDEM_X86)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace tandem {

#if !defined(TANDEM_X86)
const KernelTable* kernels_avx2() { return nullptr; }
const KernelTable* kernels_avx512() { return nullptr; }
const KernelTable* kernels_avx512_vnni() { return nullptr; }
const KernelTable* kernels_avx512_bf16() { return nullptr; }
const KernelTable* kernels_amx() { return nullptr; }
#endif

namespace {

struct Features {
  bool avx2 = false, fma = false, f16c = false, avx512f = false, avx512bw = false, avx512vl = false,
       avx512dq = false, avx512vnni = false, avx512bf16 = false, amx_tile = false, amx_int8 = false,
       amx_bf16 = false;
};

Features detect() {
  Features f;
#if defined(TANDEM_X86)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  f.fma = c & (1u << 12);
  f.f16c = c & (1u << 29);
  if (!osxsave) return f;
  unsigned xlo, xhi;
  __asm__("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  const unsigned long long xcr0 = ((unsigned long long)xhi << 32) | xlo;
  const bool ymm_os = (xcr0 & 0x6) == 0x6, zmm_os = (xcr0 & 0xe6) == 0xe6;
  const bool amx_os = (xcr0 & (3ull << 17)) == (3ull << 17);
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = ymm_os && (b & (1u << 5));
  f.fma = f.fma && ymm_os;
  f.f16c = f.f16c && ymm_os;
  f.avx512f = zmm_os && (b & (1u << 16));
  f.avx512dq = zmm_os && (b & (1u << 17));
  f.avx512bw = zmm_os && (b & (1u << 30));
  f.avx512vl = zmm_os && (b & (1u << 31));
  f.avx512vnni = zmm_os && (c & (1u << 11));
  f.amx_bf16 = amx_os && (d & (1u << 22));
  f.amx_tile = amx_os && (d & (1u << 24));
  f.amx_int8 = amx_os && (d & (1u << 25));
  __cpuid_count(7, 1, a, b, c, d);
  f.avx512bf16 = zmm_os && (a & (1u << 5));
#endif
  return f;
}

}  // namespace

// Asked once: in a VM CPUID traps to the hypervisor (~4-9 us on the 2-core EPYC VM), and decode calls ask per call.
bool cpu_is_amd() {
  static const bool amd = [] {
#if defined(TANDEM_X86)
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    return b == 0x68747541 && d == 0x69746e65 && c == 0x444d4163;  // "Auth" "enti" "cAMD"
#else
    return false;
#endif
  }();
  return amd;
}

namespace {

// Linux hands out AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA);
// the grant covers the whole process, so every pool thread may then load a tile config.
bool amx_permission() {
#if defined(TANDEM_X86) && defined(__linux__)
  static const bool ok = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

const Features& features() {
  static const Features f = detect();
  return f;
}

const char* const kNames[ISA_COUNT] = {"generic", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx"};

std::atomic<int> g_isa{-1};

}  // namespace

const char* isa_name(int isa) { return isa >= 0 && isa < ISA_COUNT ? kNames[isa] : "?"; }

int isa_from_name(const char* name) {
  for (int i = 0; i < ISA_COUNT; i++)
    if (std::strcmp(name, kNames[i]) == 0) return i;
  return -1;
}

static const KernelTable* table_of(int isa) {
  switch (isa) {
    case ISA_GENERIC: return kernels_generic();
    case ISA_AVX2: return kernels_avx2();
    case ISA_AVX512: return kernels_avx512();
    case ISA_AVX512_VNNI: return kernels_avx512_vnni();
    case ISA_AVX512_BF16: return kernels_avx512_bf16();
    case ISA_AMX: return kernels_amx();
    default: return nullptr;
  }
}

bool isa_supported(int isa) {
  const Features& f = features();
  if (!table_of(isa)) return false;
  const bool avx2 = f.avx2 && f.fma && f.f16c;
  const bool avx512 = avx2 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq;
  switch (isa) {
    case ISA_GENERIC: return true;
    case ISA_AVX2: return avx2;
    case ISA_AVX512: return avx512;
    case ISA_AVX512_VNNI: return avx512 && f.avx512vnni;
    case ISA_AVX512_BF16: return avx512 && f.avx512vnni && f.avx512bf16;
    case ISA_AMX:
      return avx512 && f.avx512vnni && f.avx512bf16 && f.amx_tile && f.amx_bf16 && f.amx_int8 && amx_permission();
    default: return false;
  }
}

int isa_best() {
  for (int i = ISA_COUNT - 1; i > 0; i--)
    if (isa_supported(i)) return i;
  return ISA_GENERIC;
}

int isa_current() {
  int isa = g_isa.load();
  if (isa >= 0) return isa;
  isa = isa_best();
  if (const char* env = std::getenv("TANDEM_CPU_ISA"); env && *env) {
    const int forced = isa_from_name(env);
    if (forced < 0) throw std::runtime_error(std::string("TANDEM_CPU_ISA: unknown ISA '") + env + "'");
    if (!isa_supported(forced))
      throw std::runtime_error(std::string("TANDEM_CPU_ISA=") + env + ": not supported on this CPU/build");
    isa = forced;
  }
  g_isa.store(isa);
  return isa;
}

bool set_isa(int isa) {
  if (!isa_supported(isa)) return false;
  g_isa.store(isa);
  return true;
}

const KernelTable* kernels() { return table_of(isa_current()); }

}  // namespace tandem
