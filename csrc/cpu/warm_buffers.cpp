#include "cpu/warm_buffers.h"

#include "cpu/cpu_caps.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <vector>

namespace tfkernels::cpu::warm {
namespace {

constexpr size_t kAlign = 64;

struct Kept {
  std::mutex mutex;
  std::vector<Block> blocks;  // largest first
  size_t bytes = 0;
};

Kept& kept() {
  static Kept* k = new Kept();  // never destroyed: blocks may come back during static destruction
  return *k;
}

}  // namespace

Block take(size_t bytes) {
  const size_t rounded = std::max<size_t>(kAlign, (bytes + kAlign - 1) / kAlign * kAlign);
  if (!switched_off("TFKERNELS_CPU_WARM_BUFFERS")) {
    Kept& k = kept();
    std::lock_guard<std::mutex> lock(k.mutex);
    // Largest first: the last block that fits is the smallest that does.
    for (auto it = k.blocks.rbegin(); it != k.blocks.rend() && it->bytes <= 2 * rounded; ++it) {
      if (it->bytes >= rounded) {
        const Block found = *it;
        k.blocks.erase(std::next(it).base());
        k.bytes -= found.bytes;
        return found;
      }
    }
  }
  void* data = std::aligned_alloc(kAlign, rounded);
  TORCH_CHECK(data != nullptr, "tfkernels: out of memory allocating ", rounded, " bytes of scratch");
  return {data, rounded};
}

void give_back(Block block) {
  if (block.data == nullptr) return;
  if (block.bytes < kMinKeptBytes || block.bytes > kMaxKeptBytes || switched_off("TFKERNELS_CPU_WARM_BUFFERS")) {
    std::free(block.data);
    return;
  }
  std::vector<Block> dropped;
  {
    Kept& k = kept();
    std::lock_guard<std::mutex> lock(k.mutex);
    const auto at = std::find_if(k.blocks.begin(), k.blocks.end(), [&](const Block& b) { return b.bytes < block.bytes; });
    k.blocks.insert(at, block);
    k.bytes += block.bytes;
    while (k.blocks.size() > kMaxBlocks || k.bytes > kMaxKeptBytes) {
      dropped.push_back(k.blocks.back());
      k.bytes -= k.blocks.back().bytes;
      k.blocks.pop_back();
    }
  }
  for (const Block& b : dropped) std::free(b.data);
}

namespace {

// Hands out blocks as DataPtrs; the context holds the block so that the deleter
// knows its size.
class KeptAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    auto* block = new Block(take(bytes));
    return {block->data, block, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static void release(void* context) {
    auto* block = static_cast<Block*>(context);
    give_back(*block);
    delete block;
  }
};

c10::Allocator* allocator() {
  static KeptAllocator* a = new KeptAllocator();  // never destroyed, as kept()
  return a;
}

}  // namespace

at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "warm::empty: CPU tensors only");
  return at::detail::empty_generic(sizes, allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
}

}  // namespace tfkernels::cpu::warm
