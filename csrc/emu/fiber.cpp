#include "emu/fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <new>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define TFK_EMU_ASAN 1
#else
#define TFK_EMU_ASAN 0
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace tfkernels {
namespace emu {

#if defined(__x86_64__)
// switch_stack(&save_sp, next_sp): pushes the callee-saved registers and the
// MXCSR / x87 control words, saves rsp, loads next_sp and pops the same frame.
extern "C" void tfk_emu_switch_stack(void** save_sp, void* next_sp);
// First frame of a new fiber: `ret` lands here with the Fiber* in r12.
extern "C" void tfk_emu_fiber_start();
asm(R"(
  .text
  .globl tfk_emu_switch_stack
  .type tfk_emu_switch_stack, @function
tfk_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size tfk_emu_switch_stack, .-tfk_emu_switch_stack

  .globl tfk_emu_fiber_start
  .type tfk_emu_fiber_start, @function
tfk_emu_fiber_start:
  movq %r12, %rdi
  call tfk_emu_fiber_main
  ud2
  .size tfk_emu_fiber_start, .-tfk_emu_fiber_start
)");
#endif

extern "C" void tfk_emu_fiber_main(Fiber* self);

Fiber::~Fiber() {
  if (stack_ != nullptr) munmap(stack_, mapped_);
#if !defined(__x86_64__)
  delete static_cast<ucontext_t*>(ucontext_);
  delete static_cast<ucontext_t*>(scheduler_ucontext_);
#endif
}

void Fiber::reset(Entry entry, void* arg, size_t stack_bytes) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t want = ((stack_bytes + page - 1) / page + 1) * page;  // + guard page
  if (stack_ == nullptr || mapped_ < want) {
    if (stack_ != nullptr) munmap(stack_, mapped_);
    void* p = mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    mprotect(p, page, PROT_NONE);  // a stack overflow faults instead of corrupting memory
    stack_ = p;
    mapped_ = want;
  }
  entry_ = entry;
  arg_ = arg;
  char* top = static_cast<char*>(stack_) + mapped_;
#if defined(__x86_64__)
  // The frame tfk_emu_switch_stack pops: control words, r15, r14, r13, r12 (=this),
  // rbx, rbp, then the return address. After the `ret`, rsp is 16-byte aligned,
  // so the `call` in tfk_emu_fiber_start enters with the ABI's alignment.
  uint64_t* sp = reinterpret_cast<uint64_t*>(top) - 2;  // 16 bytes of slack, keeps alignment
  *--sp = reinterpret_cast<uint64_t>(&tfk_emu_fiber_start);
  *--sp = 0;                                  // rbp
  *--sp = 0;                                  // rbx
  *--sp = reinterpret_cast<uint64_t>(this);   // r12
  *--sp = 0;                                  // r13
  *--sp = 0;                                  // r14
  *--sp = 0;                                  // r15
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  fiber_sp_ = sp;
#else
  if (ucontext_ == nullptr) {
    ucontext_ = new ucontext_t;
    scheduler_ucontext_ = new ucontext_t;
  }
  auto* uc = static_cast<ucontext_t*>(ucontext_);
  getcontext(uc);
  uc->uc_stack.ss_sp = static_cast<char*>(stack_) + page;
  uc->uc_stack.ss_size = mapped_ - page;
  uc->uc_link = nullptr;
  makecontext(uc, reinterpret_cast<void (*)()>(&tfk_emu_fiber_main), 1, this);
#endif
  (void)top;
}

void Fiber::resume() {
#if TFK_EMU_ASAN
  void* fake = nullptr;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  __sanitizer_start_switch_fiber(&fake, static_cast<char*>(stack_) + page, mapped_ - page);
#endif
#if defined(__x86_64__)
  tfk_emu_switch_stack(&scheduler_sp_, fiber_sp_);
#else
  swapcontext(static_cast<ucontext_t*>(scheduler_ucontext_), static_cast<ucontext_t*>(ucontext_));
#endif
#if TFK_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

void Fiber::yield() {
#if TFK_EMU_ASAN
  __sanitizer_start_switch_fiber(&asan_fake_stack_, scheduler_stack_bottom_, scheduler_stack_size_);
#endif
#if defined(__x86_64__)
  tfk_emu_switch_stack(&fiber_sp_, scheduler_sp_);
#else
  swapcontext(static_cast<ucontext_t*>(ucontext_), static_cast<ucontext_t*>(scheduler_ucontext_));
#endif
#if TFK_EMU_ASAN
  __sanitizer_finish_switch_fiber(asan_fake_stack_, &scheduler_stack_bottom_, &scheduler_stack_size_);
#endif
}

void Fiber::start(Fiber* self) {
#if TFK_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &self->scheduler_stack_bottom_, &self->scheduler_stack_size_);
#endif
  self->entry_(self->arg_);
  std::abort();  // entries end with a final yield and are never resumed after it
}

extern "C" void tfk_emu_fiber_main(Fiber* self) { Fiber::start(self); }

}  // namespace emu
}  // namespace tfkernels
