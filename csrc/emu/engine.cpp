// Scheduling, barriers and warp collectives of the emulated device (see runtime.h).
#include <cxxabi.h>
#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <unordered_map>

#include "emu/engine.h"

namespace tfkernels {
namespace emu {
namespace {

// One launch at a time in the process (launches from several OS threads queue
// on g_launch_mutex), so the instrumentation hooks can read a plain global.
Block* t_block = nullptr;
std::mutex g_launch_mutex;
thread_local int t_last_error = 0;

// Kernel stacks: locals of the unrolled tensor-core kernels are a few KB; the
// sanitizer builds need more.
#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kStackBytes = 512 * 1024;
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif

// The device the launchers see (an H100/H200-class part): 227 KB of opt-in
// shared memory a block, 48 KB without the opt-in.
constexpr size_t kDefaultDynamicSmem = 48 * 1024;
constexpr size_t kMaxDynamicSmem = 227 * 1024;
constexpr int kMaxThreadsPerBlock = 1024;

std::mutex g_optin_mutex;
std::unordered_map<const void*, int>& optin_table() {
  static std::unordered_map<const void*, int> table;
  return table;
}

// cudaError_t values the launchers may see (runtime API numbering).
constexpr int kErrInvalidValue = 1;
constexpr int kErrInvalidConfiguration = 9;

uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct FiberStart {
  Block* block;
  KernelThread* thread;
  KernelThunk thunk;
  const void* args;
};

void fiber_entry(void* p) {
  auto* start = static_cast<FiberStart*>(p);
  Block& b = *start->block;
  KernelThread& t = *start->thread;
  start->thunk(start->args);
  t.state = ThreadState::kDone;
  --b.live;
  // Threads that exited count as arrived at any barrier the others wait at.
  if (b.live > 0 && b.at_barrier == b.live) {
    for (int i = 0; i < b.threads; ++i) {
      KernelThread& o = (*b.pool)[i];
      if (o.state == ThreadState::kAtBarrier) {
        o.state = ThreadState::kRunnable;
        b.predicate_count[1 - static_cast<int>(o.barrier_count & 1)] = 0;
      }
    }
    b.at_barrier = 0;
    ++b.epoch;
  }
  t.fiber.yield();  // final: never resumed
  std::abort();
}

// Order in which the scheduler looks for a runnable thread: warp by warp
// (ascending or descending), lanes ascending; random picks among all.
int pick_next(Block& b, const Config& cfg, uint64_t& rng) {
  std::vector<KernelThread>& pool = *b.pool;
  if (cfg.schedule == Schedule::kRandom) {
    int runnable[kMaxThreadsPerBlock];
    int n = 0;
    for (int i = 0; i < b.threads; ++i)
      if (pool[i].state == ThreadState::kRunnable) runnable[n++] = i;
    return n == 0 ? -1 : runnable[splitmix64(rng) % static_cast<uint64_t>(n)];
  }
  const bool descending = cfg.schedule == Schedule::kHighestWarpFirst;
  for (int wi = 0; wi < b.warps; ++wi) {
    const int w = descending ? b.warps - 1 - wi : wi;
    const int end = std::min(b.threads, (w + 1) * 32);
    for (int i = w * 32; i < end; ++i)
      if (pool[i].state == ThreadState::kRunnable) return i;
  }
  return -1;
}

std::string dim_str(const Dim3& d) {
  std::ostringstream os;
  os << "(" << d.x << "," << d.y << "," << d.z << ")";
  return os.str();
}

std::string deadlock_report(const Block& b) {
  std::ostringstream os;
  os << "deadlock in " << b.spec->kernel_name << ", block " << dim_str(b.block_idx)
     << ": no thread can run but " << b.live << " of " << b.threads << " have not finished.";
  for (int w = 0; w < b.warps; ++w) {
    int barrier = 0, collective = 0, done = 0;
    const char* file = nullptr;
    int line = 0;
    for (int i = w * 32; i < std::min(b.threads, (w + 1) * 32); ++i) {
      const KernelThread& t = (*b.pool)[i];
      if (t.state == ThreadState::kAtBarrier) {
        ++barrier;
        file = t.barrier_file;
        line = t.barrier_line;
      } else if (t.state == ThreadState::kAtCollective) {
        ++collective;
      } else if (t.state == ThreadState::kDone) {
        ++done;
      }
    }
    if (barrier + collective == 0) continue;
    os << " warp " << w << ":";
    if (barrier) os << " " << barrier << " lanes at __syncthreads (" << (file ? file : "?") << ":" << line << ")";
    if (collective) {
      const WarpState& ws = b.warp_state[w];
      const int p = static_cast<int>((*b.pool)[w * 32].collective_count & 1);
      os << " " << collective << " lanes at a warp collective (" << (ws.what[p] ? ws.what[p] : "?") << ")";
    }
    if (done) os << ", " << done << " lanes exited";
    os << ";";
  }
  return os.str();
}

}  // namespace

Block* active_block() { return t_block; }

Config current_config() {
  Config c;
  if (const char* s = std::getenv("TFKERNELS_EMU_SCHEDULE")) {
    if (std::strcmp(s, "highest") == 0) {
      c.schedule = Schedule::kHighestWarpFirst;
    } else if (std::strncmp(s, "random", 6) == 0) {
      c.schedule = Schedule::kRandom;
      c.seed = s[6] == ':' ? std::strtoull(s + 7, nullptr, 10) : 0;
    } else if (std::strcmp(s, "lowest") != 0 && *s != '\0') {
      throw KernelError(std::string("TFKERNELS_EMU_SCHEDULE must be lowest, highest or random[:SEED], got \"") +
                        s + "\"");
    }
  }
  if (const char* s = std::getenv("TFKERNELS_EMU_RACECHECK")) c.race_check = std::strcmp(s, "0") != 0;
  return c;
}

const ThreadContext& this_thread() {
  if (t_block == nullptr || t_block->current == nullptr) {
    throw KernelError("tfkernels emu: threadIdx/blockIdx used outside a kernel launch");
  }
  return t_block->current->ctx;
}

std::string thread_name(const Block& b, int tid) {
  std::ostringstream os;
  os << "thread " << tid << " (warp " << tid / 32 << ", lane " << tid % 32 << ")";
  (void)b;
  return os.str();
}

void fail_current(const std::string& message) {
  Block* b = t_block;
  if (b == nullptr || b->current == nullptr) throw KernelError(message);
  if (b->error.empty()) {
    b->error = message + " [in " + b->spec->kernel_name + ", block " + dim_str(b->block_idx) + ", " +
               thread_name(*b, b->current->ctx.linear_tid) + "]";
  }
  // Park this fiber forever: the scheduler sees the error and abandons the launch.
  for (;;) b->current->fiber.yield();
}

void fail(const std::string& message) { fail_current(message); }

int syncthreads_count(int predicate, const char* file, int line) {
  Block& b = *t_block;
  KernelThread& t = *b.current;
  const int p = static_cast<int>(t.barrier_count & 1);
  b.predicate_count[p] += predicate != 0;
  syncthreads(file, line);
  return b.predicate_count[p];
}

void syncthreads(const char* file, int line) {
  Block& b = *t_block;
  KernelThread& t = *b.current;
  t.barrier_file = file;
  t.barrier_line = line;
  t.state = ThreadState::kAtBarrier;
  if (++b.at_barrier == b.live) {
    for (int i = 0; i < b.threads; ++i) {
      KernelThread& o = (*b.pool)[i];
      if (o.state == ThreadState::kAtBarrier) o.state = ThreadState::kRunnable;
    }
    b.at_barrier = 0;
    ++b.epoch;
    b.predicate_count[1 - static_cast<int>(t.barrier_count & 1)] = 0;  // every thread has read it
  }
  t.fiber.yield();
  ++t.barrier_count;
}

const char* collective_name(Collective c) {
  switch (c) {
    case Collective::kSyncwarp: return "__syncwarp";
    case Collective::kShuffle: return "shuffle";
    case Collective::kLdmatrix: return "ldmatrix";
    case Collective::kMma: return "mma";
    case Collective::kVote: return "vote";
  }
  return "?";
}

const unsigned char* warp_exchange(Collective kind, unsigned mask, const void* mine, size_t bytes, const char* what) {
  Block& b = *t_block;
  KernelThread& t = *b.current;
  WarpState& w = b.warp_state[t.ctx.warp];
  if (mask != w.full_mask) {
    std::ostringstream os;
    os << what << ": member mask 0x" << std::hex << mask << " does not name every lane of the warp (0x"
       << w.full_mask << "); partial-warp collectives are not supported by the emulator";
    fail_current(os.str());
  }
  if (bytes > kSlotBytes) fail_current(std::string(what) + ": operands larger than the exchange slot");
  const int p = static_cast<int>(t.collective_count & 1);
  if (w.arrived[p] == 0) {
    w.kind[p] = kind;
    w.mask[p] = mask;
    w.what[p] = what;
  } else if (w.kind[p] != kind) {
    fail_current(std::string("warp divergence: this lane reached ") + what + " while other lanes of its warp are at " +
                 w.what[p]);
  }
  std::memcpy(w.slots[p][t.ctx.lane], mine, bytes);
  if (++w.arrived[p] == w.lanes) {
    const int first = t.ctx.warp * 32;
    for (int i = first; i < first + w.lanes; ++i) {
      KernelThread& o = (*b.pool)[i];
      if (o.state == ThreadState::kAtCollective) o.state = ThreadState::kRunnable;
    }
    w.arrived[1 - p] = 0;  // every lane has left the previous collective
    if (kind == Collective::kSyncwarp) ++w.syncwarp_count;
  } else {
    t.state = ThreadState::kAtCollective;
  }
  t.fiber.yield();
  ++t.collective_count;
  return &w.slots[p][0][0];
}

std::string kernel_display_name(const void* kernel) {
  Dl_info info;
  if (dladdr(kernel, &info) != 0 && info.dli_sname != nullptr) {
    int status = 0;
    char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string name = status == 0 && demangled != nullptr ? demangled : info.dli_sname;
    std::free(demangled);
    // "void ns::kernel<...>(Params)": keep the qualified name and template arguments.
    const size_t paren = name.rfind('(');
    if (paren != std::string::npos) name = name.substr(0, paren);
    if (name.rfind("void ", 0) == 0) name = name.substr(5);
    return name;
  }
  return "";
}

void set_max_dynamic_smem(const void* kernel_id, int bytes) {
  std::lock_guard<std::mutex> lock(g_optin_mutex);
  optin_table()[kernel_id] = bytes;
}

int take_last_error() {
  const int e = t_last_error;
  t_last_error = 0;
  return e;
}
void set_last_error(int code) { t_last_error = code; }

KernelStats& stats_for(const char* kernel_name);

void run_grid(const LaunchSpec& spec, KernelThunk thunk, const void* args) {
  const Config cfg = current_config();
  const uint64_t threads = uint64_t(spec.block.x) * spec.block.y * spec.block.z;
  if (spec.grid.x == 0 || spec.grid.y == 0 || spec.grid.z == 0 || threads == 0 || threads > kMaxThreadsPerBlock ||
      spec.grid.y > 65535 || spec.grid.z > 65535 || spec.grid.x > 0x7fffffffu) {
    set_last_error(kErrInvalidConfiguration);
    return;
  }
  size_t allowed = kDefaultDynamicSmem;
  {
    std::lock_guard<std::mutex> lock(g_optin_mutex);
    auto it = optin_table().find(spec.kernel_id);
    if (it != optin_table().end()) allowed = static_cast<size_t>(it->second);
  }
  if (spec.dynamic_smem > allowed || spec.dynamic_smem > kMaxDynamicSmem) {
    set_last_error(kErrInvalidValue);
    return;
  }
  if (t_block != nullptr && t_block->current != nullptr) {
    throw KernelError("tfkernels emu: a kernel launched another kernel");
  }
  std::lock_guard<std::mutex> launch_lock(g_launch_mutex);

  static thread_local std::vector<KernelThread> pool;
  if (pool.size() < threads) pool = std::vector<KernelThread>(threads);

  Block b;
  b.spec = &spec;
  b.threads = static_cast<int>(threads);
  b.warps = static_cast<int>((threads + 31) / 32);
  b.pool = &pool;
  b.stats = &stats_for(spec.kernel_name);
  b.stats->launches++;
  uint64_t rng = cfg.seed * 0x9E3779B97F4A7C15ull + 1;

  std::vector<FiberStart> starts(threads);
  const uint64_t nblocks = uint64_t(spec.grid.x) * spec.grid.y * spec.grid.z;
  t_block = &b;
  struct Reset {
    ~Reset() { t_block = nullptr; }
  } reset;
  for (uint64_t n = 0; n < nblocks; ++n) {
    // Random schedules also visit the blocks in a random order.
    const uint64_t bid = cfg.schedule == Schedule::kRandom ? (n * 0x9E3779B1ull + (rng & 0xffff)) % nblocks : n;
    b.block_idx = {static_cast<unsigned>(bid % spec.grid.x), static_cast<unsigned>((bid / spec.grid.x) % spec.grid.y),
                   static_cast<unsigned>(bid / (uint64_t(spec.grid.x) * spec.grid.y))};
    b.live = b.threads;
    b.at_barrier = 0;
    b.predicate_count[0] = b.predicate_count[1] = 0;
    b.error.clear();
    for (int w = 0; w < b.warps; ++w) {
      WarpState& ws = b.warp_state[w];
      ws = WarpState();
      ws.lanes = std::min(32, b.threads - w * 32);
      ws.full_mask = ws.lanes == 32 ? 0xffffffffu : ((1u << ws.lanes) - 1u);
    }
    smem_begin_block(b, spec.dynamic_smem);
    for (int i = 0; i < b.threads; ++i) {
      KernelThread& t = pool[i];
      t.state = ThreadState::kRunnable;
      t.collective_count = 0;
      t.barrier_count = 0;
      t.open_group.clear();
      t.committed.clear();
      ThreadContext& c = t.ctx;
      c.linear_tid = i;
      c.thread_idx = {static_cast<unsigned>(i % spec.block.x), static_cast<unsigned>((i / spec.block.x) % spec.block.y),
                      static_cast<unsigned>(i / (spec.block.x * spec.block.y))};
      c.block_idx = b.block_idx;
      c.block_dim = spec.block;
      c.grid_dim = spec.grid;
      c.warp = i / 32;
      c.lane = i % 32;
      starts[i] = {&b, &t, thunk, args};
      t.fiber.reset(&fiber_entry, &starts[i], kStackBytes);
    }
    for (;;) {
      const int next = pick_next(b, cfg, rng);
      if (next < 0) break;
      b.current = &pool[next];
      pool[next].fiber.resume();
      b.current = nullptr;
      if (!b.error.empty()) break;
    }
    if (b.error.empty() && b.live > 0) b.error = deadlock_report(b);
    smem_end_block(b);
    b.stats->blocks++;
    if (!b.error.empty()) throw KernelError("tfkernels emu: " + b.error);
  }
}

}  // namespace emu
}  // namespace tfkernels
