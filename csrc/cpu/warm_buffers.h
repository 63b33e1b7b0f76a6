// Large CPU memory kept between calls, already faulted in. A fresh buffer costs a
// page fault per 4 KiB page on first touch: on the 2-core Zen 4 VM, torch.empty + fill
// of 16 MiB took 4.8 ms (median) against 0.2 ms for a buffer touched before, as much
// as a dGELU pass over it; PyTorch's CPU allocator keeps nothing, so eager pays that
// on every call. The ops' large CPU outputs (alloc.h), their backward temporaries
// (dpre, h, the gathered head gradients) and the packed weights (f32dot::PackedB)
// take their memory here; a block comes back when its tensor is freed and waits for
// the next call, process-wide: at most kMaxBlocks of them and kMaxKeptBytes in all,
// the largest kept. TFKERNELS_CPU_WARM_BUFFERS=0 keeps nothing (read per call, for
// A/B timing).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace tfkernels::cpu::warm {

constexpr size_t kMinKeptBytes = size_t{1} << 20;     // smaller blocks are not worth keeping
constexpr size_t kMaxKeptBytes = size_t{256} << 20;   // memory held between calls, at most
constexpr size_t kMaxBlocks = 16;

struct Block {
  void* data = nullptr;
  size_t bytes = 0;
};

// A block of at least `bytes` bytes, 64-byte aligned, contents undefined: the smallest
// kept one that fits and is at most twice as large (a small request does not take
// a large block that the next large request would then miss), else a fresh one.
Block take(size_t bytes);

// Returns a block from take() (to the kept ones, or to the system).
void give_back(Block block);

// A contiguous CPU tensor whose storage is taken here and given back when the
// tensor is freed. Contents undefined. The storage is an ordinary resizable one
// (its allocator takes and gives back blocks too).
at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace tfkernels::cpu::warm
