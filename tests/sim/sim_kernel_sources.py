"""CUDA sources of the simulator's tests.

Every source here is valid CUDA: test_sim_nvrtc.py compiles each one with NVRTC for several
architectures, and the other test files run them in the simulator. ``BUGS`` holds small
kernels with one planted bug each, ``CORRECT`` (name -> source, name expressions) the
kernels that must match NumPy.
"""

# Welford statistics, one block per channel of an (N, C, S) array; templates on the element
# and accumulator types (float, double, __half, __nv_bfloat16). Needs blockDim % 32 == 0.
BN_STATS = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>

template <typename Acc> struct Welford { Acc n, mean, m2; };

template <typename Acc>
__device__ __forceinline__ Welford<Acc> welford_merge(Welford<Acc> a, Welford<Acc> b) {
    const Acc n = a.n + b.n;
    if (n == Acc(0)) return a;
    const Acc delta = b.mean - a.mean;
    const Acc wb = b.n / n;
    Welford<Acc> r;
    r.n = n;
    r.mean = a.mean + delta * wb;
    r.m2 = a.m2 + b.m2 + delta * delta * a.n * wb;
    return r;
}

template <typename Acc>
__device__ __forceinline__ Welford<Acc> warp_merge(Welford<Acc> w) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        Welford<Acc> o;
        o.n = __shfl_xor_sync(0xffffffffu, w.n, offset);
        o.mean = __shfl_xor_sync(0xffffffffu, w.mean, offset);
        o.m2 = __shfl_xor_sync(0xffffffffu, w.m2, offset);
        w = welford_merge(w, o);
    }
    return w;
}

template <typename T, typename Acc>
__global__ void bn_stats(const T* __restrict__ x, Acc* __restrict__ mean,
                         Acc* __restrict__ var, int N, int C, int S) {
    __shared__ Welford<Acc> partial[32];
    const int c = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int nwarps = (blockDim.x + 31) / 32;
    Welford<Acc> w = {Acc(0), Acc(0), Acc(0)};
    for (long long i = tid; i < (long long)N * S; i += blockDim.x) {
        const long long n = i / S, s = i % S;
        const Acc v = static_cast<Acc>(x[(n * C + c) * S + s]);
        w.n += Acc(1);
        const Acc d = v - w.mean;
        w.mean += d / w.n;
        w.m2 += d * (v - w.mean);
    }
    w = warp_merge(w);
    if (lane == 0) partial[warp] = w;
    __syncthreads();
    if (warp == 0) {
        Welford<Acc> v = {Acc(0), Acc(0), Acc(0)};
        if (lane < nwarps) v = partial[lane];
        v = warp_merge(v);
        if (lane == 0) {
            mean[c] = v.mean;
            var[c] = v.m2 / v.n;
        }
    }
}
"""
BN_STATS_NAMES = (
    "bn_stats<float, float>",
    "bn_stats<double, double>",
    "bn_stats<__half, float>",
    "bn_stats<__nv_bfloat16, float>",
)

# A 2-D grid (channel, chunk): sums in float with warp shuffles (down), the cross-warp step in
# dynamic shared memory, double atomics across blocks; a finalize kernel computes mean/invstd.
BN_SPLIT = r"""
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = warpSize / 2; offset > 0; offset /= 2)
        v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

extern "C" __global__ void partial_sums(const float* __restrict__ x, double* __restrict__ sum,
                                        double* __restrict__ sumsq, int N, int C, int S,
                                        int chunk) {
    extern __shared__ float smem[];  // 2 * (blockDim.x / 32) floats
    const int c = blockIdx.x;
    const int begin = blockIdx.y * chunk;
    const int end = min(begin + chunk, N * S);
    const int tid = threadIdx.x, lane = tid % warpSize, warp = tid / warpSize;
    const int nwarps = blockDim.x / warpSize;
    float s = 0.f, ss = 0.f;
    for (int i = begin + tid; i < end; i += blockDim.x) {
        const float v = x[((size_t)(i / S) * C + c) * S + i % S];
        s += v;
        ss = fmaf(v, v, ss);
    }
    s = warp_sum(s);
    ss = warp_sum(ss);
    if (lane == 0) { smem[warp] = s; smem[nwarps + warp] = ss; }
    __syncthreads();
    if (warp == 0) {
        s = lane < nwarps ? smem[lane] : 0.f;
        ss = lane < nwarps ? smem[nwarps + lane] : 0.f;
        s = warp_sum(s);
        ss = warp_sum(ss);
        if (lane == 0) {
            atomicAdd(&sum[c], (double)s);
            atomicAdd(&sumsq[c], (double)ss);
        }
    }
}

