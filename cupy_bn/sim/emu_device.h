// emu_device.h: the CUDA device API on the CPU (included by emu.h).
//
// __syncthreads and warp intrinsics go through the scheduler in emu.h; atomics are real
// atomics (race mode sees them); math functions compute IEEE results.
#pragma once

// ============================================================ device API
// __builtin_LINE()/__builtin_FILE() as default arguments record the caller's source line.

inline void __syncthreads(int line = __builtin_LINE(), const char* file = __builtin_FILE()) {
  emu::syncthreads(0, 0, line, file);
}
inline int __syncthreads_count(int p, int line = __builtin_LINE(), const char* file = __builtin_FILE()) {
  return emu::syncthreads(0, p, line, file);
}
inline int __syncthreads_and(int p, int line = __builtin_LINE(), const char* file = __builtin_FILE()) {
  return emu::syncthreads(1, p, line, file);
}
inline int __syncthreads_or(int p, int line = __builtin_LINE(), const char* file = __builtin_FILE()) {
  return emu::syncthreads(2, p, line, file);
}
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu, int line = __builtin_LINE(),
                       const char* file = __builtin_FILE()) {
  emu::warp_op(emu::OP_SYNCWARP, mask, 0, 0, 0, 32, 0, line, file);
}
inline void __threadfence() { emu::thread_fence(); }
inline void __threadfence_block() { emu::thread_fence(); }
inline void __threadfence_system() { emu::thread_fence(); }
[[noreturn]] inline void __trap(int line = __builtin_LINE(), const char* file = __builtin_FILE()) {
  emu::trap(line, file);
}
inline void __nanosleep(unsigned) {}
// A counter of thread switches (clock() is the C library's).
inline long long clock64() { return (long long)emu::switch_count(); }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = warpSize,
                     int line = __builtin_LINE(), const char* file = __builtin_FILE()) {
  return emu::shfl(emu::OP_SHFL_IDX, mask, v, src, width, line, file);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize,
                        int line = __builtin_LINE(), const char* file = __builtin_FILE()) {
  return emu::shfl(emu::OP_SHFL_UP, mask, v, int(delta), width, line, file);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize,
                          int line = __builtin_LINE(), const char* file = __builtin_FILE()) {
  return emu::shfl(emu::OP_SHFL_DOWN, mask, v, int(delta), width, line, file);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize,
                         int line = __builtin_LINE(), const char* file = __builtin_FILE()) {
  return emu::shfl(emu::OP_SHFL_XOR, mask, v, lane_mask, width, line, file);
}
inline unsigned __ballot_sync(unsigned mask, int pred, int line = __builtin_LINE(),
                              const char* file = __builtin_FILE()) {
  return unsigned(emu::warp_op(emu::OP_BALLOT, mask, pred != 0, 4, 0, 32, 0, line, file));
}
inline int __any_sync(unsigned mask, int pred, int line = __builtin_LINE(),
                      const char* file = __builtin_FILE()) {
  return int(emu::warp_op(emu::OP_ANY, mask, pred != 0, 4, 0, 32, 0, line, file));
}
inline int __all_sync(unsigned mask, int pred, int line = __builtin_LINE(),
                      const char* file = __builtin_FILE()) {
  return int(emu::warp_op(emu::OP_ALL, mask, pred != 0, 4, 0, 32, 0, line, file));
}
inline int __uni_sync(unsigned mask, int pred, int line = __builtin_LINE(),
                      const char* file = __builtin_FILE()) {
  return int(emu::warp_op(emu::OP_UNI, mask, pred != 0, 4, 0, 32, 0, line, file));
}
template <class T>
inline unsigned __match_any_sync(unsigned mask, T v, int line = __builtin_LINE(),
                                 const char* file = __builtin_FILE()) {
  return unsigned(emu::warp_op(emu::OP_MATCH_ANY, mask, emu::to_bits(v), sizeof(T), 0, 32, 0, line, file));
}
template <class T>
inline unsigned __match_all_sync(unsigned mask, T v, int* pred, int line = __builtin_LINE(),
                                 const char* file = __builtin_FILE()) {
  const unsigned r = unsigned(emu::warp_op(emu::OP_MATCH_ALL, mask, emu::to_bits(v), sizeof(T), 0, 32, 0, line, file));
  *pred = emu::cur->flag;
  return r;
}
#define EMU_WARP_REDUCE(NAME, OP)                                                              \
  inline unsigned NAME(unsigned mask, unsigned v, int line = __builtin_LINE(),                 \
                       const char* file = __builtin_FILE()) {                                  \
    return unsigned(emu::warp_op(emu::OP, mask, v, 4, 0, 32, 0, line, file));                  \
  }                                                                                            \
  inline int NAME(unsigned mask, int v, int line = __builtin_LINE(),                           \
                  const char* file = __builtin_FILE()) {                                       \
    return int(uint32_t(emu::warp_op(emu::OP, mask, uint32_t(v), 4, 0, 32, 1, line, file)));   \
  }
