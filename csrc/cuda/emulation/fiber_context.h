// How the CUDA emulator (emulated_device.cpp) switches between its fibers, the
// threads of one CTA. glibc's swapcontext also saves and restores the signal
// mask, one rt_sigprocmask system call per switch (millions per emulated test),
// and its whole floating-point state: without them the tests run 3x faster. On
// x86-64 a switch here saves only what the SysV ABI says a call preserves (rbx,
// rbp, r12-r15, the MXCSR and x87 control words) on the fiber's own stack and
// swaps stack pointers; elsewhere it is swapcontext.
// Included by emulated_device.cpp alone (the switch is defined here, in assembly).
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__x86_64__)

// fast_attn_emulator_switch(save, load): pushes the preserved registers, stores the
// stack pointer in *save, loads `load` as the stack pointer, pops and returns into
// what that stack holds (a fiber that switched out, or start_context's frame).
extern "C" void fast_attn_emulator_switch(void** save, void* load);

asm(R"(
  .text
  .p2align 4
  .globl fast_attn_emulator_switch
  .hidden fast_attn_emulator_switch
  .type fast_attn_emulator_switch, @function
fast_attn_emulator_switch:
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
  .size fast_attn_emulator_switch, .-fast_attn_emulator_switch
)");

namespace fast_attn::emu {

struct FiberContext {
  void* stack_pointer = nullptr;
};

// Prepares `context` to run entry() (which must never return) on the stack
// [stack, stack + bytes) at the first switch to it, with this thread's
// floating-point control words.
inline void start_context(FiberContext& context, char* stack, size_t bytes, void (*entry)()) {
  uint64_t* slot = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15});
  *--slot = 0;                                  // entry's return address (it never returns)
  *--slot = reinterpret_cast<uint64_t>(entry);  // where the switch's ret goes
  for (int i = 0; i < 6; ++i) {
    *--slot = 0;  // rbp, rbx, r12-r15
  }
  uint32_t mxcsr = 0;
  uint16_t x87_control = 0;
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(x87_control));
  *--slot = (static_cast<uint64_t>(x87_control) << 32) | mxcsr;
  context.stack_pointer = slot;
}

inline void switch_context(FiberContext& from, FiberContext& to) {
  fast_attn_emulator_switch(&from.stack_pointer, to.stack_pointer);
}

}  // namespace fast_attn::emu

#else

#include <ucontext.h>

namespace fast_attn::emu {

struct FiberContext {
  ucontext_t context;
};

inline void start_context(FiberContext& context, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&context.context);
  context.context.uc_stack.ss_sp = stack;
  context.context.uc_stack.ss_size = bytes;
  context.context.uc_link = nullptr;
  makecontext(&context.context, entry, 0);
}

inline void switch_context(FiberContext& from, FiberContext& to) { swapcontext(&from.context, &to.context); }

}  // namespace fast_attn::emu

#endif