extern "C" __global__ void finalize(const double* __restrict__ sum,
                                    const double* __restrict__ sumsq, float* __restrict__ mean,
                                    float* __restrict__ invstd, int C, long long count,
                                    float eps) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const double m = sum[c] / (double)count;
    const double var = max(sumsq[c] / (double)count - m * m, 0.0);
    mean[c] = (float)m;
    invstd[c] = rsqrtf((float)var + eps);
}
"""

# Every shuffle mode for every width, votes and (sm_80) warp reductions, for one warp.
WARP_OPS = r"""
extern "C" __global__ void shuffles(int* out, int d) {
    const int v = 100 + threadIdx.x, l = threadIdx.x;
    int k = 0;
    for (int w = 2; w <= 32; w *= 2) {
        out[(k++) * 32 + l] = __shfl_sync(0xffffffffu, v, d, w);
        out[(k++) * 32 + l] = __shfl_up_sync(0xffffffffu, v, d, w);
        out[(k++) * 32 + l] = __shfl_down_sync(0xffffffffu, v, d, w);
        out[(k++) * 32 + l] = __shfl_xor_sync(0xffffffffu, v, d, w);
    }
}

extern "C" __global__ void votes(const int* pred, unsigned* out) {
    const int l = threadIdx.x;
    const int p = pred[l];
    out[0 * 32 + l] = __ballot_sync(0xffffffffu, p);
    out[1 * 32 + l] = __any_sync(0xffffffffu, p);
    out[2 * 32 + l] = __all_sync(0xffffffffu, p);
    out[3 * 32 + l] = __activemask();
    // the even lanes vote among themselves
    if (l % 2 == 0) out[4 * 32 + l] = __ballot_sync(0x55555555u, p);
    else out[4 * 32 + l] = 0;
    out[5 * 32 + l] = __match_any_sync(0xffffffffu, p);
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    out[6 * 32 + l] = __reduce_add_sync(0xffffffffu, (unsigned)(p + l));
    out[7 * 32 + l] = __reduce_max_sync(0xffffffffu, (unsigned)(p * 7 + l));
#endif
}

// Inclusive prefix sums inside segments of `width` lanes (width < 32) with __shfl_up_sync.
extern "C" __global__ void segmented_scan(const float* x, float* out, int width) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = x[i];
    const int lane_in_seg = threadIdx.x % width;
    for (int o = 1; o < width; o *= 2) {
        const float u = __shfl_up_sync(0xffffffffu, v, o, width);
        if (lane_in_seg >= o) v += u;
    }
    out[i] = v;
}

extern "C" __global__ void block_votes(const int* pred, int* out) {
    const int p = pred[blockIdx.x * blockDim.x + threadIdx.x];
    const int n = __syncthreads_count(p);
    const int a = __syncthreads_and(p);
    const int o = __syncthreads_or(p);
    if (threadIdx.x == 0) {
        out[3 * blockIdx.x] = n;
        out[3 * blockIdx.x + 1] = a;
        out[3 * blockIdx.x + 2] = o;
    }
}
"""

# 2-D blocks and grids: a tiled transpose through padded static shared memory.
TRANSPOSE = r"""
#define TILE 32
extern "C" __global__ void transpose(const float* __restrict__ in, float* __restrict__ out,
                                     int rows, int cols) {
    __shared__ float tile[TILE][TILE + 1];
    int x = blockIdx.x * TILE + threadIdx.x;
    int y = blockIdx.y * TILE + threadIdx.y;
    for (int j = 0; j < TILE; j += blockDim.y)
        if (x < cols && y + j < rows) tile[threadIdx.y + j][threadIdx.x] = in[(y + j) * cols + x];
    __syncthreads();
    x = blockIdx.y * TILE + threadIdx.x;
    y = blockIdx.x * TILE + threadIdx.y;
    for (int j = 0; j < TILE; j += blockDim.y)
        if (x < rows && y + j < cols) out[(y + j) * rows + x] = tile[threadIdx.x][threadIdx.y + j];
}

