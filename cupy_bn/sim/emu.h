// emu.h: run CUDA C kernels on the CPU (the runtime behind cupy_bn.sim).
//
// This file: keywords, the scheduler, guarded memory, faults, launches and race mode;
// emu_device.h: the device API; emu_elementwise.h: ElementwiseKernel's array views.
//
// The loader (cupy_bn/sim/build.py) compiles the unchanged kernel source with g++ after this
// header. Every CUDA thread of a block is a cooperative fiber; the blocks of a grid run one
// after another. A fiber runs until it reaches __syncthreads, a warp intrinsic or its end, so
// the simulator switches threads only at synchronization points, in an order chosen by the
// launch's schedule (forward, reverse or seeded random). Everything the CUDA programming model
// leaves undefined and the simulator can see (barriers reached by part of a block, warp
// intrinsics whose mask names threads that never arrive, out-of-bounds accesses) stops the
// launch with a message naming the block, the thread and the source line.
//
// Build modes:
//   default       in-process shared library, x86-64 context switch, guard pages, signals
//   EMU_UCONTEXT  portable context switch (swapcontext; about 8x slower)
//   EMU_TSAN      executable for race mode: -fsanitize=thread, one OS thread per block,
//                 fibers announced to ThreadSanitizer, barriers annotated as synchronization
#pragma once

#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>
#include <dlfcn.h>

#include <cassert>
#include <cmath>
#include <new>
#include <type_traits>
#include <utility>

#ifdef EMU_TSAN
#include <pthread.h>
#include <sanitizer/tsan_interface.h>
#include <linux/futex.h>
#include <sys/syscall.h>
// Emulator bookkeeping runs on the fibers but is not part of the kernel: keep it out of
// ThreadSanitizer's view (and out of line, or GCC would inline it into instrumented code).
#define EMU_INTERNAL __attribute__((no_sanitize_thread, noinline))
#define EMU_PER_BLOCK thread_local  // race mode: every block runs on its own OS thread
#else
#define EMU_INTERNAL
#define EMU_PER_BLOCK
#endif

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))
#define EMU_ABI_VERSION 1
#define __CUPY_BN_SIM__ 1  // lets a kernel know it runs in the simulator

// ------------------------------------------------------------------------------ keywords
// Defined before the CUDA headers, whose crt/host_defines.h keeps existing definitions.
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __grid_constant__
#ifdef EMU_TSAN
// Fresh memory for every block (blocks run on their own threads), in a section of its own
// that the block's thread fills with poison before its threads start.
#define __shared__ static thread_local __attribute__((section("emu_tsmem")))
#else
// One instance per module, reused by the blocks that run one after another. The section
// lets the runtime poison static shared memory before every block (template functions'
// statics ignore the section; the loader finds those in the symbol table instead).
#define __shared__ static __attribute__((section("emu_smem")))
#endif

#include <vector_types.h>  // uint3, dim3, float4, ... (host definitions from the CUDA headers)

#ifndef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#endif
#ifndef __noinline__
#define __noinline__ __attribute__((noinline))
#endif
#ifndef __align__
#define __align__(n) __attribute__((aligned(n)))
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

static constexpr int warpSize = 32;

