// Stackful fibers for the emulated device: a stack per kernel thread and a
// context switch that saves only what the System V ABI says a call preserves.
// x86-64 uses a hand-written switch (tens of nanoseconds); other architectures
// fall back to ucontext. AddressSanitizer is told about every stack switch.
#pragma once

#include <cstddef>

namespace tfkernels {
namespace emu {

class Fiber {
 public:
  using Entry = void (*)(void* arg);

  Fiber() = default;
  ~Fiber();
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;

  // (Re)arms the fiber to run entry(arg) on its own stack at the next resume().
  // The stack is allocated once (with a guard page below it) and reused.
  void reset(Entry entry, void* arg, size_t stack_bytes);

  // From the scheduler: runs the fiber until it calls yield() or its entry returns
  // to the trampoline (which must not happen: the entry ends with a final yield).
  void resume();
  // From inside the fiber: back to the scheduler.
  void yield();

  // First code a fresh fiber runs (called from the start trampoline).
  static void start(Fiber* self);

 private:

  void* stack_ = nullptr;  // lowest address of the mapping (guard page first)
  size_t mapped_ = 0;
  void* fiber_sp_ = nullptr;
  void* scheduler_sp_ = nullptr;
  Entry entry_ = nullptr;
  void* arg_ = nullptr;
  // AddressSanitizer bookkeeping of the two stacks.
  void* asan_fake_stack_ = nullptr;
  const void* scheduler_stack_bottom_ = nullptr;
  size_t scheduler_stack_size_ = 0;
  void* ucontext_ = nullptr;  // non-x86-64 fallback
  void* scheduler_ucontext_ = nullptr;
};

}  // namespace emu
}  // namespace tfkernels