EMU_WARP_REDUCE(__reduce_add_sync, OP_REDUCE_ADD)
EMU_WARP_REDUCE(__reduce_min_sync, OP_REDUCE_MIN)
EMU_WARP_REDUCE(__reduce_max_sync, OP_REDUCE_MAX)
#undef EMU_WARP_REDUCE
inline unsigned __reduce_and_sync(unsigned mask, unsigned v, int line = __builtin_LINE(),
                                  const char* file = __builtin_FILE()) {
  return unsigned(emu::warp_op(emu::OP_REDUCE_AND, mask, v, 4, 0, 32, 0, line, file));
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned v, int line = __builtin_LINE(),
                                 const char* file = __builtin_FILE()) {
  return unsigned(emu::warp_op(emu::OP_REDUCE_OR, mask, v, 4, 0, 32, 0, line, file));
}
inline unsigned __reduce_xor_sync(unsigned mask, unsigned v, int line = __builtin_LINE(),
                                  const char* file = __builtin_FILE()) {
  return unsigned(emu::warp_op(emu::OP_REDUCE_XOR, mask, v, 4, 0, 32, 0, line, file));
}
// All non-exited lanes of the warp (the simulator's threads are never diverged at a call).
inline unsigned __activemask() { return emu::live_lanes(); }

// ---------------------------------------------------------------- atomics
#define EMU_ATOMIC_ADD(T)                                                                   \
  inline T atomicAdd(T* p, T v) { return emu::atomic_add(p, v); }                           \
  inline T atomicAdd_block(T* p, T v) { return emu::atomic_add(p, v); }                     \
  inline T atomicAdd_system(T* p, T v) { return emu::atomic_add(p, v); }
EMU_ATOMIC_ADD(int)
EMU_ATOMIC_ADD(unsigned)
EMU_ATOMIC_ADD(unsigned long long)
EMU_ATOMIC_ADD(float)
EMU_ATOMIC_ADD(double)
#undef EMU_ATOMIC_ADD
// __half, __half2, __nv_bfloat16, ...: any type with operator+ (the CUDA headers' host code)
template <class T>
inline T atomicAdd(T* p, T v) { return emu::atomic_update(p, [&](T o) { return T(o + v); }); }
inline int atomicSub(int* p, int v) { return emu::atomic_add(p, -v); }
inline unsigned atomicSub(unsigned* p, unsigned v) { return emu::atomic_add(p, 0u - v); }

#define EMU_ATOMIC_INT_OPS(T)                                                                 \
  inline T atomicExch(T* p, T v) { return emu::atomic_update(p, [&](T) { return v; }); }      \
  inline T atomicMin(T* p, T v) { return emu::atomic_update(p, [&](T o) { return v < o ? v : o; }); } \
  inline T atomicMax(T* p, T v) { return emu::atomic_update(p, [&](T o) { return v > o ? v : o; }); } \
  inline T atomicAnd(T* p, T v) { emu::atomic_sync(p); return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); } \
  inline T atomicOr(T* p, T v) { emu::atomic_sync(p); return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); } \
  inline T atomicXor(T* p, T v) { emu::atomic_sync(p); return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); } \
  inline T atomicCAS(T* p, T compare, T v) {                                                  \
    emu::atomic_sync(p);                                                                      \
    __atomic_compare_exchange(p, &compare, &v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);    \
    return compare;                                                                           \
  }