// Built-in variables are plain globals (CUDA headers use these names as parameters, so no
// macros). The scheduler stores the running fiber's index into threadIdx on every switch.
inline EMU_PER_BLOCK uint3 threadIdx;
inline EMU_PER_BLOCK uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace emu {

// ------------------------------------------------------------- interface with Python
// Layouts are mirrored by ctypes structures in cupy_bn/sim/launch.py.
struct Region {       // host memory the kernel sees through a guarded copy
  void* host;         // where the bytes come from and go back to
  uint64_t nbytes;
  uint64_t align;     // the copy starts at an address that is a multiple of this
  int32_t writeable;  // copy back after the launch (else: check it was not written)
  int32_t written;    // out: a read-only region was modified
  void* sim;          // out: address of the guarded copy (the kernel's pointer)
};

struct Launch {
  uint32_t grid[3];
  uint32_t block[3];
  uint64_t shared_mem;
  uint64_t max_dyn_smem;
  int32_t schedule;  // 0 forward, 1 reverse, 2 random
  uint32_t seed;
  int32_t stack_kb;
  int32_t guard;     // 0: the kernel gets the host pointers themselves; else bit 1: copies
                     // start at a guard page (else: end at one), bits 8-15: poison byte
  double timeout_s;  // 0: none
  int32_t nargs;
  int32_t nregions;
  void** args;                 // per argument: pointer to its bytes
  const int32_t* arg_region;   // per argument: region of a pointer argument, or -1
  const uint64_t* arg_offset;  // per argument: byte offset of the pointer in its region
  Region* regions;
  char* log;                   // out: diagnostics, NUL-terminated
  uint64_t log_cap;
  uint64_t switches;           // out: fiber switches
  uint64_t fault_pc;           // out: faulting instruction, offset in this module (0: none)
  int32_t fault_region;        // out: region whose guard page was hit, or -1
  int32_t fault_write;         // out: 1 write, 0 read, -1 unknown
  int64_t fault_offset;        // out: byte offset of the access from the region's start
};

enum Result : int { OK = 0, FAILED = 1, FAULT = 2, TIMEOUT = 3 };
enum Schedule : int { FORWARD = 0, REVERSE = 1, RANDOM = 2 };
enum State : uint8_t { READY, RUNNING, AT_BARRIER, IN_WARP_OP, DONE };

enum Op : int {
  OP_SHFL_IDX, OP_SHFL_UP, OP_SHFL_DOWN, OP_SHFL_XOR, OP_BALLOT, OP_ANY, OP_ALL, OP_UNI,
  OP_SYNCWARP, OP_MATCH_ANY, OP_MATCH_ALL, OP_REDUCE_ADD, OP_REDUCE_MIN, OP_REDUCE_MAX,
  OP_REDUCE_AND, OP_REDUCE_OR, OP_REDUCE_XOR, OP_COUNT
};
inline const char* const op_names[OP_COUNT] = {
  "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync", "__ballot_sync",
  "__any_sync", "__all_sync", "__uni_sync", "__syncwarp", "__match_any_sync",
  "__match_all_sync", "__reduce_add_sync", "__reduce_min_sync", "__reduce_max_sync",
  "__reduce_and_sync", "__reduce_or_sync", "__reduce_xor_sync"};

struct Fiber {
  void* sp;
  uint3 tid;
  uint32_t index, warp, lane;
  State state;
  // where it waits (barrier or warp operation)
  int line;
  const char* file;
  // warp operation in flight: its operands and, once complete, its result
  int op;
  uint32_t mask;
  int32_t src, width;
  uint64_t value;
  uint64_t result;
  int32_t flag;  // __match_all_sync predicate
  int group;
#ifdef EMU_UCONTEXT
  ucontext_t uc;
#endif
#ifdef EMU_TSAN
  void* tsan_fiber;
  void* tsan_sync;  // synchronization object of the __syncwarp this lane takes part in
  bool fenced;      // has called __threadfence: its atomics release
#endif
};

// Lanes that called the same warp intrinsic with the same mask (PTX: "same qualifiers and
// same membermask") form a group that completes once every non-exited lane of the mask is in.
struct Group {
  bool used;
  int op;
  uint32_t mask, arrived;
  int line;
  const char* file;
#ifdef EMU_TSAN
  void* tsan_sync;
#endif
};

struct Warp {
  uint32_t exist;  // lanes that exist (a block's last warp may be partial)
  uint32_t live;   // lanes that exist and have not exited
  int n_groups;    // groups in use
  Group groups[32];
};

// ------------------------------------------------------------------------ state
constexpr int kMaxThreads = 1024;
constexpr size_t kPage = 4096;
constexpr size_t kMaxDynSmem = 227 * 1024;  // largest opt-in dynamic shared memory (sm_90)
constexpr size_t kDynArea = (kMaxDynSmem + kPage - 1) / kPage * kPage;

inline Launch* L = nullptr;
inline char own_log[16384];
inline char* log_buf = own_log;
inline uint64_t log_cap = sizeof own_log, log_len = 0;
inline int log_count = 0;

inline EMU_PER_BLOCK Fiber* cur = nullptr;
inline EMU_PER_BLOCK Fiber* fibers = nullptr;
inline EMU_PER_BLOCK Warp* warps = nullptr;
inline EMU_PER_BLOCK int n_threads = 0, n_live = 0, n_at_barrier = 0;
inline EMU_PER_BLOCK int barrier_line = 0;
inline EMU_PER_BLOCK const char* barrier_file = nullptr;
inline EMU_PER_BLOCK int barrier_acc[3], barrier_res[3];  // __syncthreads_count/_and/_or
inline EMU_PER_BLOCK uint32_t barrier_gen = 0;
inline EMU_PER_BLOCK void* sched_sp = nullptr;
#ifdef EMU_UCONTEXT
inline EMU_PER_BLOCK ucontext_t sched_uc;
#endif
inline EMU_PER_BLOCK uint64_t ready[kMaxThreads / 64];
inline EMU_PER_BLOCK int n_ready = 0;
inline EMU_PER_BLOCK char* stack_base = nullptr;
inline EMU_PER_BLOCK size_t stack_bytes = 0, stack_stride = 0, stack_count = 0;
inline EMU_PER_BLOCK unsigned char* dyn_base = nullptr;  // mapping, guard page at its end
inline EMU_PER_BLOCK unsigned char* g_dyn_smem = nullptr;  // what `extern __shared__ x[]` is
inline EMU_PER_BLOCK uint64_t switches = 0;

inline int schedule = FORWARD;
inline unsigned char poison_byte = 0xFF;  // fills shared memory and the bytes around arrays
inline bool guard_at_start = false;       // array copies start (not end) at a guard page
inline uint64_t rng_state = 0;
inline uint64_t dyn_smem_bytes = 0;
inline size_t stack_kb = 64;
inline const uint64_t* static_smem = nullptr;  // (module offset, size) pairs poisoned per block
inline uint64_t n_static_smem = 0;
inline uintptr_t static_smem_base = 0;

inline sigjmp_buf abort_jmp;
inline double watchdog_s = 0;  // the running launch's timeout
inline volatile sig_atomic_t in_kernel = 0;
inline volatile int fault_sig = 0, fault_code = 0, fault_write = -1;
inline void* volatile fault_addr = nullptr;
inline volatile uintptr_t fault_pc = 0;

#ifdef EMU_TSAN
inline EMU_PER_BLOCK void* tsan_sched_fiber = nullptr;
inline EMU_PER_BLOCK char tsan_barrier[2];
inline EMU_PER_BLOCK char* tsan_sync_pool = nullptr;  // fresh addresses for __syncwarp groups
inline EMU_PER_BLOCK size_t tsan_sync_next = 0;
inline char tsan_kernel_end;  // every thread releases it when it exits; the host acquires it
constexpr int kAtomicAddrs = 256;
inline EMU_PER_BLOCK const void* atomic_addrs[kAtomicAddrs];  // touched by this block's atomics
inline EMU_PER_BLOCK int n_atomic_addrs = 0;
constexpr size_t kSyncPool = size_t(1) << 20;
#endif

// ------------------------------------------------------------------ diagnostics
EMU_INTERNAL inline void log_vappend(const char* fmt, va_list ap) {
  if (log_len + 1 >= log_cap) return;
  int n = vsnprintf(log_buf + log_len, log_cap - log_len, fmt, ap);
  if (n > 0) log_len = (log_len + uint64_t(n) < log_cap) ? log_len + uint64_t(n) : log_cap - 1;
}

__attribute__((format(printf, 1, 2))) EMU_INTERNAL inline void log_append(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  log_vappend(fmt, ap);
  va_end(ap);
}

EMU_INTERNAL inline void log_where(const Fiber* f) {
  if (!L) return;  // an elementwise loop has no blocks or threads
  if (f)
    log_append(" [block (%u,%u,%u) thread (%u,%u,%u)]", ::blockIdx.x, ::blockIdx.y, ::blockIdx.z,
               f->tid.x, f->tid.y, f->tid.z);
  else
    log_append(" [block (%u,%u,%u)]", ::blockIdx.x, ::blockIdx.y, ::blockIdx.z);
}

// A note that does not stop the launch (shown to Python as a SimulationWarning).
__attribute__((format(printf, 1, 2))) EMU_INTERNAL inline void note(const char* fmt, ...) {
  if (++log_count > 20) return;
  log_append("NOTE: ");
  va_list ap;
  va_start(ap, fmt);
  log_vappend(fmt, ap);
  va_end(ap);
  log_append("\n");
}

[[noreturn]] inline void abort_launch(int rc);

// Stops the launch: a message naming the thread `f` (or the block only, when null).
[[noreturn]] __attribute__((format(printf, 2, 3))) EMU_INTERNAL inline void fail_at(
    const Fiber* f, const char* fmt, ...) {
  log_append("ERROR: ");
  va_list ap;
  va_start(ap, fmt);
  log_vappend(fmt, ap);
  va_end(ap);
  log_where(f);
  log_append("\n");
  abort_launch(FAILED);
}

EMU_INTERNAL inline const char* lane_list(uint32_t m, char* buf, size_t cap) {
  // "0-15,17" style list of lanes in a mask
  size_t n = 0;
  buf[0] = 0;
  for (int i = 0; i < 32 && n + 8 < cap;) {
    if (!(m >> i & 1)) { ++i; continue; }
    int j = i;
    while (j + 1 < 32 && (m >> (j + 1) & 1)) ++j;
    n += size_t(snprintf(buf + n, cap - n, n ? ",%d" : "%d", i));
    if (j > i) n += size_t(snprintf(buf + n, cap - n, "-%d", j));
    i = j + 1;
  }
  return buf;
}

// -------------------------------------------------------------------- random
EMU_INTERNAL inline uint64_t next_random() {  // splitmix64
  uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// ----------------------------------------------------------------- ready set
EMU_INTERNAL inline void make_ready(Fiber* f) {
  f->state = READY;
  ready[f->index >> 6] |= uint64_t(1) << (f->index & 63);
  ++n_ready;
}

// The next fiber to run: lowest index (forward), highest (reverse) or a random one.
EMU_INTERNAL inline int pick_ready() {
  if (n_ready == 0) return -1;
  const int words = (n_threads + 63) >> 6;
  int idx = -1;
  if (schedule == FORWARD) {
    for (int w = 0; w < words; ++w)
      if (ready[w]) { idx = w * 64 + __builtin_ctzll(ready[w]); break; }
  } else if (schedule == REVERSE) {
    for (int w = words - 1; w >= 0; --w)
      if (ready[w]) { idx = w * 64 + 63 - __builtin_clzll(ready[w]); break; }
  } else {
    int k = int(next_random() % uint64_t(n_ready));
    for (int w = 0; w < words; ++w) {
      int c = __builtin_popcountll(ready[w]);
      if (k >= c) { k -= c; continue; }
      uint64_t m = ready[w];
      while (k--) m &= m - 1;
      idx = w * 64 + __builtin_ctzll(m);
      break;
    }
  }
  ready[idx >> 6] &= ~(uint64_t(1) << (idx & 63));
  --n_ready;
  return idx;
}

// ------------------------------------------------------------ context switch
#if !defined(EMU_UCONTEXT)
#if !defined(__x86_64__)
#error "the fast context switch is x86-64 only: build with -DEMU_UCONTEXT"
#endif
// Saves callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer in *save_sp and continues on new_sp.
extern "C" void emu_ctx_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.p2align 4
.globl emu_ctx_switch
.hidden emu_ctx_switch
.type emu_ctx_switch,@function
emu_ctx_switch:
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
.size emu_ctx_switch, .-emu_ctx_switch
)");
#endif

[[noreturn]] inline void fiber_entry();

EMU_INTERNAL inline void to_scheduler() {  // on a fiber
  ++switches;
#ifdef EMU_TSAN
  // no happens-before from a thread to the scheduler, so none between threads through it
  __tsan_switch_to_fiber(tsan_sched_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef EMU_UCONTEXT
  swapcontext(&cur->uc, &sched_uc);
#else
  emu_ctx_switch(&cur->sp, sched_sp);
#endif
}

EMU_INTERNAL inline void resume(Fiber* f) {  // on the scheduler
  cur = f;
  f->state = RUNNING;
  ::threadIdx = f->tid;
  ++switches;
#ifdef EMU_TSAN
  __tsan_switch_to_fiber(f->tsan_fiber, 0);
#endif
#ifdef EMU_UCONTEXT
  swapcontext(&sched_uc, &f->uc);
#else
  emu_ctx_switch(&sched_sp, f->sp);
#endif
  cur = nullptr;
}

EMU_INTERNAL inline void init_fiber(Fiber& f, size_t idx) {
  char* lo = stack_base + idx * stack_stride + kPage;  // guard page below each stack
  char* top = lo + stack_bytes;
#ifdef EMU_UCONTEXT
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = lo;
  f.uc.uc_stack.ss_size = stack_bytes;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, (void (*)())fiber_entry, 0);
#else
  (void)lo;
  uint64_t* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15));
  *--sp = 0;                                          // fake return address of fiber_entry
  *--sp = reinterpret_cast<uint64_t>(&fiber_entry);   // popped by `ret`
  for (int i = 0; i < 6; ++i) *--sp = 0;              // rbp rbx r12-r15
  *--sp = 0x1F80ull | (0x037Full << 32);              // default MXCSR and x87 control word
  f.sp = sp;
#endif
}

// ------------------------------------------------------------------ memory
EMU_INTERNAL inline void* map_or_die(size_t bytes, int flags = 0) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | flags, -1, 0);
  if (p == MAP_FAILED) {
    perror("cupy_bn.sim: mmap");
    abort();
  }
  return p;
}

EMU_INTERNAL inline void ensure_stacks(size_t n) {
  const size_t want = (stack_kb * 1024 + kPage - 1) / kPage * kPage;
  if (stack_base && stack_count >= n && stack_bytes == want) return;
  if (stack_base) munmap(stack_base, stack_stride * stack_count);
  stack_bytes = want;
  stack_stride = want + kPage;
  stack_count = n;
  stack_base = static_cast<char*>(map_or_die(stack_stride * n, MAP_NORESERVE));
  for (size_t i = 0; i < n; ++i) mprotect(stack_base + i * stack_stride, kPage, PROT_NONE);
}

EMU_INTERNAL inline void release_stacks() {
  if (stack_base) munmap(stack_base, stack_stride * stack_count);
  stack_base = nullptr;
  stack_count = 0;
}

