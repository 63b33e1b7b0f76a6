// Shared memory of the emulated device: allocation and poisoning per block,
// static __shared__ slots, cp.async groups, the race detector, and the hooks
// that compiler instrumentation (-fsanitize=thread, with these definitions in
// place of the ThreadSanitizer runtime) calls on every load and store of kernel
// code: shared-memory races and bounds, and natural alignment of every access.
#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <sstream>

#include "emu/engine.h"

namespace tfkernels {
namespace emu {
namespace {

// Static __shared__ arrays live after the dynamic part; CUDA allows 48 KB of them.
constexpr size_t kStaticSmemBytes = 48 * 1024;
// Accesses this close to the shared-memory allocation but outside it are
// reported as out of bounds (further away they are some other memory).
constexpr size_t kBoundsSlack = 64 * 1024;
constexpr unsigned char kPoison = 0xFF;  // NaN in fp32, fp16 and bf16

// Race-detector state of one 2-byte granule of shared memory.
struct Shadow {
  uint32_t write_epoch;
  uint16_t writer;
  uint16_t writer_syncwarps;
  uint32_t read_epoch;
  uint16_t reader;
  uint16_t reader_syncwarps;
  uint32_t reader_warps;  // warps that read in read_epoch
};

// The block's shared memory. AddressSanitizer builds allocate it from the heap
// (exact bounds, redzones); other builds map it between two inaccessible guard
// zones of kBoundsSlack bytes, so that an address near it but outside it is
// certainly a shared-memory access out of bounds (and faults if unchecked).
class SmemArena {
 public:
  unsigned char* allocate(size_t bytes) {
#if defined(__SANITIZE_ADDRESS__)
    heap_.reset(new unsigned char[bytes]);
    return heap_.get();
#else
    const size_t page = 4096;
    const size_t span = (bytes + page - 1) / page * page;
    if (span != span_) {
      release();
      void* p = mmap(nullptr, span + 2 * kBoundsSlack, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
      map_ = static_cast<unsigned char*>(p);
      span_ = span;
      mprotect(map_ + kBoundsSlack, span_, PROT_READ | PROT_WRITE);
    }
    // The allocation ends exactly at the upper guard zone.
    return map_ + kBoundsSlack + span_ - bytes;
#endif
  }
  void release() {
    if (map_ != nullptr) munmap(map_, span_ + 2 * kBoundsSlack);
    map_ = nullptr;
    span_ = 0;
  }

 private:
  std::unique_ptr<unsigned char[]> heap_;
  unsigned char* map_ = nullptr;
  size_t span_ = 0;
};

SmemArena g_arena;
std::vector<Shadow> g_shadow;
uint32_t g_epoch_high_water = 1;
bool g_race_check = true;

Block* running() {
  Block* b = active_block();
  return (b != nullptr && b->current != nullptr) ? b : nullptr;
}

std::string where(const Block& b, size_t offset) {
  std::ostringstream os;
  if (offset < b.smem_dynamic) {
    os << "dynamic shared memory byte " << offset;
  } else {
    os << "static shared memory byte " << offset - b.smem_dynamic;
  }
  return os.str();
}

// Classifies p: 0 = not shared memory, 1 = inside, -1 = just outside (a bug).
int classify(const Block& b, const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  const unsigned char* base = b.smem;
  if (c + bytes <= base - kBoundsSlack || c >= base + b.smem_capacity + kBoundsSlack) return 0;
  if (c >= base && c + bytes <= base + b.smem_dynamic) return 1;
  const unsigned char* st = base + b.smem_dynamic;
  if (c >= st && c + bytes <= st + b.smem_static_used) return 1;
  return -1;
}

bool ordered(const Block& b, const KernelThread& t, uint32_t epoch, uint16_t other, uint16_t other_syncwarps) {
  if (epoch != b.epoch || other == t.ctx.linear_tid) return true;
  const int warp = t.ctx.warp;
  return other / 32 == warp && other_syncwarps != static_cast<uint16_t>(b.warp_state[warp].syncwarp_count);
}

[[noreturn]] void report_race(const Block& b, const KernelThread& t, size_t offset, const char* kind, int other,
                              const char* other_kind) {
  std::ostringstream os;
  os << "shared-memory race: " << thread_name(b, t.ctx.linear_tid) << " " << kind << " " << where(b, offset) << ", which "
     << (other >= 0 ? thread_name(b, other) : std::string("another warp")) << " " << other_kind
     << " in the same barrier epoch with no __syncthreads() between them"
     << " (nor a __syncwarp() for lanes of one warp)";
  fail_current(os.str());
}

void check_access(Block& b, const void* p, size_t bytes, bool write) {
  const int cls = classify(b, p, bytes);
  if (cls == 0) return;
  const size_t offset = static_cast<size_t>(static_cast<const unsigned char*>(p) - b.smem);
  if (cls < 0) {
    std::ostringstream os;
    os << (write ? "write" : "read") << " of " << bytes << " bytes out of bounds of shared memory (offset "
       << static_cast<std::ptrdiff_t>(offset) << ", " << b.smem_dynamic << " dynamic + " << b.smem_static_used
       << " static bytes allocated)";
    fail_current(os.str());
  }
  if (!g_race_check) return;
  const KernelThread& t = *b.current;
  const uint16_t tid = static_cast<uint16_t>(t.ctx.linear_tid);
  const uint16_t sw = static_cast<uint16_t>(b.warp_state[t.ctx.warp].syncwarp_count);
  const size_t first = offset / 2, last = (offset + bytes - 1) / 2;
  for (size_t g = first; g <= last; ++g) {
    Shadow& s = g_shadow[g];
    if (s.write_epoch == b.epoch && !ordered(b, t, s.write_epoch, s.writer, s.writer_syncwarps)) {
      report_race(b, t, g * 2, write ? "writes" : "reads", s.writer, "wrote");
    }
    if (write) {
      if (s.read_epoch == b.epoch) {
        const uint32_t others = s.reader_warps & ~(1u << t.ctx.warp);
        if (others != 0) report_race(b, t, g * 2, "writes", -1, "read");
        if (!ordered(b, t, s.read_epoch, s.reader, s.reader_syncwarps)) {
          report_race(b, t, g * 2, "writes", s.reader, "read");
        }
      }
      s.write_epoch = b.epoch;
      s.writer = tid;
      s.writer_syncwarps = sw;
    } else {
      if (s.read_epoch != b.epoch) {
        s.read_epoch = b.epoch;
        s.reader_warps = 0;
      }
      s.reader_warps |= 1u << t.ctx.warp;
      s.reader = tid;
      s.reader_syncwarps = sw;
    }
  }
}

// Natural alignment, as the GPU requires of every access (a misaligned vector
// access faults there; on the CPU it would silently work).
inline void check_alignment(const void* p, size_t bytes) {
  if ((reinterpret_cast<uintptr_t>(p) & (bytes - 1)) != 0) {
    std::ostringstream os;
    os << "misaligned " << bytes << "-byte access at address " << p;
    fail_current(os.str());
  }
}

}  // namespace

void smem_begin_block(Block& b, size_t dynamic_bytes) {
  b.smem_dynamic = dynamic_bytes;
  b.smem_capacity = dynamic_bytes + kStaticSmemBytes;
  b.smem_static_used = 0;
  b.static_slots.clear();
  b.smem = g_arena.allocate(b.smem_capacity);
  std::memset(b.smem, kPoison, b.smem_capacity);
  g_race_check = current_config().race_check;
  if (g_shadow.size() < b.smem_capacity / 2 + 1) g_shadow.assign(b.smem_capacity / 2 + 1, Shadow{});
  // Epochs only grow, so the shadow of earlier blocks never matches: no reset.
  if (g_epoch_high_water > 0xF0000000u) {
    std::fill(g_shadow.begin(), g_shadow.end(), Shadow{});
    g_epoch_high_water = 1;
  }
  b.epoch = g_epoch_high_water;
}

void smem_end_block(Block& b) {
  g_epoch_high_water = b.epoch + 1;
  b.smem = nullptr;
}

unsigned char* dynamic_smem() {
  Block* b = running();
  if (b == nullptr) throw KernelError("tfkernels emu: shared memory used outside a kernel");
  return b->smem;
}

void* static_smem(const void* site, size_t bytes, size_t align) {
  Block* b = running();
  if (b == nullptr) throw KernelError("tfkernels emu: shared memory used outside a kernel");
  for (const auto& slot : b->static_slots) {
    if (slot.first == site) return b->smem + slot.second;
  }
  size_t offset = (b->smem_dynamic + b->smem_static_used + align - 1) / align * align;
  if (offset + bytes > b->smem_capacity) fail_current("static __shared__ arrays exceed 48 KB");
  b->static_slots.emplace_back(site, offset);
  b->smem_static_used = offset + bytes - b->smem_dynamic;
  return b->smem + offset;
}

bool is_smem(const void* p) {
  Block* b = running();
  return b != nullptr && classify(*b, p, 1) != 0;
}

void note_smem_read(const void* p, size_t bytes) {
  if (Block* b = running()) check_access(*b, p, bytes, false);
}

void note_smem_write(const void* p, size_t bytes) {
  if (Block* b = running()) check_access(*b, p, bytes, true);
}

void note_ldmatrix_rows(const void* const rows[8]) {
  Block* b = running();
  if (b == nullptr) return;
  // 32 banks of 4 bytes: the 8 rows (16 bytes each) of one 8x8 matrix take one
  // wavefront when their 32 words fall in 32 different banks; each extra distinct
  // word in a bank costs one more.
  uint32_t words[32][8];
  int count[32] = {0};
  int wavefronts = 1;
  for (int r = 0; r < 8; ++r) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(rows[r]) - reinterpret_cast<uintptr_t>(b->smem);
    for (int w = 0; w < 4; ++w) {
      const uint32_t word = static_cast<uint32_t>(base / 4 + w);
      const int bank = word % 32;
      bool seen = false;
      for (int i = 0; i < count[bank]; ++i) seen |= words[bank][i] == word;
      if (!seen && count[bank] < 8) {
        words[bank][count[bank]++] = word;
        wavefronts = std::max(wavefronts, count[bank]);
      }
    }
  }
  b->stats->ldmatrix_matrices++;
  b->stats->ldmatrix_wavefronts += static_cast<uint64_t>(wavefronts);
}

// ----------------------------------------------------------------- cp.async

void cp_async_issue(void* smem, const void* gmem, size_t bytes, bool zero_fill) {
  Block* b = running();
  if (b == nullptr) throw KernelError("tfkernels emu: cp.async outside a kernel");
  if (classify(*b, smem, bytes) != 1) fail_current("cp.async destination is not inside the block's shared memory");
  if ((reinterpret_cast<uintptr_t>(smem) | reinterpret_cast<uintptr_t>(gmem)) % bytes != 0) {
    fail_current("cp.async addresses must be aligned to the copy size (" + std::to_string(bytes) + " bytes)");
  }
  check_access(*b, smem, bytes, true);
  // Until the wait_group that covers it, the destination holds poison.
  std::memset(smem, kPoison, bytes);
  b->current->open_group.push_back({smem, gmem, bytes, zero_fill});
}

void cp_async_commit() {
  Block* b = running();
  if (b == nullptr) throw KernelError("tfkernels emu: cp.async outside a kernel");
  KernelThread& t = *b->current;
  t.committed.push_back(std::move(t.open_group));
  t.open_group.clear();
}

void complete_async_copies(KernelThread& t, size_t keep_groups) {
  Block& b = *active_block();
  while (t.committed.size() > keep_groups) {
    for (const CpCopy& c : t.committed.front()) {
      // Source read now, at completion: as late as the hardware may read it.
      if (c.zero_fill) {
        std::memset(c.dst, 0, c.bytes);
      } else {
        std::memcpy(c.dst, c.src, c.bytes);
      }
      check_access(b, c.dst, c.bytes, true);
    }
    t.committed.erase(t.committed.begin());
  }
}

void cp_async_wait(int pending) {
  Block* b = running();
  if (b == nullptr) throw KernelError("tfkernels emu: cp.async outside a kernel");
  complete_async_copies(*b->current, static_cast<size_t>(pending));
}

// ----------------------------------------------------------------- instrumentation hooks

namespace {
inline void on_access(void* p, size_t bytes, bool write) {
  Block* b = active_block();
  if (b == nullptr || b->current == nullptr) return;
  if (bytes > 1) check_alignment(p, bytes);
  check_access(*b, p, bytes, write);
}
}  // namespace

}  // namespace emu
}  // namespace tfkernels