EMU_ATOMIC_INT_OPS(int)
EMU_ATOMIC_INT_OPS(unsigned)
EMU_ATOMIC_INT_OPS(unsigned long long)
EMU_ATOMIC_INT_OPS(long long)
#undef EMU_ATOMIC_INT_OPS
inline unsigned short atomicCAS(unsigned short* p, unsigned short compare, unsigned short v) {
  emu::atomic_sync(p);
  __atomic_compare_exchange(p, &compare, &v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}
inline float atomicExch(float* p, float v) { return emu::atomic_update(p, [&](float) { return v; }); }
inline unsigned atomicInc(unsigned* p, unsigned limit) {
  return emu::atomic_update(p, [&](unsigned o) { return o >= limit ? 0u : o + 1u; });
}
inline unsigned atomicDec(unsigned* p, unsigned limit) {
  return emu::atomic_update(p, [&](unsigned o) { return (o == 0u || o > limit) ? limit : o - 1u; });
}

// ---------------------------------------------------- math and intrinsics
// The CPU computes IEEE results where the GPU's fast intrinsics (__expf, rsqrtf, ...) are
// approximate: compare with tolerances. Functions that a newer C library may declare itself
// are templates, so that the library's version wins when it exists.
template <int = 0> inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
template <int = 0> inline double rsqrt(double x) { return 1.0 / sqrt(x); }
template <int = 0> inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
template <int = 0> inline double rcbrt(double x) { return 1.0 / cbrt(x); }
template <int = 0> inline float sinpif(float x) { return float(sin(M_PI * double(x))); }
template <int = 0> inline float cospif(float x) { return float(cos(M_PI * double(x))); }
template <int = 0> inline double sinpi(double x) { return sin(M_PI * x); }
template <int = 0> inline double cospi(double x) { return cos(M_PI * x); }
template <int = 0> inline float normcdff(float x) { return 0.5f * erfcf(-x * float(M_SQRT1_2)); }
template <int = 0> inline double normcdf(double x) { return 0.5 * erfc(-x * M_SQRT1_2); }
template <int = 0> inline float fdividef(float a, float b) { return a / b; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline double __drcp_rn(double a) { return 1.0 / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline double __dsqrt_rn(double a) { return sqrt(a); }
inline float __frsqrt_rn(float a) { return 1.0f / sqrtf(a); }
inline float __expf(float a) { return expf(a); }
inline float __exp10f(float a) { return exp10f(a); }
inline float __logf(float a) { return logf(a); }
inline float __log2f(float a) { return log2f(a); }
inline float __log10f(float a) { return log10f(a); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __sinf(float a) { return sinf(a); }
inline float __cosf(float a) { return cosf(a); }
inline float __tanf(float a) { return tanf(a); }
inline void __sincosf(float a, float* s, float* c) { *s = sinf(a); *c = cosf(a); }
inline float __saturatef(float a) { return a < 0.f ? 0.f : (a > 1.f ? 1.f : (a == a ? a : 0.f)); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline int __float2int_rn(float a) { return int(nearbyintf(a)); }
inline int __float2int_rz(float a) { return int(truncf(a)); }
inline int __float2int_rd(float a) { return int(floorf(a)); }
inline int __float2int_ru(float a) { return int(ceilf(a)); }
inline unsigned __float2uint_rn(float a) { return unsigned(nearbyintf(a)); }
inline unsigned __float2uint_rz(float a) { return unsigned(truncf(a)); }
inline long long __float2ll_rn(float a) { return (long long)nearbyintf(a); }
inline long long __float2ll_rz(float a) { return (long long)truncf(a); }
inline int __double2int_rn(double a) { return int(nearbyint(a)); }
inline int __double2int_rz(double a) { return int(trunc(a)); }
inline long long __double2ll_rn(double a) { return (long long)nearbyint(a); }
inline float __double2float_rn(double a) { return float(a); }
inline float __int2float_rn(int a) { return float(a); }
inline float __uint2float_rn(unsigned a) { return float(a); }
inline float __ll2float_rn(long long a) { return float(a); }
inline double __int2double_rn(int a) { return double(a); }
inline double __ll2double_rn(long long a) { return double(a); }
inline int __float_as_int(float a) { return emu::from_bits<int>(emu::to_bits(a)); }
inline unsigned __float_as_uint(float a) { return emu::from_bits<unsigned>(emu::to_bits(a)); }
inline float __int_as_float(int a) { return emu::from_bits<float>(emu::to_bits(a)); }
inline float __uint_as_float(unsigned a) { return emu::from_bits<float>(emu::to_bits(a)); }
inline long long __double_as_longlong(double a) { return emu::from_bits<long long>(emu::to_bits(a)); }
inline double __longlong_as_double(long long a) { return emu::from_bits<double>(emu::to_bits(a)); }
inline int __double2hiint(double a) { return int(uint64_t(__double_as_longlong(a)) >> 32); }
inline int __double2loint(double a) { return int(uint32_t(uint64_t(__double_as_longlong(a)))); }
inline double __hiloint2double(int hi, int lo) {
  return __longlong_as_double((long long)((uint64_t(uint32_t(hi)) << 32) | uint32_t(lo)));
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz(unsigned(x)) : 32; }
inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
  return (static_cast<unsigned long long>(__brev(unsigned(x))) << 32) | __brev(unsigned(x >> 32));
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (uint64_t(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
}
inline int __mul24(int a, int b) { return int32_t(uint32_t(a << 8 >> 8) * uint32_t(b << 8 >> 8)); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xFFFFFFu) * (b & 0xFFFFFFu); }
inline int __mulhi(int a, int b) { return int((int64_t(a) * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
inline long long __mul64hi(long long a, long long b) { return (long long)((__int128(a) * b) >> 64); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)((unsigned __int128)a * b >> 64);
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
  return unsigned(((uint64_t(hi) << 32 | lo) << (s & 31)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  return unsigned((uint64_t(hi) << 32 | lo) >> (s & 31));
}
inline unsigned __lanemask_lt() { return (1u << emu::current_lane()) - 1u; }

// Cache-hinted loads and stores are plain memory accesses.
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

// CUDA's global min/max for arithmetic types (floating point like fminf/fmaxf for NaN).
template <class A, class B, class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline auto max(A a, B b) -> std::common_type_t<A, B> {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<C>::value) return std::fmax(C(a), C(b));
  else return C(a) > C(b) ? C(a) : C(b);
}
template <class A, class B, class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline auto min(A a, B b) -> std::common_type_t<A, B> {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<C>::value) return std::fmin(C(a), C(b));
  else return C(a) < C(b) ? C(a) : C(b);
}
inline unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned umax(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long llmin(long long a, long long b) { return a < b ? a : b; }
inline long long llmax(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long ullmin(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long ullmax(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

// assert() in a kernel stops the launch with the failed expression and its line.
#undef assert
#ifdef NDEBUG
#define assert(e) ((void)0)
#else
#define assert(e) ((e) ? (void)0 : emu::assert_failed(#e, __FILE__, __LINE__))
#endif
namespace emu {
[[noreturn]] EMU_INTERNAL inline void assert_failed(const char* expr, const char* file, int line) {
  if (!in_kernel) {
    fprintf(stderr, "%s:%d: assertion `%s' failed\n", file, line, expr);
    abort();
  }
  fail_at(cur, "assertion `%s' failed at %s:%d", expr, file, line);
}
}  // namespace emu