// Dynamic shared memory ends exactly at a guard page, so that overruns fault.
EMU_INTERNAL inline void ensure_dyn_smem() {
  if (!dyn_base) {
    dyn_base = static_cast<unsigned char*>(map_or_die(kDynArea + kPage));
    mprotect(dyn_base + kDynArea, kPage, PROT_NONE);
  }
  g_dyn_smem = dyn_base + kDynArea - ((dyn_smem_bytes + 15) & ~uint64_t(15));
}

EMU_INTERNAL inline void release_dyn_smem() {
  if (dyn_base) munmap(dyn_base, kDynArea + kPage);
  dyn_base = nullptr;
}

// ---------------------------------------------------------------- warp ops
EMU_INTERNAL inline uint64_t poison_bits(size_t size) {
  // quiet NaN for float/double, a large value for integers
  return size == 8 ? 0x7FF8DEADDEADDEADull : size == 4 ? 0x7FC0DEADull : 0x7E00ull;
}

EMU_INTERNAL inline const char* lane_state(const Warp& W, int lane) {
  if (!(W.exist >> lane & 1)) return "does not exist";
  const Fiber& f = fibers[(&W - warps) * 32 + lane];
  switch (f.state) {
    case DONE: return "has exited";
    case AT_BARRIER: return "waits at __syncthreads";
    case IN_WARP_OP: return "waits in another warp intrinsic";
    default: return "is running";
  }
}

// Source lane of a shuffle (PTX shfl.sync, with c = ((32 - width) << 8) | clamp).
EMU_INTERNAL inline int shfl_source(int op, uint32_t lane, int32_t b, int32_t width) {
  const uint32_t segmask = uint32_t(32 - width) & 31;
  const uint32_t cval = op == OP_SHFL_UP ? 0 : 31;
  const uint32_t max_lane = (lane & segmask) | (cval & ~segmask);
  const uint32_t min_lane = lane & segmask;
  const uint32_t bv = uint32_t(b) & 31;
  int j;
  bool in_range;
  switch (op) {
    case OP_SHFL_UP: j = int(lane) - int(bv); in_range = j >= int(max_lane); break;
    case OP_SHFL_DOWN: j = int(lane + bv); in_range = j <= int(max_lane); break;
    case OP_SHFL_XOR: j = int(lane ^ bv); in_range = j <= int(max_lane); break;
    default: j = int(min_lane | (bv & ~segmask)); in_range = j <= int(max_lane); break;
  }
  return in_range ? j : int(lane);
}

EMU_INTERNAL inline void complete_group(Warp& W, int gi, size_t value_size) {
  Group& g = W.groups[gi];
  Fiber* lanes = fibers + (&W - warps) * 32;
  const uint32_t in = g.arrived;
  uint64_t acc = 0;
  if (g.op == OP_BALLOT || g.op == OP_ANY || g.op == OP_ALL || g.op == OP_UNI) {
    for (uint32_t m = in; m; m &= m - 1) {
      const int l = __builtin_ctz(m);
      if (lanes[l].value) acc |= 1u << l;
    }
  } else if (g.op >= OP_REDUCE_ADD) {
    bool first = true;
    for (uint32_t m = in; m; m &= m - 1) {
      const uint64_t v = lanes[__builtin_ctz(m)].value;
      const bool is_signed = lanes[__builtin_ctz(m)].flag != 0;
      if (first) { acc = v; first = false; continue; }
      switch (g.op) {
        case OP_REDUCE_ADD: acc = uint32_t(acc + v); break;
        case OP_REDUCE_MIN:
          acc = is_signed ? (int32_t(v) < int32_t(acc) ? v : acc) : (uint32_t(v) < uint32_t(acc) ? v : acc);
          break;
        case OP_REDUCE_MAX:
          acc = is_signed ? (int32_t(v) > int32_t(acc) ? v : acc) : (uint32_t(v) > uint32_t(acc) ? v : acc);
          break;
        case OP_REDUCE_AND: acc &= v; break;
        case OP_REDUCE_OR: acc |= v; break;
        default: acc ^= v; break;
      }
    }
  }
  for (uint32_t m = in; m; m &= m - 1) {
    const int l = __builtin_ctz(m);
    Fiber& f = lanes[l];
    switch (g.op) {
      case OP_SHFL_IDX: case OP_SHFL_UP: case OP_SHFL_DOWN: case OP_SHFL_XOR: {
        const int j = shfl_source(g.op, uint32_t(l), f.src, f.width);
        if (in >> j & 1) {
          f.result = lanes[j].value;
        } else if (!(W.exist >> j & 1)) {
          // A lane past the end of a partial warp: PTX leaves the value undefined (not the
          // program), and guarded code discards it. Poison shows up where it is used.
          f.result = poison_bits(value_size);
        } else if (!(W.live >> j & 1)) {
          // The value of a lane that has exited is undefined: a wrong shuffle offset or an
          // early return.
          fail_at(&f, "%s at %s:%d (mask 0x%08x) reads lane %d, which %s: its value is "
                  "undefined", op_names[g.op], g.file, g.line, g.mask, j, lane_state(W, j));
        } else {
          f.result = poison_bits(value_size);  // a live lane outside the group: undefined
        }
        break;
      }
      case OP_BALLOT: f.result = acc; break;
      case OP_ANY: f.result = acc != 0; break;
      case OP_ALL: f.result = acc == in; break;
      case OP_UNI: f.result = acc == in || acc == 0; break;
      case OP_MATCH_ANY: {
        uint32_t r = 0;
        for (uint32_t k = in; k; k &= k - 1)
          if (lanes[__builtin_ctz(k)].value == f.value) r |= 1u << __builtin_ctz(k);
        f.result = r;
        break;
      }
      case OP_MATCH_ALL: {
        bool same = true;
        for (uint32_t k = in; k; k &= k - 1) same &= lanes[__builtin_ctz(k)].value == f.value;
        f.result = same ? in : 0;
        f.flag = same;
        break;
      }
      case OP_SYNCWARP: break;
      default: f.result = acc; break;
    }
  }
  for (uint32_t m = in; m; m &= m - 1) {
    Fiber& f = lanes[__builtin_ctz(m)];
    if (&f != cur) make_ready(&f);
  }
  g.used = false;
  --W.n_groups;
}

// A lane joins (or opens) the group of its intrinsic and waits until the group completes.
EMU_INTERNAL inline uint64_t warp_op(int op, uint32_t mask, uint64_t value, size_t value_size,
                                     int32_t src, int32_t width, int32_t flag, int line,
                                     const char* file) {
  Fiber* f = cur;
  Warp& W = warps[f->warp];
  const uint32_t bit = 1u << f->lane;
  if (!(mask & bit))
    fail_at(f, "%s at %s:%d: mask 0x%08x does not name the calling lane %u", op_names[op], file,
            line, mask, f->lane);
  if ((op <= OP_SHFL_XOR) && (width <= 0 || width > 32 || (width & (width - 1))))
    fail_at(f, "%s at %s:%d: width %d is not a power of 2 in [1, 32]", op_names[op], file, line,
            width);
  int gi = -1, free_slot = -1;
  for (int i = 0, seen = 0; i < 32 && (seen < W.n_groups || free_slot < 0); ++i) {
    if (W.groups[i].used) {
      ++seen;
      if (W.groups[i].op == op && W.groups[i].mask == mask) { gi = i; break; }
    } else if (free_slot < 0) {
      free_slot = i;
    }
  }
  if (gi < 0) {
    gi = free_slot;
    ++W.n_groups;
    Group& g = W.groups[gi];
    g.used = true;
    g.op = op;
    g.mask = mask;
    g.arrived = 0;
    g.line = line;
    g.file = file;
#ifdef EMU_TSAN
    g.tsan_sync = tsan_sync_pool + (tsan_sync_next++ % kSyncPool);
#endif
  }
  Group& g = W.groups[gi];
  f->op = op;
  f->mask = mask;
  f->value = value;
  f->src = src;
  f->width = width;
  f->flag = flag;
  f->line = line;
  f->file = file;
  f->group = gi;
  g.arrived |= bit;
#ifdef EMU_TSAN
  // Only __syncwarp orders memory among the lanes (CUDA guarantees nothing for shuffles/votes).
  f->tsan_sync = op == OP_SYNCWARP ? g.tsan_sync : nullptr;
  if (f->tsan_sync) __tsan_release(f->tsan_sync);
#endif
  const uint32_t need = mask & W.live;
  if ((g.arrived & need) == need) {
    complete_group(W, gi, value_size);
    if (schedule == RANDOM) {  // let any other thread run first
      make_ready(f);
      to_scheduler();
    }
  } else {
    f->state = IN_WARP_OP;
    to_scheduler();
  }
#ifdef EMU_TSAN
  if (f->tsan_sync) __tsan_acquire(f->tsan_sync);
#endif
  return f->result;
}

// A thread that leaves for a barrier (file:line) or exits (file null) must not be awaited
// by a warp intrinsic.
EMU_INTERNAL inline void check_not_awaited(const Fiber* f, const char* file, int line) {
  const Warp& W = warps[f->warp];
  if (W.n_groups == 0) return;
  const uint32_t bit = 1u << f->lane;
  for (const Group& g : W.groups) {
    if (!g.used || !(g.mask & bit) || (g.arrived & bit)) continue;
    char lanes[128], what[160];
    if (file) snprintf(what, sizeof what, "thread reached __syncthreads at %s:%d", file, line);
    else snprintf(what, sizeof what, "thread exited");
    fail_at(f, "%s while lanes %s of its warp wait for it in %s at %s:%d (mask 0x%08x)", what,
            lane_list(g.arrived, lanes, sizeof lanes), op_names[g.op], g.file, g.line, g.mask);
  }
}

