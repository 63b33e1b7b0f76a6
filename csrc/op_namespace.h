// The namespace the ops are defined and registered under: `tfkernels`, or
// `tfkernels_emu` in the emulated-device test library (csrc/emu/), which builds
// ops.cpp and the CUDA launchers a second time against the emulated device.
#pragma once

#include <torch/library.h>

#if defined(TFKERNELS_EMULATE)
#define TFKERNELS_OP_NAMESPACE tfkernels_emu
#else
#define TFKERNELS_OP_NAMESPACE tfkernels
#endif

// One level of indirection so that the namespace macro is expanded before
// TORCH_LIBRARY pastes it into identifiers.
#define TFKERNELS_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define TFKERNELS_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