// 3-D blocks and grids: every thread writes its global linear index, and the linear index
// of lane 0 of its warp (warps are formed from the linear thread index x + y*Dx + z*Dx*Dy).
extern "C" __global__ void thread_ids(int* linear, int* first_of_warp) {
    const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int n = blockDim.x * blockDim.y * blockDim.z;
    linear[b * n + t] = b * n + t;
    first_of_warp[b * n + t] = __shfl_sync(__activemask(), t, 0);
}
"""

# fp16 / bf16 through the CUDA headers: a per-element normalization and warp max reductions.
HALF = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>

extern "C" __global__ void bn_apply_half(const __half* __restrict__ x, __half* __restrict__ y,
                                         const float* __restrict__ scale,
                                         const float* __restrict__ shift, int C, int S,
                                         long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const int c = (int)((i / S) % C);
        y[i] = __float2half_rn(__half2float(x[i]) * scale[c] + shift[c]);
    }
}

extern "C" __global__ void warp_max(const __half* h, const __nv_bfloat16* b, float* out) {
    __half vh = h[blockIdx.x * 32 + threadIdx.x];
    __nv_bfloat16 vb = b[blockIdx.x * 32 + threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) {
        vh = __hmax(vh, __shfl_xor_sync(0xffffffffu, vh, o));
        vb = __hmax(vb, __shfl_xor_sync(0xffffffffu, vb, o));
    }
    if (threadIdx.x == 0) {
        out[2 * blockIdx.x] = __half2float(vh);
        out[2 * blockIdx.x + 1] = __bfloat162float(vb);
    }
}
"""

# Atomics on every supported type; exact results whatever the order.
ATOMICS = r"""
extern "C" __global__ void atomics(const int* __restrict__ keys, int n, int* hist,
                                   unsigned* uhist, unsigned long long* total, float* fsum,
                                   double* dsum, int* imax, int* imin, unsigned* wrap,
                                   int* cas_sum, unsigned* bits) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        const int k = keys[i];
        atomicAdd(&hist[k], 1);
        atomicAdd(&uhist[k], 2u);
        atomicSub(&uhist[k], 1u);
        atomicAdd(total, (unsigned long long)k);
        atomicAdd(fsum, 0.5f);
        atomicAdd(dsum, 0.25 * k);
        atomicMax(imax, k);
        atomicMin(imin, k);
        atomicInc(wrap, 9u);
        int old = *cas_sum, assumed;
        do {
            assumed = old;
            old = atomicCAS(cas_sum, assumed, assumed + k);
        } while (old != assumed);
        atomicOr(bits, 1u << (k % 32));
    }
}

// Last-block pattern: partial sums, a fence, and the block that finishes last adds them up.
extern "C" __global__ void last_block_sum(const float* x, int n, float* partial,
                                          unsigned* counter, float* out) {
    __shared__ bool is_last;
    float s = 0.f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
        s += x[i];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = s;
        __threadfence();
        is_last = atomicInc(counter, gridDim.x - 1) == gridDim.x - 1;
    }
    __syncthreads();
    if (is_last && threadIdx.x == 0) {
        __threadfence();
        float t = 0.f;
        for (int b = 0; b < gridDim.x; ++b) t += partial[b];
        *out = t;
    }
}
"""

# CUDA math functions and integer intrinsics, one output row per function.
MATH = r"""
extern "C" __global__ void math_funcs(const float* x, float* f, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = x[i];
    int k = 0;
    f[(k++) * n + i] = rsqrtf(v);
    f[(k++) * n + i] = expf(-v);
    f[(k++) * n + i] = __expf(-v);
    f[(k++) * n + i] = logf(v);
    f[(k++) * n + i] = __logf(v);
    f[(k++) * n + i] = erff(v - 1.f);
    f[(k++) * n + i] = normcdff(v - 1.f);
    f[(k++) * n + i] = tanhf(v - 1.f);
    f[(k++) * n + i] = sinpif(v);
    f[(k++) * n + i] = __fdividef(1.f, v);
    f[(k++) * n + i] = __saturatef(v - 1.f);
    f[(k++) * n + i] = fmaxf(v, 1.f);
    f[(k++) * n + i] = max(v, 1.f);
    f[(k++) * n + i] = (float)__float2int_rn(v * 3.f);
    f[(k++) * n + i] = __powf(v, 1.5f);
    f[(k++) * n + i] = sqrtf(v);
}

extern "C" __global__ void int_funcs(const unsigned* x, unsigned* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const unsigned v = x[i];
    out[0 * n + i] = __popc(v);
    out[1 * n + i] = __brev(v);
    out[2 * n + i] = __clz(v);
    out[3 * n + i] = __ffs(v);
    out[4 * n + i] = __umulhi(v, 0x9E3779B9u);
    out[5 * n + i] = __byte_perm(v, 0x11223344u, 0x5140u);
    out[6 * n + i] = min(v, 12345u);
    out[7 * n + i] = __float_as_uint(__uint_as_float(v));
}
"""