// ------------------------------------------------------------ __syncthreads
EMU_INTERNAL inline int syncthreads(int kind, int pred, int line, const char* file) {
  Fiber* f = cur;
  check_not_awaited(f, file, line);
  if (n_at_barrier == 0) {
    barrier_line = line;
    barrier_file = file;
  } else if (line != barrier_line || strcmp(file, barrier_file) != 0) {
    fail_at(f, "threads wait at different __syncthreads: %s:%d and %s:%d (a barrier in "
            "divergent code)", barrier_file, barrier_line, file, line);
  }
  f->state = AT_BARRIER;
  f->line = line;
  f->file = file;
  ++n_at_barrier;
  barrier_acc[0] += pred != 0;
  barrier_acc[1] &= pred != 0;
  barrier_acc[2] |= pred != 0;
#ifdef EMU_TSAN
  char* sync = &tsan_barrier[barrier_gen & 1];
  __tsan_release(sync);
#endif
  to_scheduler();
#ifdef EMU_TSAN
  __tsan_acquire(sync);
#endif
  return barrier_res[kind];
}

// Called when no thread can run: release the barrier, or report why the block is stuck.
EMU_INTERNAL inline void settle() {
  if (n_at_barrier == n_live) {
    if (n_live != n_threads)
      fail_at(nullptr, "__syncthreads at %s:%d reached by %d of %d threads; the other %d have "
              "exited (a return before the barrier, or a barrier in code that only some "
              "threads run)", barrier_file, barrier_line, n_live, n_threads, n_threads - n_live);
    for (int k = 0; k < 3; ++k) barrier_res[k] = barrier_acc[k];
    barrier_acc[0] = 0;
    barrier_acc[1] = 1;
    barrier_acc[2] = 0;
    n_at_barrier = 0;
    ++barrier_gen;
    for (int i = 0; i < n_threads; ++i)
      if (fibers[i].state == AT_BARRIER) make_ready(&fibers[i]);
    return;
  }
  log_append("ERROR: deadlock:");
  if (n_at_barrier)
    log_append(" %d thread(s) wait at __syncthreads (%s:%d);", n_at_barrier, barrier_file,
               barrier_line);
  const int nwarps = (n_threads + 31) / 32;
  int shown = 0;
  for (int w = 0; w < nwarps && shown < 4; ++w) {
    for (const Group& g : warps[w].groups) {
      if (!g.used || shown >= 4) continue;
      ++shown;
      char a[128], b[128];
      const uint32_t missing = g.mask & warps[w].live & ~g.arrived;
      const int m0 = missing ? __builtin_ctz(missing) : 0;
      log_append(" warp %d lanes %s wait in %s at %s:%d (mask 0x%08x) for lanes %s (lane %d %s);", w,
                 lane_list(g.arrived, a, sizeof a), op_names[g.op], g.file, g.line, g.mask,
                 lane_list(missing, b, sizeof b), m0, lane_state(warps[w], m0));
    }
  }
  log_where(nullptr);
  log_append("\n");
  abort_launch(FAILED);
}

// ----------------------------------------------------------------- blocks
inline void (*g_thunk)(void*) = nullptr;
inline void* g_thunk_ctx = nullptr;

[[noreturn]] EMU_INTERNAL inline void fiber_exit() {
  Fiber* f = cur;
  check_not_awaited(f, nullptr, 0);
#ifdef EMU_TSAN
  __tsan_release(&tsan_kernel_end);
#endif
  f->state = DONE;
  --n_live;
  warps[f->warp].live &= ~(1u << f->lane);
  to_scheduler();
  __builtin_unreachable();
}

[[noreturn]] inline void fiber_entry() {
  g_thunk(g_thunk_ctx);
  fiber_exit();
}

}  // namespace emu

#ifndef EMU_TSAN
// The linker's bounds of the static shared memory section; the anchor makes sure it exists.
extern "C" char __start_emu_smem[] __attribute__((visibility("hidden")));
extern "C" char __stop_emu_smem[] __attribute__((visibility("hidden")));
static char emu_smem_anchor __attribute__((section("emu_smem"), used));
#else
// Race mode: the bounds of the thread-local section's initialization image. A thread's own
// copy has the same layout; the anchor (found in the image by its contents) locates it.
extern "C" char __start_emu_tsmem[] __attribute__((visibility("hidden")));
extern "C" char __stop_emu_tsmem[] __attribute__((visibility("hidden")));
static thread_local uint64_t emu_tsmem_anchor[2] __attribute__((section("emu_tsmem"), used)) = {
    0x454D555F534D454Dull, 0x414E43484F523432ull};
#endif

namespace emu {

EMU_INTERNAL inline void poison_shared_memory() {
#ifndef EMU_TSAN
  memset(__start_emu_smem, poison_byte, size_t(__stop_emu_smem - __start_emu_smem));
  for (uint64_t i = 0; i < n_static_smem; ++i)
    memset(reinterpret_cast<void*>(static_smem_base + static_smem[2 * i]), poison_byte,
           static_smem[2 * i + 1]);
#else
  const size_t size = size_t(__stop_emu_tsmem - __start_emu_tsmem);
  const void* image = memmem(__start_emu_tsmem, size, emu_tsmem_anchor, sizeof emu_tsmem_anchor);
  if (image) {
    const size_t at = size_t(static_cast<const char*>(image) - __start_emu_tsmem);
    unsigned char* mine = reinterpret_cast<unsigned char*>(emu_tsmem_anchor) - at;
    memset(mine, poison_byte, at);
    memset(mine + at + sizeof emu_tsmem_anchor, poison_byte, size - at - sizeof emu_tsmem_anchor);
  }
  n_atomic_addrs = 0;
#endif
  if (dyn_smem_bytes) memset(g_dyn_smem, poison_byte, dyn_smem_bytes);
}

EMU_INTERNAL inline void run_block(size_t nthreads) {
  n_threads = int(nthreads);
  n_live = n_threads;
  n_at_barrier = 0;
  barrier_acc[0] = 0;
  barrier_acc[1] = 1;
  barrier_acc[2] = 0;
  barrier_gen = 0;
  const size_t nwarps = (nthreads + 31) / 32;
  for (size_t w = 0; w < nwarps; ++w) {
    warps[w].exist = warps[w].live = 0;
    warps[w].n_groups = 0;
    for (Group& g : warps[w].groups) g.used = false;
  }
  memset(ready, 0, sizeof ready);
  n_ready = 0;
  const uint32_t bx = ::blockDim.x, by = ::blockDim.y;
  for (size_t i = 0; i < nthreads; ++i) {
    Fiber& f = fibers[i];
    f.index = uint32_t(i);
    f.tid.x = uint32_t(i % bx);
    f.tid.y = uint32_t((i / bx) % by);
    f.tid.z = uint32_t(i / (size_t(bx) * by));
    f.warp = uint32_t(i / 32);
    f.lane = uint32_t(i % 32);
#ifdef EMU_TSAN
    f.fenced = false;
#endif
    init_fiber(f, i);
    warps[f.warp].exist |= 1u << f.lane;
    warps[f.warp].live |= 1u << f.lane;
    make_ready(&f);
  }
  poison_shared_memory();
  for (;;) {
    const int i = pick_ready();
    if (i >= 0) {
      resume(&fibers[i]);
    } else if (n_live == 0) {
      return;
    } else {
      settle();
    }
  }
}

// Block order follows the schedule too: a kernel must not depend on it.
EMU_INTERNAL inline uint3 block_at(uint64_t k, uint64_t nblocks, const uint32_t* perm_base) {
  uint64_t b = k;
  if (schedule == REVERSE) b = nblocks - 1 - k;
  else if (schedule == RANDOM) b = perm_base ? perm_base[k] : k;
  const uint64_t gx = ::gridDim.x, gy = ::gridDim.y;
  return uint3{uint32_t(b % gx), uint32_t((b / gx) % gy), uint32_t(b / (gx * gy))};
}

EMU_INTERNAL inline uint32_t* random_block_order(uint64_t nblocks) {
  if (schedule != RANDOM || nblocks > (uint64_t(1) << 26)) return nullptr;
  uint32_t* p = static_cast<uint32_t*>(malloc(nblocks * sizeof(uint32_t)));
  for (uint64_t i = 0; i < nblocks; ++i) p[i] = uint32_t(i);
  for (uint64_t i = nblocks; i > 1; --i) {
    const uint64_t j = next_random() % i;
    const uint32_t t = p[i - 1];
    p[i - 1] = p[j];
    p[j] = t;
  }
  return p;
}

// ---------------------------------------------------------- guarded memory
// Every region gets its own copy between two inaccessible gaps of kGap bytes:
// [gap] r0 [gap][gap] r1 [gap] ... The copy ends exactly at its following gap (or, with
// guard_at_start, starts exactly at its preceding one), so the first byte past that end
// faults, and so does any access up to kGap bytes further. The bytes between the copy and
// the other gap (less than a page) hold the poison byte: reads there return poison and
// writes there are found after the launch (check_redzones). The copies live in one mapping
// that is kept from launch to launch while the layout stays the same, so that repeated
// launches cost no mmap/mprotect.
constexpr size_t kGap = size_t(1) << 20;

struct Arena {
  unsigned char* base = nullptr;
  size_t bytes = 0;
  int n = -1;
  size_t spans[64] = {};
};
inline Arena arena;
constexpr size_t kKeepArenaBytes = size_t(64) << 20;

EMU_INTERNAL inline uint64_t region_align(const Region& r) { return r.align ? r.align : 1; }

// Bytes of the copy's page span, enough for either placement (see region_offset).
EMU_INTERNAL inline size_t region_span(const Region& r) {
  const uint64_t a = region_align(r);
  const uint64_t phase = reinterpret_cast<uintptr_t>(r.host) % a;
  const uint64_t pad = (a - (r.nbytes + phase) % a) % a;
  return size_t((r.nbytes + (phase > pad ? phase : pad) + kPage - 1) / kPage * kPage);
}

// Offset of the copy in its span: it keeps the host pointer's alignment (phase) modulo
// r.align, and touches the end of the span (or its start, with guard_at_start).
EMU_INTERNAL inline size_t region_offset(const Region& r) {
  const uint64_t a = region_align(r);
  const uint64_t phase = reinterpret_cast<uintptr_t>(r.host) % a;
  if (guard_at_start) return size_t(phase);
  const size_t pad = size_t((a - (r.nbytes + phase) % a) % a);
  return region_span(r) - size_t(r.nbytes) - pad;
}

EMU_INTERNAL inline void release_arena() {
  if (arena.base) munmap(arena.base, arena.bytes);
  arena = Arena();
}

EMU_INTERNAL inline bool arena_fits(const Launch* l) {
  if (!arena.base || arena.n != l->nregions) return false;
  for (int i = 0; i < l->nregions; ++i)
    if (arena.spans[i] != region_span(l->regions[i])) return false;
  return true;
}

EMU_INTERNAL inline void map_regions(Launch* l) {
  if (!l->guard) {
    for (int i = 0; i < l->nregions; ++i) l->regions[i].sim = l->regions[i].host;
    return;
  }
  if (!arena_fits(l)) {
    release_arena();
    size_t total = 0;
    for (int i = 0; i < l->nregions; ++i) total += region_span(l->regions[i]) + 2 * kGap;
    if (total == 0) total = kPage;
    void* m = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      perror("cupy_bn.sim: mmap");
      abort();
    }
    arena.base = static_cast<unsigned char*>(m);
    arena.bytes = total;
    arena.n = l->nregions <= 64 ? l->nregions : -1;
    unsigned char* p = arena.base;
    for (int i = 0; i < l->nregions; ++i) {
      const size_t span = region_span(l->regions[i]);
      if (span) mprotect(p + kGap, span, PROT_READ | PROT_WRITE);
      p += span + 2 * kGap;
      if (i < 64) arena.spans[i] = span;
    }
  }
  unsigned char* p = arena.base;
  for (int i = 0; i < l->nregions; ++i) {
    Region& r = l->regions[i];
    const size_t span = region_span(r);
    unsigned char* lo = p + kGap;
    r.sim = lo + region_offset(r);
    memset(lo, poison_byte, span);
    if (r.nbytes) memcpy(r.sim, r.host, r.nbytes);
    p += span + 2 * kGap;
  }
}

