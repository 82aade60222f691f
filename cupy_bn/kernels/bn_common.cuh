// Shared device code of the batch-norm kernels: type conversions, Welford triples and their
// Chan merges (per thread, across a warp by shuffles, across a block through shared memory),
// and the per-thread cursor that walks one channel's tile of an NCS tensor.
//
// Conventions: T is the storage type (float, double, __half, __nv_bfloat16); Acc the
// accumulation type (double for double, float otherwise). Element offsets are 64-bit; the
// number of elements one block handles is below 2^30 (the launch code guarantees it), so
// per-block counters are 32-bit.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace bn {

constexpr unsigned kFullMask = 0xffffffffu;

// Values each thread loads before it consumes any of them (memory-level parallelism): 8 for
// 2- and 4-byte types, 4 doubles.
template <typename T>
struct Unroll {
  static constexpr int value = sizeof(T) >= 8 ? 4 : 8;
};

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// ------------------------------------------------------------------ Welford / Chan merges

// Count, mean and sum of squared deviations (M2) of a set of values.
template <typename Acc, typename Count>
struct Welford {
  Count n;
  Acc mean;
  Acc m2;
};

// Chan et al.'s pairwise merge. `a` is the earlier part in the fixed merge order; an empty
// triple is (0, 0, 0), and merging with it returns the other operand exactly.
template <typename Acc, typename Count>
__device__ __forceinline__ Welford<Acc, Count> chan_merge(const Welford<Acc, Count>& a,
                                                          const Welford<Acc, Count>& b) {
  const Count n = a.n + b.n;
  if (n == 0) return a;
  const Acc delta = b.mean - a.mean;
  const Acc ratio = static_cast<Acc>(b.n) / static_cast<Acc>(n);
  Welford<Acc, Count> r;
  r.n = n;
  r.mean = a.mean + delta * ratio;
  r.m2 = a.m2 + b.m2 + delta * delta * static_cast<Acc>(a.n) * ratio;
  return r;
}

// Fold `cnt` (1..U) freshly loaded values into a thread's triple: the group's own mean and M2
// are exact two-pass values, then one Chan merge (one division per group, not per value).
template <int U, typename Acc>
__device__ __forceinline__ void fold_group(Welford<Acc, int>& w, const Acc (&v)[U], int cnt) {
  Acc sum = v[0];
#pragma unroll
  for (int k = 1; k < U; ++k)
    if (k < cnt) sum += v[k];
  Welford<Acc, int> g;
  g.n = cnt;
  g.mean = sum / static_cast<Acc>(cnt);
  g.m2 = Acc(0);
#pragma unroll
  for (int k = 0; k < U; ++k)
    if (k < cnt) {
      const Acc d = v[k] - g.mean;
      g.m2 += d * d;
    }
  w = chan_merge(w, g);
}

