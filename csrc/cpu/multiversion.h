// Hot elementwise loops (exp in the softmax, GELU) are plain C++ loops that the
// compiler vectorises. Compiling them for one ISA would either leave AVX-512
// unused or crash on older CPUs, so each is cloned per ISA and the loader picks
// the best clone for the running CPU (GCC/Clang function multi-versioning).
//
// The build passes -fno-trapping-math (setup.py, CMakeLists.txt). Without it GCC 12
// keeps the selects of the clamped exp/erf (x > 127 ? 127 : x) as branches, because
// evaluating both sides could raise an FP exception flag; AVX-512 hides that behind
// masks, but the AVX2 clone then stays scalar and the softmax's exp cost as much as
// the attention GEMMs on an AVX2-only Zen 3 (perf). No code here reads the flags,
// and no result changes.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define TFK_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TFK_MULTIVERSION
#endif
