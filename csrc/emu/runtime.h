// The emulated device's execution engine: runs a CUDA grid on the CPU, one block
// at a time, every thread of the block as a fiber on the calling OS thread.
//
// What it models (and checks that a GPU would not give us):
//  - __syncthreads: a block-wide barrier; a barrier some threads never reach is a
//    deadlock, reported with the kernel, block and the waiting threads.
//  - warp collectives (shuffles, __syncwarp, ldmatrix, mma): each lane deposits
//    its operands and waits until all 32 lanes of the warp have arrived at the same
//    collective, then computes with every lane's inputs (warp_exchange below).
//  - schedules: between blocking points a fiber runs alone, so the schedule is the
//    order in which runnable fibers are picked: lowest warp first, highest warp
//    first (each warp runs ahead to its next barrier) or seeded random; each is
//    reproducible. Comparing outputs across schedules exposes missing barriers.
//  - shared memory: fresh NaN bytes (0xFF) for every block; dynamic size as the
//    launch asks for it, static __shared__ arrays carved after it.
//  - a race detector on shared memory per barrier epoch (race.h), fed by the
//    primitives and, in race-checking builds, by compiler instrumentation of
//    every plain load and store.
// Errors found inside a fiber (a race, a misaligned vector access, a deadlock)
// end the launch: it throws emu::KernelError from the launching thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace tfkernels {
namespace emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

class KernelError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Schedule { kLowestWarpFirst, kHighestWarpFirst, kRandom };

// How launches run; read from the environment at every launch (see config.cpp):
//   TFKERNELS_EMU_SCHEDULE = lowest | highest | random[:SEED]   (default lowest)
//   TFKERNELS_EMU_RACECHECK = 1 | 0                              (default 1)
struct Config {
  Schedule schedule = Schedule::kLowestWarpFirst;
  uint64_t seed = 0;
  bool race_check = true;
};
Config current_config();

// ----------------------------------------------------------------- per-thread view

// What a kernel thread sees of itself; valid only inside a fiber.
struct ThreadContext {
  Dim3 thread_idx, block_idx, block_dim, grid_dim;
  int linear_tid = 0;  // x + y * bdx + z * bdx * bdy
  int warp = 0, lane = 0;
};
const ThreadContext& this_thread();

// The block's shared memory: [dynamic | static] bytes.
unsigned char* dynamic_smem();
// Static __shared__ arrays: one slot per declaration site (`site` is unique per
// site and translation unit), allocated on first use in each block.
void* static_smem(const void* site, size_t bytes, size_t align);

// ----------------------------------------------------------------- synchronisation

void syncthreads(const char* file, int line);
// __syncthreads_count: the barrier, returning how many threads passed a non-zero
// predicate (threads that exited count as zero).
int syncthreads_count(int predicate, const char* file, int line);

enum class Collective : uint8_t { kSyncwarp, kShuffle, kLdmatrix, kMma, kVote };
const char* collective_name(Collective c);

// Deposits `bytes` of this lane's operands, waits for all 32 lanes of the warp to
// arrive at the same kind of collective with the same mask, and returns the 32
// lanes' deposits (slot i = lane i, kSlotBytes apart), valid until this lane's
// next collective. `mask` must name every lane of the warp (.sync.aligned).
constexpr size_t kSlotBytes = 64;
const unsigned char* warp_exchange(Collective kind, unsigned mask, const void* mine, size_t bytes, const char* what);

// ----------------------------------------------------------------- checks and reports

// Raises a kernel error from inside a fiber (ends the launch).
[[noreturn]] void fail(const std::string& message);

// Shared-memory accesses seen by the race detector. `async` marks cp.async.
void note_smem_read(const void* p, size_t bytes);
void note_smem_write(const void* p, size_t bytes);
bool is_smem(const void* p);
// ldmatrix bank-conflict accounting: one 8x8 matrix read from 8 row addresses.
void note_ldmatrix_rows(const void* const rows[8]);

// cp.async bookkeeping of the calling thread (see ptx.h).
void cp_async_issue(void* smem, const void* gmem, size_t bytes, bool zero_fill);
void cp_async_commit();
void cp_async_wait(int pending);

// ----------------------------------------------------------------- launching

using KernelThunk = void (*)(const void* bound_args);

struct LaunchSpec {
  Dim3 grid, block;
  size_t dynamic_smem = 0;
  const char* kernel_name = "?";
  const void* kernel_id = nullptr;  // the kernel function, for the smem opt-in table
};

// Runs `thunk(args)` for every thread of every block. Throws KernelError.
void run_grid(const LaunchSpec& spec, KernelThunk thunk, const void* args);

// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) for a kernel; launches above
// 48 KB without it fail as on a GPU.
void set_max_dynamic_smem(const void* kernel_id, int bytes);

// The last launch error as cudaGetLastError reports it (0 = success), cleared on read.
int take_last_error();
void set_last_error(int code);

// Per-kernel counters since the last reset: launches, blocks, shared-memory
// wavefronts of ldmatrix and the ideal count, for the bank-conflict report.
std::string stats_report();
void reset_stats();

}  // namespace emu
}  // namespace tfkernels
