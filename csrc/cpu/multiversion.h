// Hot elementwise loops (exp in the softmax, GELU) are plain C++ loops that the
// compiler vectorises. Compiling them for one ISA would either leave AVX-512
// unused or crash on older CPUs, so each is cloned per ISA and the loader picks
// the best clone for the running CPU (GCC/Clang function multi-versioning).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define TFK_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TFK_MULTIVERSION
#endif
