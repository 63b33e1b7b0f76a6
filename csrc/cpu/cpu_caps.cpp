#include "cpu/cpu_caps.h"

#include <ATen/cpu/Utils.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>
#include <unordered_map>

namespace tfkernels::cpu {

bool cpu_has(const char* capability) {
  static const auto caps = at::cpu::get_cpu_capabilities();
  const auto it = caps.find(capability);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

void require_cpu(const char* capability, const char* function) {
  TORCH_CHECK(cpu_has(capability), "tfkernels: ", function, " needs a CPU with ", capability);
}

bool switched_off(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::string(value) == "0";
}

}  // namespace tfkernels::cpu