// Entry points that gcc's -fsanitize=thread instrumentation calls. Only the
// emulated kernel translation units are instrumented, and only their accesses
// inside a running kernel thread are checked.
#define TFK_EMU_HOOKS(N)                                                                                 \
  extern "C" void __tsan_read##N(void* p) { tfkernels::emu::on_access(p, N, false); }                  \
  extern "C" void __tsan_write##N(void* p) { tfkernels::emu::on_access(p, N, true); }                  \
  extern "C" void __tsan_unaligned_read##N(void* p) { tfkernels::emu::on_access(p, N, false); }        \
  extern "C" void __tsan_unaligned_write##N(void* p) { tfkernels::emu::on_access(p, N, true); }
TFK_EMU_HOOKS(1)
TFK_EMU_HOOKS(2)
TFK_EMU_HOOKS(4)
TFK_EMU_HOOKS(8)
TFK_EMU_HOOKS(16)
#undef TFK_EMU_HOOKS

extern "C" void __tsan_read_range(void* p, unsigned long n) { tfkernels::emu::note_smem_read(p, n); }
extern "C" void __tsan_write_range(void* p, unsigned long n) { tfkernels::emu::note_smem_write(p, n); }
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}

// Atomic operations of instrumented code (static-local guards, std::call_once):
// host code of the launch templates, never shared memory. Done as the plain
// atomics they stand for.
#define TFK_EMU_ATOMICS(BITS, T)                                                                          \
  extern "C" T __tsan_atomic##BITS##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  extern "C" void __tsan_atomic##BITS##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" T __tsan_atomic##BITS##_exchange(volatile T* a, T v, int) {                                 \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                   \
  }                                                                                                       \
  extern "C" T __tsan_atomic##BITS##_fetch_add(volatile T* a, T v, int) {                                \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                    \
  }                                                                                                       \
  extern "C" T __tsan_atomic##BITS##_fetch_sub(volatile T* a, T v, int) {                                \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                                    \
  }                                                                                                       \
  extern "C" T __tsan_atomic##BITS##_fetch_or(volatile T* a, T v, int) {                                 \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                                     \
  }                                                                                                       \
  extern "C" T __tsan_atomic##BITS##_fetch_and(volatile T* a, T v, int) {                                \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                                    \
  }                                                                                                       \
  extern "C" int __tsan_atomic##BITS##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {     \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);              \
  }                                                                                                       \
  extern "C" int __tsan_atomic##BITS##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {       \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);               \
  }                                                                                                       \
  extern "C" T __tsan_atomic##BITS##_compare_exchange_val(volatile T* a, T c, T v, int, int) {           \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                     \
    return c;                                                                                             \
  }
TFK_EMU_ATOMICS(8, unsigned char)
TFK_EMU_ATOMICS(16, unsigned short)
TFK_EMU_ATOMICS(32, unsigned int)
TFK_EMU_ATOMICS(64, unsigned long long)
#undef TFK_EMU_ATOMICS
extern "C" void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
extern "C" void __tsan_atomic_signal_fence(int) {}
