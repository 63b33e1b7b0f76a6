// The CUDA kernels were written and compile-checked on machines without a GPU.
// Until bench/device_check.sh has passed on an H100/H200 for a kernel family
// (tests, compute-sanitizer) and its results are committed, that family's
// launcher warns once, so nobody trains on an unvalidated kernel without knowing.
// Remove the call from a launcher in the commit that records its GPU results.
#pragma once

#include <c10/util/Exception.h>

#if defined(TFKERNELS_EMULATE)
// The emulated device is itself the verification tool: no warning there.
#define TFKERNELS_WARN_UNVERIFIED_CUDA(op) ((void)0)
#else
#define TFKERNELS_WARN_UNVERIFIED_CUDA(op)                                                              \
  TORCH_WARN_ONCE("tfkernels: the CUDA kernel of ", op,                                                 \
                  " has not yet been validated on a GPU (see the README's support matrix); compare with " \
                  "tfkernels.reference before relying on it")
#endif