# Planted bugs, one kernel each (every one is valid CUDA that NVRTC compiles).
BUGS = r"""
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Correct reference: block sum of x[0:n] into out[blockIdx.x].
extern "C" __global__ void block_sum(const float* x, int n, float* out) {
    __shared__ float part[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
    s = warp_sum(s);
    if (lane == 0) part[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = warp_sum(lane < nwarps ? part[lane] : 0.f);
        if (lane == 0) out[blockIdx.x] = s;
    }
}

// BUG: no barrier between the writes of part[] and warp 0 reading them.
extern "C" __global__ void missing_barrier(const float* x, int n, float* out) {
    __shared__ float part[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
    s = warp_sum(s);
    if (lane == 0) part[warp] = s;
    if (warp == 0) {
        s = warp_sum(lane < nwarps ? part[lane] : 0.f);
        if (lane == 0) out[blockIdx.x] = s;
    }
}

// Warp-synchronous tail of a shared memory reduction (64 threads), done right: __syncwarp
// between the reads and the writes of every step.
extern "C" __global__ void warp_tail_syncwarp(const float* x, float* out) {
    __shared__ float sdata[64];
    const int tid = threadIdx.x;
    sdata[tid] = x[tid];
    __syncthreads();
    if (tid < 32) {
        float v = sdata[tid];
        for (int o = 32; o > 0; o >>= 1) {
            v += sdata[tid + o];
            __syncwarp();
            sdata[tid] = v;
            __syncwarp();
        }
        if (tid == 0) *out = v;
    }
}

// BUG: the pre-Volta warp-synchronous idiom (volatile, no __syncwarp).
extern "C" __global__ void warp_tail_legacy(const float* x, float* out) {
    __shared__ float sdata[64];
    const int tid = threadIdx.x;
    sdata[tid] = x[tid];
    __syncthreads();
    if (tid < 32) {
        volatile float* v = sdata;
        v[tid] += v[tid + 32]; v[tid] += v[tid + 16]; v[tid] += v[tid + 8];
        v[tid] += v[tid + 4]; v[tid] += v[tid + 2]; v[tid] += v[tid + 1];
        if (tid == 0) *out = v[0];
    }
}

// BUG: shuffle offsets start at 8: lanes 0-15 and 16-31 are summed separately.
extern "C" __global__ void wrong_offsets(const float* x, int n, float* out) {
    const int lane = threadIdx.x % 32;
    float s = threadIdx.x < n ? x[threadIdx.x] : 0.f;
    for (int o = 8; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) out[threadIdx.x / 32] = s;
}

// BUG: the second stage runs in `tid < nwarps` lanes only, with a full-warp mask.
extern "C" __global__ void partial_warp_mask(const float* x, int n, float* out) {
    __shared__ float part[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    float s = threadIdx.x < n ? x[threadIdx.x] : 0.f;
    s = warp_sum(s);
    if (lane == 0) part[warp] = s;
    __syncthreads();
    if (threadIdx.x < nwarps) {
        s = warp_sum(part[threadIdx.x]);
        if (threadIdx.x == 0) *out = s;
    }
}

// BUG: a full-mask shuffle in a block whose last warp is partial (blockDim % 32 != 0).
extern "C" __global__ void partial_block_shuffle(const float* x, float* out) {
    float s = x[threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    if (threadIdx.x % 32 == 0) out[threadIdx.x / 32] = s;
}

// BUG: threads past the end return before the barrier.
extern "C" __global__ void early_return(const float* x, int n, float* out) {
    __shared__ float buf[1024];
    const int i = threadIdx.x;
    if (i >= n) return;
    buf[i] = x[i];
    __syncthreads();
    out[i] = buf[n - 1 - i];
}

// BUG: a barrier inside code that only warp 0 runs.
extern "C" __global__ void divergent_barrier(const float* x, float* out) {
    __shared__ float buf[1024];
    buf[threadIdx.x] = x[threadIdx.x];
    if (threadIdx.x < 32) {
        __syncthreads();
        out[threadIdx.x] = buf[threadIdx.x + 32];
    }
}

// BUG: lanes 0-15 shuffle with a full mask while lanes 16-31 wait at a barrier.
extern "C" __global__ void shuffle_vs_barrier(const float* x, float* out) {
    float v = x[threadIdx.x];
    if (threadIdx.x % 32 < 16) v += __shfl_xor_sync(0xffffffffu, v, 1);
    __syncthreads();
    out[threadIdx.x] = v;
}

// BUG: `<=` reads and writes one element past the end.
extern "C" __global__ void off_by_one(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) y[i] = 2.f * x[i];
}

// BUG (at the launch): needs shared_mem = blockDim.x * sizeof(float).
extern "C" __global__ void reverse_block(const float* x, float* y) {
    extern __shared__ float tmp[];
    tmp[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
    __syncthreads();
    y[blockIdx.x * blockDim.x + threadIdx.x] = tmp[blockDim.x - 1 - threadIdx.x];
}

// BUG: lost updates, a plain read-modify-write of one global value by many threads.
extern "C" __global__ void lost_update(const float* x, int n, float* total) {
    float s = 0.f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
        s += x[i];
    s = warp_sum(s);
    if (threadIdx.x % 32 == 0) *total += s;
}

// Correct version of lost_update.
extern "C" __global__ void atomic_total(const float* x, int n, float* total) {
    float s = 0.f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
        s += x[i];
    s = warp_sum(s);
    if (threadIdx.x % 32 == 0) atomicAdd(total, s);
}

// A `float` parameter: CuPy passes a Python float as 8 bytes (float64).
extern "C" __global__ void scale(float* x, int n, float alpha) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= alpha;
}

// BUG: reads x[i - 1] for i = 0.
extern "C" __global__ void before_start(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i - 1];
}

// BUG: writes into its input (declared const, the pointer is cast).
extern "C" __global__ void writes_input(const float* x, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) const_cast<float*>(x)[i] = 0.f;
}

// BUG: a large local array overflows a small thread stack.
extern "C" __global__ void stack_hog(const float* x, float* y, int n) {
    float buf[4096];
    for (int i = 0; i < 4096; ++i) buf[i] = x[(i + threadIdx.x) % n];
    float s = 0.f;
    for (int i = 0; i < 4096; i += 7) s += buf[i];
    y[threadIdx.x] = s;
}

// BUG: reads shared memory that no thread wrote (the template puts it outside the section).
template <typename T>
__global__ void uninitialized_shared(T* out) {
    __shared__ T buf[64];
    if (threadIdx.x < 32) buf[threadIdx.x] = T(1);
    __syncthreads();
    out[threadIdx.x] = buf[threadIdx.x];
}

// BUG: block 0 waits for a flag that a later block sets (needs both resident at once).
extern "C" __global__ void spin_wait(volatile int* flag) {
    if (blockIdx.x == 0) {
        while (*flag == 0) {
        }
    } else {
        *flag = 1;
    }
}

// BUG: integer division by zero.
extern "C" __global__ void divide(const int* a, const int* b, int* q) {
    q[threadIdx.x] = a[threadIdx.x] / b[threadIdx.x];
}

// BUG: the caller is not in the mask of its own shuffle.
extern "C" __global__ void mask_without_caller(float* x) {
    x[threadIdx.x] = __shfl_sync(1u, x[threadIdx.x], 0);
}

extern "C" __global__ void trap_if_negative(const float* x) {
    if (x[threadIdx.x] < 0.f) __trap();
}

// BUG (race mode): the writer's fence is missing before the counter says "done".
extern "C" __global__ void last_block_no_fence(const float* x, float* partial,
                                               unsigned* counter, float* out) {
    __shared__ bool is_last;
    float s = warp_sum(x[blockIdx.x * 32 + threadIdx.x]);
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = s;
        is_last = atomicInc(counter, gridDim.x - 1) == gridDim.x - 1;
    }
    __syncthreads();
    if (is_last && threadIdx.x == 0) {
        __threadfence();
        float t = 0.f;
        for (int b = 0; b < gridDim.x; ++b) t += partial[b];
        *out = t;
    }
}
"""
BUGS_NAMES = ("uninitialized_shared<float>",)

# name -> (source, name expressions): everything NVRTC must compile.
ALL_SOURCES = {
    "bn_stats": (BN_STATS, BN_STATS_NAMES),
    "bn_split": (BN_SPLIT, ()),
    "warp_ops": (WARP_OPS, ()),
    "transpose": (TRANSPOSE, ()),
    "half": (HALF, ()),
    "atomics": (ATOMICS, ()),
    "math": (MATH, ()),
    "bugs": (BUGS, BUGS_NAMES),
}
