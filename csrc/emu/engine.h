// Internal state of the emulated device shared by engine.cpp (scheduling,
// barriers, collectives), memory.cpp (shared memory, cp.async, race detector,
// instrumentation hooks) and stats.cpp. Not for kernel code: kernels see
// runtime.h through the stand-in CUDA headers.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "emu/fiber.h"
#include "emu/runtime.h"

namespace tfkernels {
namespace emu {

enum class ThreadState : uint8_t { kRunnable, kAtBarrier, kAtCollective, kDone };

struct CpCopy {
  void* dst;
  const void* src;
  size_t bytes;
  bool zero_fill;
};

struct KernelThread {
  Fiber fiber;
  ThreadContext ctx;
  ThreadState state = ThreadState::kRunnable;
  uint64_t collective_count = 0;  // collectives this lane has entered
  uint64_t barrier_count = 0;     // barriers this thread has passed
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  std::vector<CpCopy> open_group;                  // issued, not yet committed
  std::vector<std::vector<CpCopy>> committed;      // oldest first
};

struct WarpState {
  int lanes = 32;
  unsigned full_mask = 0xffffffffu;
  // Double-buffered by the parity of the collective count: a lane can be at most
  // one collective ahead of the slowest lane of its warp.
  int arrived[2] = {0, 0};
  Collective kind[2] = {};
  unsigned mask[2] = {};
  const char* what[2] = {};
  alignas(16) unsigned char slots[2][32][kSlotBytes];
  uint32_t syncwarp_count = 0;  // completed __syncwarp()s: orders lanes for the race detector
};

struct KernelStats {
  uint64_t launches = 0, blocks = 0;
  uint64_t ldmatrix_matrices = 0, ldmatrix_wavefronts = 0;
};

struct Block {
  const LaunchSpec* spec = nullptr;
  Dim3 block_idx;
  int threads = 0, warps = 0, live = 0;
  std::vector<KernelThread>* pool = nullptr;
  WarpState warp_state[32];
  int at_barrier = 0;
  // __syncthreads_count tallies, double-buffered by the barrier's parity: a thread
  // is at most one barrier ahead of one that has not yet read the last result.
  int predicate_count[2] = {0, 0};
  uint32_t epoch = 1;  // barrier epochs, for the race detector
  // Shared memory: [dynamic | static], poisoned with 0xFF (NaN in every float type).
  unsigned char* smem = nullptr;
  size_t smem_dynamic = 0, smem_capacity = 0, smem_static_used = 0;
  std::vector<std::pair<const void*, size_t>> static_slots;
  KernelThread* current = nullptr;
  std::string error;
  KernelStats* stats = nullptr;
};

// The block being executed on this OS thread (nullptr outside kernels).
Block* active_block();

// memory.cpp: shared memory of a block and its race detector.
void smem_begin_block(Block& b, size_t dynamic_bytes);
void smem_end_block(Block& b);
void complete_async_copies(KernelThread& t, size_t keep_groups);

// engine.cpp: ends the current fiber with an error message (never returns).
[[noreturn]] void fail_current(const std::string& message);
std::string thread_name(const Block& b, int linear_tid);

}  // namespace emu
}  // namespace tfkernels