// Writes into the poisoned bytes around a copy (the other side from the gap it touches):
// out-of-bounds writes that did not fault. Reported as the first such byte.
EMU_INTERNAL inline bool check_redzones(Launch* l) {
  for (int i = 0; i < l->nregions; ++i) {
    const Region& r = l->regions[i];
    const unsigned char* s = static_cast<const unsigned char*>(r.sim);
    const unsigned char* lo = s - region_offset(r);
    const unsigned char* hi = lo + region_span(r);
    const unsigned char* bad = nullptr;
    for (const unsigned char* q = s - 1; q >= lo && !bad; --q)
      if (*q != poison_byte) bad = q;
    for (const unsigned char* q = s + r.nbytes; q < hi && !bad; ++q)
      if (*q != poison_byte) bad = q;
    if (!bad) continue;
    l->fault_region = i;
    l->fault_offset = int64_t(bad - s);
    l->fault_write = 1;
    log_append("ERROR: out-of-bounds write of global memory at byte offset %lld of region %d "
               "(%llu bytes) [found after the launch: the bytes next to the array changed; the "
               "thread is not known, check_memory=True stops at it]\n",
               (long long)(bad - s), i, (unsigned long long)r.nbytes);
    return true;
  }
  return false;
}

// Copies results back; false (with an error logged) if `check` and an out-of-bounds write
// was found.
EMU_INTERNAL inline bool unmap_regions(Launch* l, bool check) {
  if (!l->guard) return true;
  const bool clean = !check || !check_redzones(l);
  for (int i = 0; i < l->nregions; ++i) {
    Region& r = l->regions[i];
    if (!r.nbytes) continue;
    if (r.writeable) memcpy(r.host, r.sim, r.nbytes);
    else r.written = memcmp(r.host, r.sim, r.nbytes) != 0;
  }
  if (arena.bytes > kKeepArenaBytes || arena.n < 0) release_arena();
  return clean;
}

// The gap hit by a fault, as (region, byte offset from the region's start).
EMU_INTERNAL inline bool locate_guard_hit(Launch* l, uintptr_t a, int* region, int64_t* offset) {
  for (int i = 0; i < l->nregions; ++i) {
    const Region& r = l->regions[i];
    if (!r.sim) continue;
    const uintptr_t s = reinterpret_cast<uintptr_t>(r.sim);
    const uintptr_t area_start = s - region_offset(r);
    const uintptr_t area_end = area_start + region_span(r);
    if ((a >= area_end && a < area_end + kGap) || (a < area_start && a + kGap >= area_start)) {
      *region = i;
      *offset = int64_t(a - s);
      return true;
    }
  }
  return false;
}

// ------------------------------------------------------------------ faults
EMU_INTERNAL inline void describe_fault() {
  const uintptr_t a = reinterpret_cast<uintptr_t>(fault_addr);
  const uintptr_t sb = reinterpret_cast<uintptr_t>(stack_base);
  const uintptr_t dyn_end = reinterpret_cast<uintptr_t>(dyn_base) + kDynArea;
  const char* access = fault_write == 1 ? "write" : fault_write == 0 ? "read" : "access";
  log_append("ERROR: ");
  int region = -1;
  int64_t offset = 0;
  if (fault_sig == SIGALRM && !L) {
    log_append("the loop did not finish within %g s", watchdog_s);
  } else if (fault_sig == SIGALRM) {
    log_append("the kernel did not finish within %g s (a spin-wait on another thread or block? "
               "the simulator runs blocks one after another and switches threads only at "
               "__syncthreads and warp intrinsics)", watchdog_s);
  } else if (fault_sig == SIGFPE) {
    log_append("arithmetic exception (integer division by zero or overflow): the GPU returns an "
               "undefined value, the CPU traps");
  } else if (fault_sig == SIGILL) {
    log_append("illegal instruction (__trap() or unreachable code reached)");
  } else if (fault_sig == SIGABRT) {
    log_append("abort: assert() failed or abort() was called (message on stderr)");
  } else if (sb && a >= sb && a < sb + stack_stride * stack_count && (a - sb) % stack_stride < kPage) {
    log_append("thread stack overflow: local variables exceed %zu KiB (pass stack_kb= to raise "
               "it)", stack_kb);
  } else if (dyn_base && a >= dyn_end && a < dyn_end + kPage) {
    log_append("%s past the end of dynamic shared memory (shared_mem=%llu bytes)", access,
               (unsigned long long)dyn_smem_bytes);
  } else if (L && locate_guard_hit(L, a, &region, &offset)) {
    L->fault_region = region;
    L->fault_offset = offset;
    log_append("out-of-bounds %s of global memory at byte offset %lld of region %d (%llu bytes)",
               access, (long long)offset, region, (unsigned long long)L->regions[region].nbytes);
  } else if (fault_sig == SIGSEGV && fault_code == SI_KERNEL) {
    log_append("general protection fault: a misaligned vector access or a wild pointer "
               "(a copy keeps its host array's address modulo 16)");
  } else {
    log_append("illegal memory %s at address %p", access, (void*)fault_addr);
  }
  log_where(cur);
  log_append("\n");
  if (L) L->fault_write = fault_write;
}

EMU_INTERNAL inline uintptr_t module_base() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&module_base), &info) && info.dli_fbase)
    return reinterpret_cast<uintptr_t>(info.dli_fbase);
  return 0;
}

// Static shared memory outside the emu_smem section (templates' statics), found by the loader
// in the symbol table: `offsets_sizes` holds n (offset in this module, size) pairs.
EMU_INTERNAL inline void set_static_smem(const uint64_t* offsets_sizes, uint64_t n) {
  static_smem_base = module_base();
  static_smem = static_smem_base ? offsets_sizes : nullptr;
  n_static_smem = static_smem_base ? n : 0;
}

