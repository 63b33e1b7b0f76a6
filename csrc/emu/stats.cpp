// Per-kernel counters of the emulated device: launches, blocks and the
// shared-memory wavefronts of ldmatrix against the conflict-free count. This is a
// performance proxy: the padded and swizzled tile layouts claim zero conflicts.
#include <map>
#include <mutex>
#include <sstream>

#include "emu/engine.h"

namespace tfkernels {
namespace emu {
namespace {
std::mutex g_stats_mutex;
std::map<std::string, KernelStats>& table() {
  static std::map<std::string, KernelStats> t;
  return t;
}
}  // namespace

KernelStats& stats_for(const char* kernel_name) {
  std::lock_guard<std::mutex> lock(g_stats_mutex);
  return table()[kernel_name];  // std::map: references stay valid
}

// One line per kernel: name, launches, blocks, ldmatrix matrices, wavefronts,
// and the wavefronts beyond one per matrix (the bank conflicts). Tab-separated.
std::string stats_report() {
  std::lock_guard<std::mutex> lock(g_stats_mutex);
  std::ostringstream os;
  os << "kernel\tlaunches\tblocks\tldmatrix_matrices\tldmatrix_wavefronts\tldmatrix_conflicts\n";
  for (const auto& [name, s] : table()) {
    os << name << "\t" << s.launches << "\t" << s.blocks << "\t" << s.ldmatrix_matrices << "\t"
       << s.ldmatrix_wavefronts << "\t" << (s.ldmatrix_wavefronts - s.ldmatrix_matrices) << "\n";
  }
  return os.str();
}

void reset_stats() {
  std::lock_guard<std::mutex> lock(g_stats_mutex);
  for (auto& [name, s] : table()) s = KernelStats{};
}

}  // namespace emu
}  // namespace tfkernels
