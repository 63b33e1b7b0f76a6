// Ops of the emulated-device test library that have no CUDA counterpart: the
// per-kernel counters (launches, blocks, ldmatrix bank conflicts).
#include <torch/library.h>

#include <string>

#include "emu/runtime.h"

TORCH_LIBRARY_FRAGMENT(tfkernels_emu, m) {
  m.def("emu_stats() -> str", [] { return tfkernels::emu::stats_report(); });
  m.def("emu_reset_stats() -> ()", [] { tfkernels::emu::reset_stats(); });
}