inline void on_signal(int sig, siginfo_t* si, void* ucv) {
  if (!in_kernel) {  // not ours: default action
    signal(sig, SIG_DFL);
    raise(sig);
    return;
  }
  in_kernel = 0;
  fault_sig = sig;
  fault_code = si->si_code;
  fault_addr = si->si_addr;
  fault_write = -1;
  fault_pc = 0;
#if defined(__x86_64__)
  ucontext_t* uc = static_cast<ucontext_t*>(ucv);
  fault_pc = uintptr_t(uc->uc_mcontext.gregs[REG_RIP]);
  if (sig == SIGSEGV) fault_write = (uc->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
#elif defined(__aarch64__)
  ucontext_t* uc = static_cast<ucontext_t*>(ucv);
  fault_pc = uintptr_t(uc->uc_mcontext.pc);
#else
  (void)ucv;
#endif
#ifdef EMU_TSAN
  describe_fault();
  (void)!write(1, log_buf, log_len);
  char line[160];
  const uintptr_t base = module_base();
  const int n = snprintf(line, sizeof line, "\nEMU_FAULT %d %lld %d %llu\nEMU_RC %d\n",
                         L ? L->fault_region : -1, L ? (long long)L->fault_offset : 0LL,
                         int(fault_write), (unsigned long long)(fault_pc > base ? fault_pc - base : 0),
                         sig == SIGALRM ? TIMEOUT : FAULT);
  (void)!write(1, line, size_t(n));
  _exit(0);
#else
  siglongjmp(abort_jmp, sig == SIGALRM ? TIMEOUT : FAULT);
#endif
}

// Installs the fault handlers (and the watchdog timer) for the duration of a launch, and
// puts back whatever the process had: handlers, alternate stack, a pending ITIMER_REAL.
struct SignalGuard {
  static constexpr int kSignals[6] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGALRM};
  struct sigaction old[6];
  stack_t old_stack;
  bool timer = false;
  itimerval old_timer = {};
  timespec started = {};

  EMU_INTERNAL explicit SignalGuard(double timeout_s) {
    static char altstack[64 * 1024];
    stack_t ss = {};
    ss.ss_sp = altstack;
    ss.ss_size = sizeof altstack;
    sigaltstack(&ss, &old_stack);
    struct sigaction sa = {};
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < 6; ++i) sigaction(kSignals[i], &sa, &old[i]);
    watchdog_s = timeout_s;
    if (timeout_s > 0) {
      itimerval t = {};
      t.it_value.tv_sec = time_t(timeout_s);
      t.it_value.tv_usec = suseconds_t((timeout_s - double(time_t(timeout_s))) * 1e6);
      clock_gettime(CLOCK_MONOTONIC, &started);
      setitimer(ITIMER_REAL, &t, &old_timer);
      timer = true;
    }
  }
  EMU_INTERNAL ~SignalGuard() {
    if (timer) {
      itimerval t = {};
      setitimer(ITIMER_REAL, &t, nullptr);
      if (old_timer.it_value.tv_sec || old_timer.it_value.tv_usec) {
        timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        const int64_t spent = (now.tv_sec - started.tv_sec) * 1000000 + (now.tv_nsec - started.tv_nsec) / 1000;
        int64_t left = old_timer.it_value.tv_sec * 1000000 + old_timer.it_value.tv_usec - spent;
        if (left < 1) left = 1;  // expired meanwhile: let it fire now
        old_timer.it_value.tv_sec = time_t(left / 1000000);
        old_timer.it_value.tv_usec = suseconds_t(left % 1000000);
        setitimer(ITIMER_REAL, &old_timer, nullptr);
      }
    }
    for (int i = 0; i < 6; ++i) sigaction(kSignals[i], &old[i], nullptr);
    sigaltstack(&old_stack, nullptr);
  }
};

// ---------------------------------------------------------------- launches
EMU_INTERNAL inline bool valid_config(Launch* l) {
  const uint32_t* b = l->block;
  const uint32_t* g = l->grid;
  const uint64_t nthreads = uint64_t(b[0]) * b[1] * b[2];
  if (!b[0] || !b[1] || !b[2] || nthreads > kMaxThreads || b[0] > 1024 || b[1] > 1024 || b[2] > 64) {
    log_append("ERROR: invalid block (%u,%u,%u): every dimension >= 1, x and y <= 1024, z <= 64, "
               "at most 1024 threads\n", b[0], b[1], b[2]);
    return false;
  }
  if (!g[0] || !g[1] || !g[2] || g[0] > 0x7FFFFFFFu || g[1] > 65535 || g[2] > 65535) {
    log_append("ERROR: invalid grid (%u,%u,%u): every dimension >= 1, x < 2^31, y and z <= "
               "65535\n", g[0], g[1], g[2]);
    return false;
  }
  if (l->shared_mem > l->max_dyn_smem) {
    log_append("ERROR: shared_mem=%llu bytes exceeds the kernel's dynamic shared memory limit of "
               "%llu bytes (set max_dynamic_shared_size_bytes to opt in to more)\n",
               (unsigned long long)l->shared_mem, (unsigned long long)l->max_dyn_smem);
    return false;
  }
  return true;
}

EMU_INTERNAL inline void begin_launch(Launch* l) {
  L = l;
  log_buf = l->log;
  log_cap = l->log_cap;
  log_len = 0;
  log_count = 0;
  if (log_cap) log_buf[0] = 0;
  schedule = l->schedule;
  rng_state = l->seed;
  guard_at_start = (l->guard & 2) != 0;
  poison_byte = (l->guard >> 8) & 0xFF ? (unsigned char)((l->guard >> 8) & 0xFF) : 0xFF;
  dyn_smem_bytes = l->shared_mem;
  stack_kb = size_t(l->stack_kb > 0 ? l->stack_kb : 64);
  switches = 0;
  l->switches = 0;
  l->fault_pc = 0;
  l->fault_region = -1;
  l->fault_write = -1;
  l->fault_offset = 0;
  ::gridDim = dim3(l->grid[0], l->grid[1], l->grid[2]);
  ::blockDim = dim3(l->block[0], l->block[1], l->block[2]);
}

EMU_INTERNAL inline void set_pointer_args(Launch* l) {
  for (int i = 0; i < l->nargs; ++i) {
    const int r = l->arg_region[i];
    if (r < 0) continue;
    void* p = static_cast<unsigned char*>(l->regions[r].sim) + l->arg_offset[i];
    memcpy(l->args[i], &p, sizeof p);
  }
}

EMU_INTERNAL inline void allocate_block_state(size_t nthreads) {
  if (!fibers) {
    fibers = static_cast<Fiber*>(calloc(kMaxThreads, sizeof(Fiber)));
    warps = static_cast<Warp*>(calloc(kMaxThreads / 32, sizeof(Warp)));
  }
  ensure_stacks(nthreads);
  ensure_dyn_smem();
}

#ifndef EMU_TSAN
[[noreturn]] inline void abort_launch(int rc) { siglongjmp(abort_jmp, rc); }

EMU_INTERNAL inline int run_grid(void (*thunk)(void*), void* ctx, Launch* l) {
  begin_launch(l);
  if (!valid_config(l)) return FAILED;
  g_thunk = thunk;
  g_thunk_ctx = ctx;
  const size_t nthreads = size_t(l->block[0]) * l->block[1] * l->block[2];
  allocate_block_state(nthreads);
  map_regions(l);
  set_pointer_args(l);
  const uint64_t nblocks = uint64_t(l->grid[0]) * l->grid[1] * l->grid[2];
  uint32_t* order = random_block_order(nblocks);
  int rc = OK;
  {
    SignalGuard signals(l->timeout_s);
    rc = sigsetjmp(abort_jmp, 1);
    if (rc == OK) {
      in_kernel = 1;
      for (uint64_t k = 0; k < nblocks; ++k) {
        ::blockIdx = block_at(k, nblocks, order);
        run_block(nthreads);
      }
      in_kernel = 0;
    } else {
      in_kernel = 0;
      if (rc == FAULT || rc == TIMEOUT) {
        describe_fault();
        const uintptr_t base = module_base();
        l->fault_pc = fault_pc > base ? fault_pc - base : 0;
      }
    }
  }
  cur = nullptr;
  free(order);
  if (!unmap_regions(l, rc == OK)) rc = FAILED;
  l->switches = switches;
  return rc;
}
#else
// ------------------------------------------------------------ race mode
// One OS thread per block, started only after the previous block finished but with no
// happens-before between them (the host polls a relaxed flag), so ThreadSanitizer sees the
// blocks as concurrent. Fibers switch without synchronization; __syncthreads and __syncwarp
// release and acquire, atomics are atomics, and __threadfence releases and acquires a
// process-wide object. Errors end the process: it runs one launch.
[[noreturn]] inline void abort_launch(int rc) {
  (void)!write(1, log_buf, log_len);
  char line[32];
  (void)!write(1, line, size_t(snprintf(line, sizeof line, "\nEMU_RC %d\n", rc)));
  _exit(0);
}

struct BlockJob {
  uint3 bid;
  size_t nthreads;
  int done;
  bool keep_fibers;
  void** tsan_fibers;
};

