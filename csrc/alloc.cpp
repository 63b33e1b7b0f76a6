#include "alloc.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "cpu/warm_buffers.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace tfkernels {

bool poison_outputs() {
  static const bool enabled = [] {
    const char* flag = std::getenv("TFKERNELS_POISON_OUTPUTS");
    return flag != nullptr && std::strcmp(flag, "1") == 0;
  }();
  return enabled;
}

namespace {

// Outputs from this size on are advised for huge pages (a few 2 MiB pages at least).
constexpr size_t kHugePageAdviceBytes = size_t{8} << 20;
constexpr uintptr_t kHugePage = uintptr_t{2} << 20;

// MADV_HUGEPAGE on the whole 2 MiB pages inside [p, p + bytes). The advice only
// shapes how untouched pages get faulted in; errors (no THP in this kernel) are
// harmless and ignored.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHugePage - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// TFKERNELS_CPU_HUGE_PAGES=0 turns the advice off (read per call, for A/B timing).
bool huge_pages_wanted() {
  const char* flag = std::getenv("TFKERNELS_CPU_HUGE_PAGES");
  return flag == nullptr || std::strcmp(flag, "0") != 0;
}

at::Tensor poisoned(at::Tensor t) {
  if (poison_outputs() && at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (options.device().is_cpu() &&
      c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize()) >=
          static_cast<int64_t>(cpu::warm::kMinKeptBytes)) {
    return poisoned(cpu::warm::empty(sizes, options));
  }
  return poisoned(at::empty(sizes, options));
}

at::Tensor empty_output_like(const at::Tensor& t) {
  return empty_output(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
}

at::Tensor empty_streamed_output_like(const at::Tensor& like) {
  at::Tensor t = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  if (t.device().is_cpu() && t.nbytes() >= kHugePageAdviceBytes && huge_pages_wanted()) {
    advise_huge_pages(t.data_ptr(), t.nbytes());
  }
  return poisoned(t);
}

}  // namespace tfkernels
