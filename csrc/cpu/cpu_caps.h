// What the running CPU can do, for the kernels that pick a code path at run time.
#pragma once

namespace tfkernels::cpu {

// Whether the CPU has `capability`, named as in ATen's cpuinfo capabilities
// ("avx512_f", "avx512_bf16", "amx_bf16", ...). Detected once per process.
bool cpu_has(const char* capability);

// Whether the CPU is Intel's (cpuid's vendor string "GenuineIntel"): MKL, torch's
// BLAS, is tuned for them and runs its fp32 GEMMs at the FMA peak there.
bool cpu_is_intel();

// Fails with a clear error unless the CPU has `capability`: the guard of entry
// points compiled for an ISA extension, which callers reach only after asking for it
// (a CPU without it would otherwise fault on an illegal instruction).
void require_cpu(const char* capability, const char* function);

// Whether the environment variable `name` is "0": the switch tests and benchmarks
// use to force a kernel's portable path. Read on every call.
bool switched_off(const char* name);

}  // namespace tfkernels::cpu