EMU_INTERNAL inline void* block_thread(void* p) {
  BlockJob* j = static_cast<BlockJob*>(p);
  ::blockIdx = j->bid;
  stack_t ss = {};  // fault handlers need a stack of their own (a thread's stack may overflow)
  ss.ss_size = 64 * 1024;
  ss.ss_sp = malloc(ss.ss_size);
  sigaltstack(&ss, nullptr);
  tsan_sched_fiber = __tsan_get_current_fiber();
  tsan_sync_pool = static_cast<char*>(map_or_die(kSyncPool, MAP_NORESERVE));
  allocate_block_state(j->nthreads);
  printf("EMU_DYN %p %p\n", (void*)g_dyn_smem, (void*)(dyn_base + kDynArea));
  for (size_t i = 0; i < j->nthreads; ++i) {
    Fiber& f = fibers[i];
    f.tsan_fiber = __tsan_create_fiber(0);
    char name[96];
    snprintf(name, sizeof name, "block (%u,%u,%u) thread (%zu,%zu,%zu)", j->bid.x, j->bid.y,
             j->bid.z, i % ::blockDim.x, (i / ::blockDim.x) % ::blockDim.y,
             i / (size_t(::blockDim.x) * ::blockDim.y));
    __tsan_set_fiber_name(f.tsan_fiber, name);
  }
  run_block(j->nthreads);
  // Fibers live until the launch ends: a destroyed fiber's slot is reused, and accesses
  // from a reused slot look ordered, which would hide races between blocks.
  for (size_t i = 0; i < j->nthreads; ++i) {
    j->tsan_fibers[i] = fibers[i].tsan_fiber;
    if (!j->keep_fibers) __tsan_destroy_fiber(fibers[i].tsan_fiber);
  }
  release_stacks();  // unmapping resets ThreadSanitizer's shadow of the stacks
  release_dyn_smem();
  free(fibers);
  free(warps);
  fibers = nullptr;
  warps = nullptr;
  munmap(tsan_sync_pool, kSyncPool);
  __atomic_store_n(&j->done, 1, __ATOMIC_RELAXED);
  syscall(SYS_futex, &j->done, FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
  return nullptr;
}

EMU_INTERNAL inline int run_grid(void (*thunk)(void*), void* ctx, Launch* l) {
  begin_launch(l);
  if (!valid_config(l)) return FAILED;
  g_thunk = thunk;
  g_thunk_ctx = ctx;
  const size_t nthreads = size_t(l->block[0]) * l->block[1] * l->block[2];
  map_regions(l);
  set_pointer_args(l);
  for (int i = 0; i < l->nregions; ++i)
    printf("EMU_REGION %d %p %llu\n", i, l->regions[i].sim, (unsigned long long)l->regions[i].nbytes);
  fflush(stdout);
  const uint64_t nblocks = uint64_t(l->grid[0]) * l->grid[1] * l->grid[2];
  const bool keep = nblocks * nthreads <= 7000;  // ThreadSanitizer's limit on live threads
  if (!keep)
    note("race mode: %llu threads in this launch (> 7000), races between blocks far apart may "
         "be missed; use a smaller grid", (unsigned long long)(nblocks * nthreads));
  uint32_t* order = random_block_order(nblocks);
  SignalGuard signals(0);
  in_kernel = 1;
  for (uint64_t k = 0; k < nblocks; ++k) {
    // jobs are never freed: freeing would add happens-before between blocks
    BlockJob* j = new BlockJob{block_at(k, nblocks, order), nthreads, 0, keep, new void*[nthreads]};
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_create(&t, &attr, block_thread, j);
    // Wait with raw futex calls, which ThreadSanitizer does not intercept: no synchronization.
    while (!__atomic_load_n(&j->done, __ATOMIC_RELAXED))
      syscall(SYS_futex, &j->done, FUTEX_WAIT_PRIVATE, 0, nullptr, nullptr, 0);
  }
  in_kernel = 0;
  __tsan_acquire(&tsan_kernel_end);  // the host sees every thread's writes after the launch
  return unmap_regions(l, true) ? OK : FAILED;
}

// The race-mode executable: reads one launch from stdin (layout in launch.py), maps the
// host memory from the file named by argv[1], runs, and prints the log and the result.
EMU_INTERNAL inline int race_main(int argc, char** argv, int (*const* launchers)(Launch*), int nkernels) {
  if (argc < 2) return 2;
  struct Header {
    uint32_t magic, version;
    int32_t kernel, nargs, nregions, schedule;
    uint32_t seed;
    int32_t stack_kb;
    uint32_t grid[3], block[3];
    uint64_t shared_mem, max_dyn_smem, arg_bytes;
  } h;
  if (fread(&h, sizeof h, 1, stdin) != 1 || h.magic != 0x454D5552u || h.version != EMU_ABI_VERSION ||
      h.kernel < 0 || h.kernel >= nkernels) {
    fprintf(stderr, "cupy_bn.sim: bad launch request\n");
    return 2;
  }
  unsigned char* argbytes = static_cast<unsigned char*>(malloc(h.arg_bytes + 1));
  uint64_t* arg_pos = static_cast<uint64_t*>(malloc(sizeof(uint64_t) * size_t(h.nargs + 1)));
  int32_t* arg_region = static_cast<int32_t*>(malloc(sizeof(int32_t) * size_t(h.nargs + 1)));
  uint64_t* arg_offset = static_cast<uint64_t*>(malloc(sizeof(uint64_t) * size_t(h.nargs + 1)));
  uint64_t* reg = static_cast<uint64_t*>(malloc(sizeof(uint64_t) * 4 * size_t(h.nregions + 1)));
  bool ok = fread(argbytes, 1, h.arg_bytes, stdin) == h.arg_bytes &&
            fread(arg_pos, sizeof(uint64_t), size_t(h.nargs), stdin) == size_t(h.nargs) &&
            fread(arg_region, sizeof(int32_t), size_t(h.nargs), stdin) == size_t(h.nargs) &&
            fread(arg_offset, sizeof(uint64_t), size_t(h.nargs), stdin) == size_t(h.nargs) &&
            fread(reg, sizeof(uint64_t) * 4, size_t(h.nregions), stdin) == size_t(h.nregions);
  if (!ok) {
    fprintf(stderr, "cupy_bn.sim: truncated launch request\n");
    return 2;
  }
  FILE* mf = fopen(argv[1], "r+b");
  if (!mf) {
    perror("cupy_bn.sim: host memory file");
    return 2;
  }
  fseek(mf, 0, SEEK_END);
  const long file_size = ftell(mf);
  unsigned char* host = nullptr;
  if (file_size > 0) {
    void* m = mmap(nullptr, size_t(file_size), PROT_READ | PROT_WRITE, MAP_SHARED, fileno(mf), 0);
    if (m == MAP_FAILED) {
      perror("cupy_bn.sim: mmap host memory");
      return 2;
    }
    host = static_cast<unsigned char*>(m);
  }
  void** args = static_cast<void**>(malloc(sizeof(void*) * size_t(h.nargs + 1)));
  for (int i = 0; i < h.nargs; ++i) args[i] = argbytes + arg_pos[i];
  Region* regions = static_cast<Region*>(calloc(size_t(h.nregions + 1), sizeof(Region)));
  for (int i = 0; i < h.nregions; ++i) {
    regions[i].host = host + reg[4 * i];
    regions[i].nbytes = reg[4 * i + 1];
    regions[i].align = reg[4 * i + 2];
    regions[i].writeable = int32_t(reg[4 * i + 3]);
  }
  Launch l = {};
  memcpy(l.grid, h.grid, sizeof l.grid);
  memcpy(l.block, h.block, sizeof l.block);
  l.shared_mem = h.shared_mem;
  l.max_dyn_smem = h.max_dyn_smem;
  l.schedule = h.schedule;
  l.seed = h.seed;
  l.stack_kb = h.stack_kb;
  l.guard = 1;
  l.nargs = h.nargs;
  l.nregions = h.nregions;
  l.args = args;
  l.arg_region = arg_region;
  l.arg_offset = arg_offset;
  l.regions = regions;
  l.log = own_log;
  l.log_cap = sizeof own_log;
  const int rc = launchers[h.kernel](&l);
  for (int i = 0; i < h.nregions; ++i)
    if (regions[i].written) printf("EMU_WRITTEN %d\n", i);
  fputs(own_log, stdout);
  printf("\nEMU_RC %d\n", rc);
  fflush(stdout);
  return 0;
}
#endif  // EMU_TSAN

// ------------------------------------------------------- kernel signatures
template <class T>
constexpr const char* pretty_type() { return __PRETTY_FUNCTION__; }

// "f4", "i8", "u2", "?", "V16" for a struct of 16 bytes; pointers get a "P" prefix.
template <class T>
EMU_INTERNAL inline void type_code(char* out, size_t cap) {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_pointer<U>::value) {
    using E = std::remove_cv_t<std::remove_pointer_t<U>>;
    snprintf(out, cap, "P");
    if constexpr (std::is_void<E>::value) snprintf(out + 1, cap - 1, "v");
    else type_code<E>(out + 1, cap - 1);
  } else if constexpr (std::is_same<U, bool>::value) {
    snprintf(out, cap, "?");
  } else if constexpr (std::is_floating_point<U>::value) {
    snprintf(out, cap, "f%zu", sizeof(U));
  } else if constexpr (std::is_integral<U>::value || std::is_enum<U>::value) {
    snprintf(out, cap, "%c%zu", std::is_signed<U>::value ? 'i' : 'u', sizeof(U));
  } else {
    snprintf(out, cap, "V%zu", sizeof(U));
  }
}

