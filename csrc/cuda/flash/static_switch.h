// Turns runtime values into template parameters (the static_switch idiom):
//
//   TFK_HEADDIM_SWITCH(head_dim, on_missing, [&] { ... kHeadDim ... });
//
// TFK_HEADDIM_SWITCH rounds head_dim up to the next instantiated dim and calls the
// lambda with `constexpr int kHeadDim` set to it. (The dtype goes through
// cuda::dispatch_16bit, cuda/common/dtype.h.) Builds restricted with
// TFKERNELS_HEAD_DIMS (setup.py defines TFKERNELS_HEAD_DIMS_RESTRICTED=1 and
// TFKERNELS_HAS_HDIM<D>=1 for the kept dims) compile only the kept cases; any other
// dim calls on_missing(padded_dim), which should raise a clear error.
#pragma once

#include "cuda/flash/flash_params.h"

#define TFK_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                        \
    if (COND) {                                \
      constexpr static bool CONST_NAME = true; \
      return __VA_ARGS__();                    \
    } else {                                   \
      constexpr static bool CONST_NAME = false;\
      return __VA_ARGS__();                    \
    }                                          \
  }()

#if !defined(TFKERNELS_HEAD_DIMS_RESTRICTED) || defined(TFKERNELS_HAS_HDIM32)
#define TFK_HDIM_CASE_32(D, ...) if (D == 32) { constexpr static int kHeadDim = 32; return __VA_ARGS__(); }
#else
#define TFK_HDIM_CASE_32(D, ...)
#endif
#if !defined(TFKERNELS_HEAD_DIMS_RESTRICTED) || defined(TFKERNELS_HAS_HDIM64)
#define TFK_HDIM_CASE_64(D, ...) if (D == 64) { constexpr static int kHeadDim = 64; return __VA_ARGS__(); }
#else
#define TFK_HDIM_CASE_64(D, ...)
#endif
#if !defined(TFKERNELS_HEAD_DIMS_RESTRICTED) || defined(TFKERNELS_HAS_HDIM96)
#define TFK_HDIM_CASE_96(D, ...) if (D == 96) { constexpr static int kHeadDim = 96; return __VA_ARGS__(); }
#else
#define TFK_HDIM_CASE_96(D, ...)
#endif
#if !defined(TFKERNELS_HEAD_DIMS_RESTRICTED) || defined(TFKERNELS_HAS_HDIM128)
#define TFK_HDIM_CASE_128(D, ...) if (D == 128) { constexpr static int kHeadDim = 128; return __VA_ARGS__(); }
#else
#define TFK_HDIM_CASE_128(D, ...)
#endif
#if !defined(TFKERNELS_HEAD_DIMS_RESTRICTED) || defined(TFKERNELS_HAS_HDIM160)
#define TFK_HDIM_CASE_160(D, ...) if (D == 160) { constexpr static int kHeadDim = 160; return __VA_ARGS__(); }
#else
#define TFK_HDIM_CASE_160(D, ...)
#endif
#if !defined(TFKERNELS_HEAD_DIMS_RESTRICTED) || defined(TFKERNELS_HAS_HDIM192)
#define TFK_HDIM_CASE_192(D, ...) if (D == 192) { constexpr static int kHeadDim = 192; return __VA_ARGS__(); }
#else
#define TFK_HDIM_CASE_192(D, ...)
#endif
#if !defined(TFKERNELS_HEAD_DIMS_RESTRICTED) || defined(TFKERNELS_HAS_HDIM224)
#define TFK_HDIM_CASE_224(D, ...) if (D == 224) { constexpr static int kHeadDim = 224; return __VA_ARGS__(); }
#else
#define TFK_HDIM_CASE_224(D, ...)
#endif
#if !defined(TFKERNELS_HEAD_DIMS_RESTRICTED) || defined(TFKERNELS_HAS_HDIM256)
#define TFK_HDIM_CASE_256(D, ...) if (D == 256) { constexpr static int kHeadDim = 256; return __VA_ARGS__(); }
#else
#define TFK_HDIM_CASE_256(D, ...)
#endif

#define TFK_HEADDIM_SWITCH(HEADDIM, ON_MISSING, ...)                         \
  [&] {                                                                      \
    const int tfk_padded_dim = ::tfkernels::flash::padded_head_dim(HEADDIM); \
    TFK_HDIM_CASE_32(tfk_padded_dim, __VA_ARGS__)                            \
    TFK_HDIM_CASE_64(tfk_padded_dim, __VA_ARGS__)                            \
    TFK_HDIM_CASE_96(tfk_padded_dim, __VA_ARGS__)                            \
    TFK_HDIM_CASE_128(tfk_padded_dim, __VA_ARGS__)                           \
    TFK_HDIM_CASE_160(tfk_padded_dim, __VA_ARGS__)                           \
    TFK_HDIM_CASE_192(tfk_padded_dim, __VA_ARGS__)                           \
    TFK_HDIM_CASE_224(tfk_padded_dim, __VA_ARGS__)                           \
    TFK_HDIM_CASE_256(tfk_padded_dim, __VA_ARGS__)                           \
    return ON_MISSING(tfk_padded_dim);                                       \
  }()