// Butterfly merge over a full warp; lane 0's result depends only on the data (fixed tree).
template <typename Acc, typename Count>
__device__ __forceinline__ Welford<Acc, Count> warp_merge(Welford<Acc, Count> w) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Welford<Acc, Count> o;
    o.n = __shfl_xor_sync(kFullMask, w.n, offset);
    o.mean = __shfl_xor_sync(kFullMask, w.mean, offset);
    o.m2 = __shfl_xor_sync(kFullMask, w.m2, offset);
    w = chan_merge(w, o);
  }
  return w;
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Merge over a 1-D block (blockDim.x a multiple of 32, at most 1024): warp shuffles, then the
// per-warp triples through shared memory, merged by warp 0 in warp order. Thread 0 returns
// the block's triple. Callers separate two uses by a __syncthreads.
template <typename Acc, typename Count>
__device__ __forceinline__ Welford<Acc, Count> block_merge(Welford<Acc, Count> w) {
  __shared__ Count s_n[32];
  __shared__ Acc s_mean[32];
  __shared__ Acc s_m2[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  w = warp_merge(w);
  if (lane == 0) {
    s_n[warp] = w.n;
    s_mean[warp] = w.mean;
    s_m2[warp] = w.m2;
  }
  __syncthreads();
  if (warp == 0) {
    Welford<Acc, Count> v = {0, Acc(0), Acc(0)};
    if (lane < warps) {
      v.n = s_n[lane];
      v.mean = s_mean[lane];
      v.m2 = s_m2[lane];
    }
    w = warp_merge(v);
  }
  return w;
}

// Sums of two values over a 1-D block (same shape rules as block_merge); thread 0 returns them.
template <typename Acc>
__device__ __forceinline__ void block_sum2(Acc& a, Acc& b) {
  __shared__ Acc s_a[32];
  __shared__ Acc s_b[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    s_a[warp] = a;
    s_b[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < warps ? s_a[lane] : Acc(0);
    b = lane < warps ? s_b[lane] : Acc(0);
    a = warp_sum(a);
    b = warp_sum(b);
  }
}

// Merge over threadIdx.y of a 2-D block of at most 256 threads (blockDim.y a power of two):
// a tree in shared memory, pairing row y with row y + half. Threads with threadIdx.y == 0
// return the triple of their column (channel). Ends with a __syncthreads.
template <typename Acc, typename Count>
__device__ __forceinline__ Welford<Acc, Count> block_merge_rows(Welford<Acc, Count> w) {
  __shared__ Count s_n[256];
  __shared__ Acc s_mean[256];
  __shared__ Acc s_m2[256];
  const int slot = threadIdx.y * blockDim.x + threadIdx.x;
  s_n[slot] = w.n;
  s_mean[slot] = w.mean;
  s_m2[slot] = w.m2;
  __syncthreads();
  for (int half = blockDim.y >> 1; half > 0; half >>= 1) {
    if (threadIdx.y < half) {
      const int other = slot + half * blockDim.x;
      Welford<Acc, Count> b;
      b.n = s_n[other];
      b.mean = s_mean[other];
      b.m2 = s_m2[other];
      w = chan_merge(w, b);
      s_n[slot] = w.n;
      s_mean[slot] = w.mean;
      s_m2[slot] = w.m2;
    }
    __syncthreads();
  }
  return w;
}

// Sums of two values over threadIdx.y, same tree as block_merge_rows; ends with a
// __syncthreads.
template <typename Acc>
__device__ __forceinline__ void block_sum2_rows(Acc& a, Acc& b) {
  __shared__ Acc s_a[256];
  __shared__ Acc s_b[256];
  const int slot = threadIdx.y * blockDim.x + threadIdx.x;
  s_a[slot] = a;
  s_b[slot] = b;
  __syncthreads();
  for (int half = blockDim.y >> 1; half > 0; half >>= 1) {
    if (threadIdx.y < half) {
      const int other = slot + half * blockDim.x;
      a += s_a[other];
      b += s_b[other];
      s_a[slot] = a;
      s_b[slot] = b;
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------ NCS tiles

// The part of channel blockIdx.x that block (blockIdx.x, blockIdx.y) covers in an (N, C, S)
// tensor: gridDim.y = row_pieces * col_pieces tiles, tile p = (p / col_pieces, p % col_pieces)
// holding rows [n0, n1) of the batch and columns [s0, s1) of the spatial axis (balanced
// splits, so tiles differ in size by at most one row / column).
struct NcsTile {
  long long base;        // offset of element (n0, c, s0)
  long long row_stride;  // C * S: distance between consecutive batch rows of one channel
  int width;             // s1 - s0
  int count;             // (n1 - n0) * width, < 2^30
};

__device__ __forceinline__ NcsTile ncs_tile(long long N, int C, long long S, int col_pieces) {
  const int row_pieces = gridDim.y / col_pieces;
  const int pr = blockIdx.y / col_pieces, pc = blockIdx.y % col_pieces;
  const long long n0 = N * pr / row_pieces, n1 = N * (pr + 1) / row_pieces;
  const long long s0 = S * pc / col_pieces, s1 = S * (pc + 1) / col_pieces;
  NcsTile t;
  t.row_stride = static_cast<long long>(C) * S;
  t.base = n0 * t.row_stride + static_cast<long long>(blockIdx.x) * S + s0;
  t.width = static_cast<int>(s1 - s0);
  t.count = static_cast<int>(n1 - n0) * t.width;
  return t;
}

// A thread's position in its tile, visiting tile elements first, first + stride, ... in
// row-major order without a division per element; offsets of type Off relative to the tile's
// base (the 16-byte packs' walks use 32-bit ones where they fit).
template <typename Off>
struct TileCursor {
  Off off;       // offset from the tile's base
  int col;       // column within the tile
  int width;
  int col_step;  // stride % width
  Off off_step;  // (stride / width) * row_stride + col_step
  Off wrap;      // row_stride - width: the extra jump when a step crosses a row end

  __device__ __forceinline__ TileCursor(const NcsTile& t, int first, int stride) {
    width = t.width;
    const int row = first / width;
    col = first - row * width;
    off = static_cast<Off>(row * t.row_stride + col);
    const int rows_per_step = stride / width;
    col_step = stride - rows_per_step * width;
    off_step = static_cast<Off>(rows_per_step * t.row_stride + col_step);
    wrap = static_cast<Off>(t.row_stride - width);
  }

  __device__ __forceinline__ void advance() {
    off += off_step;
    col += col_step;
    if (col >= width) {
      col -= width;
      off += wrap;
    }
  }
};

// The element-by-element kernels' cursor: `off` is the element offset in the tensor.
struct NcsCursor : TileCursor<long long> {
  __device__ __forceinline__ NcsCursor(const NcsTile& t, int first, int stride)
      : TileCursor<long long>(t, first, stride) {
    off += t.base;
  }
};

// ------------------------------------------------------------------ 16-byte packs

// 16 bytes of T, the unit of a 128-bit load or store: 8 __half / __nv_bfloat16, 4 float,
// 2 double.
template <typename T>
struct alignas(16) Pack {
  static constexpr int size = 16 / sizeof(T);
  T v[size];
};

// Packs each thread moves before it uses any: the elements of Unroll<T> scalar loads.
template <typename T>
struct PackUnroll {
  static constexpr int value =
      Unroll<T>::value / Pack<T>::size > 0 ? Unroll<T>::value / Pack<T>::size : 1;
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// Whether an NCS kernel may move whole packs of the (N, C, S) tensors at `a`, `b`, `c`: every
// pointer 16-byte aligned (a view may start anywhere) and S a multiple of the pack, so that
// no pack straddles two rows. The tile of a block is then the tile of the (N, C, S / size)
// tensor of packs: same rows, columns in packs. `c` may be null.
template <typename T>
__device__ __forceinline__ bool ncs_packable(long long S, const void* a, const void* b,
                                             const void* c = nullptr) {
  return S % Pack<T>::size == 0 && aligned16(a) && aligned16(b) && (c == nullptr || aligned16(c));
}

// Whether an MC kernel may move whole packs of the (M, C) tensors at `a`, `b`, `c`, `d`:
// every pointer 16-byte aligned and C a multiple of the pack, so that every row starts on a
// 16-byte boundary and no pack straddles two rows; blockDim.x (the channels of a tile, a power
// of two) holds whole packs. Null pointers are not checked.
template <typename T>
__device__ __forceinline__ bool mc_packable(int C, const void* a, const void* b,
                                            const void* c = nullptr, const void* d = nullptr) {
  constexpr int size = Pack<T>::size;
  return C % size == 0 && blockDim.x % size == 0 && aligned16(a) && aligned16(b) &&
         (c == nullptr || aligned16(c)) && (d == nullptr || aligned16(d));
}

// Whether the statistics kernels fold packs of T: 16-bit types only. There the element-by-
// element loop issues more instructions per element than HBM delivers bytes for (the kernel
// report estimates 61-73 % of an H200's peak without packs, 100 % with them); float and double
// keep the element-by-element fold, and with it their rounding (the estimate is 100 % either
// way).
template <typename T>
struct StatsPacks {
  static constexpr bool value = sizeof(T) == 2;
};

// ------------------------------------------------------------------ pack walks
//
// A packed kernel's loop: each thread visits its packs in groups of K (the packs it loads
// before it uses any) and calls `body(Count<n>{}, off)` with the n pack offsets `off[0..n)`
// of the group, relative to the block's first pack, 32-bit unless the kernel asks for 64.
// Whole groups (n = K) carry no per-lane test; the packs after the last whole group come one
// at a time (n = 1). A 32-bit walk returns false, visiting nothing, when an offset it would
// form does not fit (a block spanning 2^31 packs, 32 GiB): the caller takes its
// element-by-element path.

template <int N>
struct Count {
  static constexpr int value = N;
};

constexpr long long kInt32Span = 0x7fffffffLL;

// The packs of tile `t` (of the (N, C, S / size) tensor of packs) a thread of a 1-D block
// visits: tile elements threadIdx.x, threadIdx.x + blockDim.x, ... in row-major order.
template <int K, typename Off = int, typename Body>
__device__ __forceinline__ bool ncs_pack_walk(const NcsTile& t, Body&& body) {
  const int step = blockDim.x;
  if constexpr (sizeof(Off) < 8) {
    // rows the cursor reaches, one step past the tile's end included
    const long long rows = (t.count + (K + 1LL) * step) / t.width + 2;
    if (rows * t.row_stride >= kInt32Span) return false;
  }
  TileCursor<Off> cur(t, threadIdx.x, step);
  int i = threadIdx.x;
#pragma unroll 1
  for (; i + (K - 1) * step < t.count; i += K * step) {
    Off off[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      off[k] = cur.off;
      cur.advance();
    }
    body(Count<K>{}, off);
  }
  if constexpr (K > 1) {
#pragma unroll 1
    for (; i < t.count; i += step) {
      const Off off[1] = {cur.off};
      cur.advance();
      body(Count<1>{}, off);
    }
  }
  return true;
}

// A thread's share of an MC block in packs (bn::mc_packable): the block's threads, numbered
// t = threadIdx.y * blockDim.x + threadIdx.x, cover `lanes` = blockDim.x / size packs of each
// row of the tile (thread t takes pack column t % lanes, channels `channel`..+size) and
// rows t / lanes, t / lanes + step, ... of the block's row range, step = threads / lanes.
struct McPackShare {
  long long base;       // pack offset of the thread's column in the block's first row
  long long row_packs;  // C / size: packs per row
  int first;            // the thread's first row, relative to the block's first row
  int rows;             // rows of the block's range
  int step;             // rows per step
  int channel;          // the thread's first channel
  bool active;          // channel < C: the thread has packs to move
};

template <typename T>
__device__ __forceinline__ McPackShare mc_pack_share(long long M, int C) {
  constexpr int size = Pack<T>::size;
  const int lanes = blockDim.x / size;
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  const int col = t % lanes;
  const long long m0 = M * blockIdx.y / gridDim.y, m1 = M * (blockIdx.y + 1) / gridDim.y;
  McPackShare s;
  s.channel = blockIdx.x * blockDim.x + col * size;
  s.row_packs = C / size;
  s.base = m0 * s.row_packs + s.channel / size;
  s.first = t / lanes;
  s.rows = static_cast<int>(m1 - m0);
  s.step = blockDim.x * blockDim.y / lanes;
  s.active = s.channel < C;
  return s;
}

// The packs of an MC block a thread visits (none when !s.active). The 32-bit test is the
// same for the whole block, so either every thread walks or none does.
template <int K, typename Body>
__device__ __forceinline__ bool mc_pack_walk(const McPackShare& s, Body&& body) {
  if ((s.rows + (K + 1LL) * s.step) * s.row_packs >= kInt32Span) return false;
  if (!s.active) return true;
  const int row_packs = static_cast<int>(s.row_packs);
  const int jump = s.step * row_packs;
  int at = s.first * row_packs;
  int r = s.first;
#pragma unroll 1
  for (; r + (K - 1) * s.step < s.rows; r += K * s.step) {
    int off[K];
#pragma unroll
    for (int k = 0; k < K; ++k) off[k] = at + k * jump;
    at += K * jump;
    body(Count<K>{}, off);
  }
  if constexpr (K > 1) {
#pragma unroll 1
    for (; r < s.rows; r += s.step) {
      const int off[1] = {at};
      at += jump;
      body(Count<1>{}, off);
    }
  }
  return true;
}

// Loads the Acc values of `size` consecutive per-channel entries from `v + c`.
template <typename T, typename Acc>
__device__ __forceinline__ void load_channels(const Acc* __restrict__ v, int c,
                                              Acc (&out)[Pack<T>::size]) {
#pragma unroll
  for (int j = 0; j < Pack<T>::size; ++j) out[j] = v[c + j];
}

// The fused apply's flags (bn_fused.cu): add the residual z; take the ReLU.
constexpr int kFusedResidual = 1;
constexpr int kFusedRelu = 2;

// act(v + z) for the value `v = x * scale + shift`, `z` the residual (ignored without it).
template <typename Acc>
__device__ __forceinline__ Acc fused_output(Acc v, Acc z, int flags) {
  if (flags & kFusedResidual) v += z;
  if ((flags & kFusedRelu) && v < Acc(0)) v = Acc(0);
  return v;
}

// One step of a pack walk of the applies: the K packs of x at `off` (and of the residual z
// with kFusedResidual) become y = act(x * a[j] + b[j] + z), lane j of a pack taking a[j] and
// b[j] (one channel for all lanes in NCS, a channel per lane in MC), computed in Acc and
// rounded once. The plain applies pass flags 0 (z unread).
template <int K, typename P, typename Acc, typename Offs>
__device__ __forceinline__ void apply_packs(const P* __restrict__ xp, const P* __restrict__ zp,
                                            P* __restrict__ yp, const Offs& off,
                                            const Acc (&a)[P::size], const Acc (&b)[P::size],
                                            int flags) {
  const bool residual = (flags & kFusedResidual) != 0;
  P v[K], r[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] = xp[off[k]];
    if (residual) r[k] = zp[off[k]];
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    P o;
#pragma unroll
    for (int j = 0; j < P::size; ++j)
      store(&o.v[j], fused_output(widen(v[k].v[j]) * a[j] + b[j],
                                  residual ? widen(r[k].v[j]) : Acc(0), flags));
    yp[off[k]] = o;
  }
}

// The applies (bn_ncs_apply, and bn_ncs_apply_fused with `flags`) on 16-byte packs of an NCS
// tile (bn::ncs_packable): each thread moves PackUnroll<T> packs per step with 128-bit loads
// and stores, y = act(x * a + b + z) for the block's channel. `z` is read only with
// kFusedResidual (any valid pointer otherwise). Returns false, having done nothing, where the
// 32-bit pack walk does not fit (the caller goes element by element).
template <typename T, typename Acc>
__device__ __forceinline__ bool ncs_apply_packs(const T* __restrict__ x, const T* __restrict__ z,
                                                Acc a, Acc b, int flags, long long N, int C,
                                                long long S, int col_pieces, T* __restrict__ y) {
  using P = Pack<T>;
  const NcsTile tile = ncs_tile(N, C, S / P::size, col_pieces);
  const P* __restrict__ xp = reinterpret_cast<const P*>(x) + tile.base;
  const P* __restrict__ zp = reinterpret_cast<const P*>(z) + tile.base;
  P* __restrict__ yp = reinterpret_cast<P*>(y) + tile.base;
  Acc al[P::size], bl[P::size];
#pragma unroll
  for (int j = 0; j < P::size; ++j) {
    al[j] = a;
    bl[j] = b;
  }
  return ncs_pack_walk<PackUnroll<T>::value>(tile, [&](auto n, const auto& off) {
    apply_packs<decltype(n)::value>(xp, zp, yp, off, al, bl, flags);
  });
}

// The same for MC data (bn_mc_apply, bn_mc_apply_fused; bn::mc_packable): packs along the
// channels, a thread's group of channels with their scale and shift in registers, its packs
// `step` rows apart.
template <typename T, typename Acc>
__device__ __forceinline__ bool mc_apply_packs(const T* __restrict__ x, const T* __restrict__ z,
                                               const Acc* __restrict__ scale,
                                               const Acc* __restrict__ shift, int flags,
                                               long long M, int C, T* __restrict__ y) {
  using P = Pack<T>;
  const McPackShare s = mc_pack_share<T>(M, C);
  Acc a[P::size], b[P::size];
  if (s.active) {
    load_channels<T>(scale, s.channel, a);
    load_channels<T>(shift, s.channel, b);
  }
  const P* __restrict__ xp = reinterpret_cast<const P*>(x) + s.base;
  const P* __restrict__ zp = reinterpret_cast<const P*>(z) + s.base;
  P* __restrict__ yp = reinterpret_cast<P*>(y) + s.base;
  return mc_pack_walk<PackUnroll<T>::value>(s, [&](auto n, const auto& off) {
    apply_packs<decltype(n)::value>(xp, zp, yp, off, a, b, flags);
  });
}

// Hands NS per-channel sums of a packed MC block (bn::mc_pack_share) back to the
// element-by-element layout: each thread gives `v[k][j]`, sum k of channel `channel + j`, and
// thread (tx, ty) adds those of channel tx from rows ty * size, ty * size + 1, ... in that
// order to `out[k]`. `buf` holds 256 * size values; one sum at a time passes through it.
template <int NS, typename T, typename Acc>
__device__ __forceinline__ void mc_pack_column_sums(Acc* buf, const Acc (&v)[NS][Pack<T>::size],
                                                    Acc (&out)[NS]) {
  constexpr int size = Pack<T>::size;
  const int lanes = blockDim.x / size;
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  const int slot = (t / lanes) * blockDim.x + (t % lanes) * size;
#pragma unroll
  for (int k = 0; k < NS; ++k) {
    if (k > 0) __syncthreads();
#pragma unroll
    for (int j = 0; j < size; ++j) buf[slot + j] = v[k][j];
    __syncthreads();
#pragma unroll
    for (int i = 0; i < size; ++i)
      out[k] += buf[(threadIdx.y * size + i) * blockDim.x + threadIdx.x];
  }
}

// The Acc values of the packs `src[off[0..K)]`, pack by pack: K * size values.
template <int K, typename T, typename Acc, typename Off>
__device__ __forceinline__ void load_packs(const Pack<T>* __restrict__ src, const Off (&off)[K],
                                           Acc (&out)[K * Pack<T>::size]) {
  Pack<T> p[K];
#pragma unroll
  for (int k = 0; k < K; ++k) p[k] = src[off[k]];
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int j = 0; j < Pack<T>::size; ++j) out[k * Pack<T>::size + j] = widen(p[k].v[j]);
}

// ------------------------------------------------------------------ backward pieces

// Loads an unrolled group of U (dy, x) pairs into registers, the MC way: rows m, m + step,
// ... of one column (`base` = m * C + c), lanes at or past row `end` set to zero.
template <int U, typename T, typename Acc>
__device__ __forceinline__ void load_mc_pairs(const T* dy, const T* x, long long base,
                                              long long m, long long row_step, long long end,
                                              long long C, Acc (&g)[U], Acc (&v)[U]) {
#pragma unroll
  for (int k = 0; k < U; ++k) {
    g[k] = Acc(0);
    v[k] = Acc(0);
    if (m + k * row_step < end) {
      g[k] = widen(dy[base + k * row_step * C]);
      v[k] = widen(x[base + k * row_step * C]);
    }
  }
}

// The NCS way: tile elements i, i + step, ... at the cursor, which advances past each lane
// loaded; lanes at or past `count` set to zero.
template <int U, typename T, typename Acc>
__device__ __forceinline__ void load_ncs_pairs(const T* dy, const T* x, int i, int step,
                                               int count, NcsCursor& cur, Acc (&g)[U],
                                               Acc (&v)[U]) {
#pragma unroll
  for (int k = 0; k < U; ++k) {
    g[k] = Acc(0);
    v[k] = Acc(0);
    if (i + k * step < count) {
      g[k] = widen(dy[cur.off]);
      v[k] = widen(x[cur.off]);
      cur.advance();
    }
  }
}

// Adds the valid lanes' dy and dy * (x - mu) of an unrolled group to the running sums, lane by
// lane in order (lanes from `valid` on hold no data).
template <int U, typename Acc>
__device__ __forceinline__ void add_dy_xmu(const Acc (&g)[U], const Acc (&v)[U], Acc mu,
                                           int valid, Acc& sum_dy, Acc& sum_dy_xmu) {
  Acc group_dy = Acc(0), group_dy_xmu = Acc(0);
#pragma unroll
  for (int k = 0; k < U; ++k) {
    if (k < valid) {
      group_dy += g[k];
      group_dy_xmu += g[k] * (v[k] - mu);
    }
  }
  sum_dy += group_dy;
  sum_dy_xmu += group_dy_xmu;
}

// Per-channel coefficients of dx = p * dy + q * (x - mean) + r, computed in double:
// p = gamma * invstd, q = -p * invstd^2 * sum_dy_xmu / M, r = -p * sum_dy / M.
template <typename Acc>
struct DxCoefficients {
  Acc p, q, r;
};

template <typename Acc>
__device__ __forceinline__ DxCoefficients<Acc> dx_coefficients(
    const Acc* invstd, const Acc* gamma, const Acc* sum_dy, const Acc* sum_dy_xmu,
    long long count, int c) {
  const double is = static_cast<double>(invstd[c]);
  const double p64 = static_cast<double>(gamma[c]) * is;
  const double m = static_cast<double>(count);
  DxCoefficients<Acc> k;
  k.p = static_cast<Acc>(p64);
  k.q = static_cast<Acc>(-p64 * is * is * static_cast<double>(sum_dy_xmu[c]) / m);
  k.r = static_cast<Acc>(-p64 * static_cast<double>(sum_dy[c]) / m);
  return k;
}

// bn_ncs_apply and bn_ncs_apply_fused: y = act(x * scale[c] + shift[c] + z), the sum and the
// ReLU as `flags` ask (kFusedResidual, kFusedRelu; 0 for the plain apply, z then unread), in
// Acc and rounded once; on 16-byte packs where the pointers and S allow (ncs_packable),
// element by element otherwise.
template <typename T, typename Acc>
__device__ __forceinline__ void ncs_apply(const T* __restrict__ x, const T* __restrict__ z,
                                          const Acc* __restrict__ scale,
                                          const Acc* __restrict__ shift, int flags, long long N,
                                          int C, long long S, int col_pieces,
                                          T* __restrict__ y) {
  constexpr int U = Unroll<T>::value;
  const int step = blockDim.x;
  const Acc a = scale[blockIdx.x], b = shift[blockIdx.x];
  const bool residual = (flags & kFusedResidual) != 0;
  if (ncs_packable<T>(S, x, y, residual ? z : nullptr) &&
      ncs_apply_packs<T, Acc>(x, z, a, b, flags, N, C, S, col_pieces, y))
    return;
  const NcsTile tile = ncs_tile(N, C, S, col_pieces);
  NcsCursor cur(tile, threadIdx.x, step);
  for (int i = threadIdx.x; i < tile.count; i += U * step) {
    NcsCursor out = cur;
    Acc v[U], r[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      v[k] = Acc(0);
      r[k] = Acc(0);
      if (i + k * step < tile.count) {
        v[k] = widen(x[cur.off]);
        if (residual) r[k] = widen(z[cur.off]);
        cur.advance();
      }
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
      if (i + k * step < tile.count) {
        store(&y[out.off], fused_output(v[k] * a + b, r[k], flags));
        out.advance();
      }
    }
  }
}

}  // namespace bn