// One entry per parameter: "<code>|<C++ spelling>;"
template <class T>
EMU_INTERNAL inline void append_param(char* buf, size_t cap, size_t* n) {
  char code[32];
  type_code<T>(code, sizeof code);
  const char* p = pretty_type<T>();
  const char* s = strstr(p, "T = ");
  s = s ? s + 4 : p;
  size_t len = strlen(s);
  if (len && s[len - 1] == ']') --len;
  if (*n < cap) *n += size_t(snprintf(buf + *n, cap - *n, "%s|%.*s;", code, int(len), s));
}

template <class... A>
EMU_INTERNAL inline int signature(void (*)(A...), char* buf, uint64_t cap) {
  size_t n = 0;
  buf[0] = 0;
  (append_param<A>(buf, size_t(cap), &n), ...);
  return int(n);
}

template <class... A, size_t... I>
inline void call_kernel(void (*k)(A...), void** args, std::index_sequence<I...>) {
  k(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}

template <class... A>
EMU_INTERNAL inline int launch(void (*k)(A...), Launch* l) {
  struct Ctx {
    void (*k)(A...);
    void** args;
  } c{k, l->args};
  auto thunk = [](void* p) {
    Ctx* c = static_cast<Ctx*>(p);
    call_kernel(c->k, c->args, std::index_sequence_for<A...>{});
  };
  return run_grid(thunk, &c, l);
}

// ------------------------------------------------------------------ atomics
// Race mode orders memory through fences as the GPU does: a fence followed (in the same
// thread) by an atomic on address A releases at A (every later atomic of a thread that has
// fenced releases), and a fence acquires at every address that an atomic of its block has
// touched before it. So "write, fence, atomic ticket" in the writer and "atomic ticket, fence,
// read" in the last block synchronize; the ticket before the writer's fence, or no fence after
// the reader's ticket, does not. Outside race mode both are no-ops.
EMU_INTERNAL inline void atomic_sync(const void* p) {
#ifdef EMU_TSAN
  if (!cur) return;
  if (cur->fenced) __tsan_release(const_cast<void*>(p));
  for (int i = 0; i < n_atomic_addrs; ++i)
    if (atomic_addrs[i] == p) return;
  if (n_atomic_addrs < kAtomicAddrs) atomic_addrs[n_atomic_addrs++] = p;
#else
  (void)p;
#endif
}

template <class T>
inline T atomic_add(T* p, T v) {
  atomic_sync(p);
  if constexpr (std::is_integral<T>::value) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
  } else {
    T old, nv;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    do { nv = T(old + v); } while (!__atomic_compare_exchange(p, &old, &nv, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
  }
}

template <class T, class F>
inline T atomic_update(T* p, F fn) {
  atomic_sync(p);
  T old, nv;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  do { nv = fn(old); } while (!__atomic_compare_exchange(p, &old, &nv, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "warp intrinsics take values of at most 8 bytes");
  uint64_t b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}

template <class T>
inline T from_bits(uint64_t b) {
  T v;
  memcpy(&v, &b, sizeof(T));
  return v;
}

template <class T>
inline T shfl(int op, unsigned mask, T v, int src, int width, int line, const char* file) {
  return from_bits<T>(warp_op(op, mask, to_bits(v), sizeof(T), src, width, 0, line, file));
}

EMU_INTERNAL inline unsigned live_lanes() { return warps[cur->warp].live; }
EMU_INTERNAL inline unsigned current_lane() { return cur->lane; }
EMU_INTERNAL inline uint64_t switch_count() { return switches; }

EMU_INTERNAL inline void thread_fence() {
#ifdef EMU_TSAN
  if (cur) cur->fenced = true;
  for (int i = 0; i < n_atomic_addrs; ++i) __tsan_acquire(const_cast<void*>(atomic_addrs[i]));
#else
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

[[noreturn]] EMU_INTERNAL inline void trap(int line, const char* file) {
  fail_at(cur, "__trap() at %s:%d", file, line);
}

}  // namespace emu

// ------------------------------------------------------- undefined behaviour
// The module is compiled with -fsanitize=signed-integer-overflow,bounds (build.py): g++ calls
// these handlers (the layouts of GCC's and LLVM's UBSan runtime) where an int expression
// overflows or a subscript leaves an array of known size (static __shared__ arrays, local
// arrays). The launch stops with the operation, the values and the source line. Unsigned
// arithmetic wraps by definition and is not checked.
namespace emu::ubsan {
struct Location { const char* file; uint32_t line, column; };
struct Type { uint16_t kind, info; char name[1]; };  // kind 0: integer, info: log2(bits) << 1 | signed
struct Overflow { Location loc; const Type* type; };
struct OutOfBounds { Location loc; const Type* array; const Type* index; };
struct Shift { Location loc; const Type* lhs; const Type* rhs; };

EMU_INTERNAL inline void format(const Type* t, uintptr_t v, char* buf, size_t cap) {
  const unsigned bits = t->kind == 0 ? 1u << (t->info >> 1) : 64u;
  if (bits > 64) { snprintf(buf, cap, "(a %u-bit value)", bits); return; }
  uint64_t u = uint64_t(v);
  if (bits < 64) u &= (uint64_t(1) << bits) - 1;
  if (t->kind == 0 && (t->info & 1)) {
    int64_t x = bits < 64 && (u >> (bits - 1) & 1) ? int64_t(u - (uint64_t(1) << bits)) : int64_t(u);
    snprintf(buf, cap, "%lld", (long long)x);
  } else {
    snprintf(buf, cap, "%llu", (unsigned long long)u);
  }
}

[[noreturn]] EMU_INTERNAL inline void overflow(const Overflow* d, const char* op, uintptr_t a, uintptr_t b) {
  char x[32], y[32];
  format(d->type, a, x, sizeof x);
  format(d->type, b, y, sizeof y);
  if (!op)
    fail_at(cur, "signed integer overflow at %s:%u:%u: -(%s) cannot be represented in type %s",
            d->loc.file, d->loc.line, d->loc.column, y, d->type->name);
  fail_at(cur, "signed integer overflow at %s:%u:%u: %s %s %s cannot be represented in type %s "
          "(compute indices in long long or size_t)", d->loc.file, d->loc.line, d->loc.column, x,
          op, y, d->type->name);
}
}  // namespace emu::ubsan

#define EMU_UBSAN_HANDLER(name, ...)                                                      \
  extern "C" __attribute__((visibility("hidden"), noreturn)) EMU_INTERNAL void             \
      __ubsan_handle_##name(__VA_ARGS__);                                                  \
  extern "C" __attribute__((visibility("hidden"), noreturn)) EMU_INTERNAL void             \
      __ubsan_handle_##name##_abort(__VA_ARGS__);
EMU_UBSAN_HANDLER(add_overflow, emu::ubsan::Overflow*, uintptr_t, uintptr_t)
EMU_UBSAN_HANDLER(sub_overflow, emu::ubsan::Overflow*, uintptr_t, uintptr_t)
EMU_UBSAN_HANDLER(mul_overflow, emu::ubsan::Overflow*, uintptr_t, uintptr_t)
EMU_UBSAN_HANDLER(negate_overflow, emu::ubsan::Overflow*, uintptr_t)
EMU_UBSAN_HANDLER(divrem_overflow, emu::ubsan::Overflow*, uintptr_t, uintptr_t)
EMU_UBSAN_HANDLER(out_of_bounds, emu::ubsan::OutOfBounds*, uintptr_t)
#undef EMU_UBSAN_HANDLER

#define EMU_UBSAN_BINARY(name, op)                                                        \
  extern "C" void __ubsan_handle_##name(emu::ubsan::Overflow* d, uintptr_t a, uintptr_t b) { \
    emu::ubsan::overflow(d, op, a, b);                                                     \
  }                                                                                        \
  extern "C" void __ubsan_handle_##name##_abort(emu::ubsan::Overflow* d, uintptr_t a,      \
                                                uintptr_t b) {                             \
    emu::ubsan::overflow(d, op, a, b);                                                     \
  }
EMU_UBSAN_BINARY(add_overflow, "+")
EMU_UBSAN_BINARY(sub_overflow, "-")
EMU_UBSAN_BINARY(mul_overflow, "*")
EMU_UBSAN_BINARY(divrem_overflow, "/")
#undef EMU_UBSAN_BINARY

extern "C" void __ubsan_handle_negate_overflow(emu::ubsan::Overflow* d, uintptr_t a) {
  emu::ubsan::overflow(d, nullptr, 0, a);
}
extern "C" void __ubsan_handle_negate_overflow_abort(emu::ubsan::Overflow* d, uintptr_t a) {
  emu::ubsan::overflow(d, nullptr, 0, a);
}
extern "C" void __ubsan_handle_out_of_bounds(emu::ubsan::OutOfBounds* d, uintptr_t index) {
  char i[32];
  emu::ubsan::format(d->index, index, i, sizeof i);
  emu::fail_at(emu::cur, "index %s out of bounds for type %s at %s:%u:%u", i, d->array->name,
               d->loc.file, d->loc.line, d->loc.column);
}
extern "C" void __ubsan_handle_out_of_bounds_abort(emu::ubsan::OutOfBounds* d, uintptr_t index) {
  __ubsan_handle_out_of_bounds(d, index);
}

// The device API (intrinsics, atomics, math) comes next; ElementwiseKernel's loops also
// include emu_elementwise.h.
#include "emu_device.h"
