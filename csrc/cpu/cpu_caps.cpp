#include "cpu/cpu_caps.h"

#include <ATen/cpu/Utils.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <unordered_map>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

namespace tfkernels::cpu {

bool cpu_has(const char* capability) {
  static const auto caps = at::cpu::get_cpu_capabilities();
  const auto it = caps.find(capability);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

bool cpu_is_intel() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool intel = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
    char vendor[12];
    std::memcpy(vendor, &ebx, 4);
    std::memcpy(vendor + 4, &edx, 4);
    std::memcpy(vendor + 8, &ecx, 4);
    return std::memcmp(vendor, "GenuineIntel", 12) == 0;
  }();
  return intel;
#else
  return false;
#endif
}

void require_cpu(const char* capability, const char* function) {
  TORCH_CHECK(cpu_has(capability), "tfkernels: ", function, " needs a CPU with ", capability);
}

bool switched_off(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::string(value) == "0";
}

}  // namespace tfkernels::cpu
