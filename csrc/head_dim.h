// The largest attention head dim, shared by the argument checks (args.cpp) and the
// CUDA kernels (flash_params.h). Plain C++: no torch, no CUDA.
#pragma once

namespace tfkernels {

// The CUDA kernels are instantiated for padded head dims 32, 64, ..., 256.
constexpr int kMaxHeadDim = 256;

}  // namespace tfkernels
