// Double backward of batch norm, both layouts: the gradients (gx, gdy) of the backward's
// outputs with respect to x and dy, given the cotangent ddx of dx (and, through the per-channel
// coefficients, those of dweight and dbias). The formulas are in cupy_bn/backends/base.py.
//
// NCS kernels: grid (C, P), 1-D blocks, tiles and cursor as in bn_ncs.cu. MC kernels: grid
// (ceil(C / bx), P), blocks (bx, by), rows and the two-level merge as in bn_mc.cu. The
// reductions finish in the same launch with the fixed-order last-block merge of
// bn_finalize.cuh; partials are laid out [K][C][P] (K = 5 sums), MC group partials [K][C][G].
//
// Tensor passes (R = one full read of a tensor, W = one full write), one launch each:
//   bn_{ncs,mc}_double_backward_reduce  R3     per-channel sum(dy), sum(dy * (x - mean)),
//                                               sum(ddx), sum(ddx * (x - mean)), sum(ddx * dy)
//   bn_{ncs,mc}_double_backward_apply   R3 W2  gx = k0 * dy + k1 * ddx + k2 * (x - mean) + k3,
//                                               gdy = k4 * ddx + k0 * (x - mean) + k5
//                                               (R2 W2 without ddx: with_ddx = 0)
// `k` is the [6][C] coefficient array (DoubleBackwardCoefficients' fields in order), computed
// in double on the host side and passed in Acc.
#include "bn_common.cuh"
#include "bn_finalize.cuh"
#include "bn_mc_layout.cuh"

namespace bn {

// The per-channel sums of the reduction: dy, dy * (x - mean), ddx, ddx * (x - mean), ddx * dy.
constexpr int kDoubleBackwardSums = 5;

// Sums of K values per thread over a 1-D block (blockDim.x a multiple of 32, at most 1024):
// warp shuffles, then the per-warp sums through shared memory, added by warp 0 in warp order.
// Thread 0 returns them. Callers separate two uses by a __syncthreads.
template <int K, typename Acc>
__device__ __forceinline__ void block_sums(Acc (&v)[K]) {
  __shared__ Acc s_v[K][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) s_v[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = warp_sum(lane < warps ? s_v[k][lane] : Acc(0));
  }
}

// Sums of K values over threadIdx.y of a 2-D block of at most 256 threads (blockDim.y a power
// of two), the tree of block_merge_rows; threads with threadIdx.y == 0 return their column's
// sums. Ends with a __syncthreads.
template <int K, typename Acc>
__device__ __forceinline__ void block_sums_rows(Acc (&v)[K]) {
  __shared__ Acc s_v[K][256];
  const int slot = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int k = 0; k < K; ++k) s_v[k][slot] = v[k];
  __syncthreads();
  for (int half = blockDim.y >> 1; half > 0; half >>= 1) {
    if (threadIdx.y < half) {
      const int other = slot + half * blockDim.x;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        v[k] += s_v[k][other];
        s_v[k][slot] = v[k];
      }
    }
    __syncthreads();
  }
}

// Sums of the partials part[k * stride + row + p] for p = first, first + step, ... < end, in
// that order, L partials of each sum loaded before any is added.
template <int L, int K, typename Acc>
__device__ __forceinline__ void sum_partials_k(const Acc* part, long long stride, long long row,
                                               int first, int end, int step, Acc (&v)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = Acc(0);
  for (int p = first; p < end; p += L * step) {
    Acc loaded[L][K];
#pragma unroll
    for (int l = 0; l < L; ++l) {
#pragma unroll
      for (int k = 0; k < K; ++k)
        loaded[l][k] = p + l * step < end ? __ldcg(part + k * stride + row + p + l * step) : Acc(0);
    }
#pragma unroll
    for (int l = 0; l < L; ++l) {
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] += loaded[l][k];
    }
  }
}

// Loads an unrolled group of U (dy, x, ddx) triples, the NCS way (tile elements i, i + step,
// ... at the cursor, which advances past each lane loaded); lanes at or past `count` and, when
// !with_ddx, every ddx are zero.
template <int U, typename T, typename Acc>
__device__ __forceinline__ void load_ncs_triples(const T* dy, const T* x, const T* ddx,
                                                 bool with_ddx, int i, int step, int count,
                                                 NcsCursor& cur, Acc (&g)[U], Acc (&v)[U],
                                                 Acc (&h)[U]) {
#pragma unroll
  for (int k = 0; k < U; ++k) {
    g[k] = Acc(0);
    v[k] = Acc(0);
    h[k] = Acc(0);
    if (i + k * step < count) {
      g[k] = widen(dy[cur.off]);
      v[k] = widen(x[cur.off]);
      if (with_ddx) h[k] = widen(ddx[cur.off]);
      cur.advance();
    }
  }
}

// The MC way: rows m, m + row_step, ... of one column (`base` = m * C + c), lanes at or past
// row `end` zero.
template <int U, typename T, typename Acc>
__device__ __forceinline__ void load_mc_triples(const T* dy, const T* x, const T* ddx,
                                                bool with_ddx, long long base, long long m,
                                                long long row_step, long long end, long long C,
                                                Acc (&g)[U], Acc (&v)[U], Acc (&h)[U]) {
#pragma unroll
  for (int k = 0; k < U; ++k) {
    g[k] = Acc(0);
    v[k] = Acc(0);
    h[k] = Acc(0);
    if (m + k * row_step < end) {
      const long long at = base + k * row_step * C;
      g[k] = widen(dy[at]);
      v[k] = widen(x[at]);
      if (with_ddx) h[k] = widen(ddx[at]);
    }
  }
}

// Adds the valid lanes' five terms of an unrolled group to the running sums, lane by lane in
// order; x - mu is formed before any product.
template <int U, typename Acc>
__device__ __forceinline__ void add_double_backward_terms(const Acc (&g)[U], const Acc (&v)[U],
                                                          const Acc (&h)[U], Acc mu, int valid,
                                                          Acc (&sums)[kDoubleBackwardSums]) {
  Acc group[kDoubleBackwardSums] = {Acc(0), Acc(0), Acc(0), Acc(0), Acc(0)};
#pragma unroll
  for (int k = 0; k < U; ++k) {
    if (k < valid) {
      const Acc xmu = v[k] - mu;
      group[0] += g[k];
      group[1] += g[k] * xmu;
      group[2] += h[k];
      group[3] += h[k] * xmu;
      group[4] += h[k] * g[k];
    }
  }
#pragma unroll
  for (int k = 0; k < kDoubleBackwardSums; ++k) sums[k] += group[k];
}

// Channel c's coefficients from the [6][C] array; the ddx terms are zero without ddx.
template <typename Acc>
struct DoubleBackwardCoefficients {
  Acc gx_dy, gx_ddx, gx_xmu, gx_one, gdy_ddx, gdy_one;
};

template <typename Acc>
__device__ __forceinline__ DoubleBackwardCoefficients<Acc> double_backward_coefficients(
    const Acc* coef, int C, int c, bool with_ddx) {
  DoubleBackwardCoefficients<Acc> k;
  k.gx_dy = coef[c];
  k.gx_ddx = with_ddx ? coef[C + c] : Acc(0);
  k.gx_xmu = coef[2 * C + c];
  k.gx_one = coef[3 * C + c];
  k.gdy_ddx = with_ddx ? coef[4 * C + c] : Acc(0);
  k.gdy_one = coef[5 * C + c];
  return k;
}

// gx and gdy of one element, in Acc, with the NumPy backend's association.
template <typename T, typename Acc>
__device__ __forceinline__ void store_double_backward(const DoubleBackwardCoefficients<Acc>& k,
                                                      Acc g, Acc v, Acc h, Acc mu, T* gx,
                                                      T* gdy) {
  const Acc xmu = v - mu;
  store(gx, ((k.gx_dy * g + k.gx_ddx * h) + k.gx_xmu * xmu) + k.gx_one);
  store(gdy, (k.gdy_ddx * h + k.gx_dy * xmu) + k.gdy_one);
}

}  // namespace bn

// The per-thread sums of bn_ncs_double_backward_reduce on 16-byte packs of dy, x and ddx
// (bn::ncs_packable), one pack of each per step.
template <typename T, typename Acc>
__device__ __forceinline__ bool ncs_double_backward_reduce_packs(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ ddx, Acc mu,
    long long N, int C, long long S, int col_pieces, Acc (&s)[bn::kDoubleBackwardSums]) {
  using P = bn::Pack<T>;
  const bn::NcsTile tile = bn::ncs_tile(N, C, S / P::size, col_pieces);
  const P* __restrict__ gp = reinterpret_cast<const P*>(dy) + tile.base;
  const P* __restrict__ xp = reinterpret_cast<const P*>(x) + tile.base;
  const P* __restrict__ hp = reinterpret_cast<const P*>(ddx) + tile.base;
  return bn::ncs_pack_walk<1>(tile, [&](auto, const auto& off) {
    Acc g[P::size], v[P::size], h[P::size];
    bn::load_packs<1, T>(gp, off, g);
    bn::load_packs<1, T>(xp, off, v);
    bn::load_packs<1, T>(hp, off, h);
    bn::add_double_backward_terms(g, v, h, mu, P::size, s);
  });
}

// The five per-channel sums in one pass over dy, x and ddx, merged across blocks like
// bn_ncs_reduce (`sync`: C channel counters). `sums`: [5][C].
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_ncs_double_backward_reduce(const T* __restrict__ dy, const T* __restrict__ x,
                              const T* __restrict__ ddx, const Acc* __restrict__ mean,
                              long long N, int C, long long S, int col_pieces,
                              Acc* __restrict__ part, int* __restrict__ sync,
                              Acc* __restrict__ sums) {
  constexpr int U = bn::Unroll<T>::value;
  constexpr int K = bn::kDoubleBackwardSums;
  const int step = blockDim.x;
  const Acc mu = mean[blockIdx.x];
  Acc s[K] = {Acc(0), Acc(0), Acc(0), Acc(0), Acc(0)};
  if (!(bn::ncs_packable<T>(S, dy, x, ddx) &&
        ncs_double_backward_reduce_packs<T, Acc>(dy, x, ddx, mu, N, C, S, col_pieces, s))) {
    const bn::NcsTile tile = bn::ncs_tile(N, C, S, col_pieces);
    bn::NcsCursor cur(tile, threadIdx.x, step);
    for (int i = threadIdx.x; i < tile.count; i += U * step) {
      Acc g[U], v[U], h[U];
      bn::load_ncs_triples(dy, x, ddx, true, i, step, tile.count, cur, g, v, h);
      bn::add_double_backward_terms(g, v, h, mu, (tile.count - i + step - 1) / step, s);
    }
  }
  bn::block_sums(s);

  const int c = blockIdx.x, P = gridDim.y;
  if (P > 1) {
    const long long slots = static_cast<long long>(C) * P;
    const long long base = static_cast<long long>(c) * P;
    if (threadIdx.x == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) part[k * slots + base + blockIdx.y] = s[k];
    }
    if (!bn::arrive_last(&sync[c], P)) return;
    bn::sum_partials_k<4>(part, slots, base, threadIdx.x, P, step, s);
    bn::block_sums(s);
  }
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) sums[k * C + c] = s[k];
  }
}

// bn_ncs_double_backward_apply on 16-byte packs of dy, x, ddx, gx and gdy (bn::ncs_packable):
// one pack of each tensor per step.
template <typename T, typename Acc>
__device__ __forceinline__ bool ncs_double_backward_apply_packs(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ ddx, bool with_ddx,
    const bn::DoubleBackwardCoefficients<Acc>& k, Acc mu, long long N, int C, long long S,
    int col_pieces, T* __restrict__ gx, T* __restrict__ gdy) {
  using P = bn::Pack<T>;
  const bn::NcsTile tile = bn::ncs_tile(N, C, S / P::size, col_pieces);
  const P* __restrict__ gp = reinterpret_cast<const P*>(dy) + tile.base;
  const P* __restrict__ xp = reinterpret_cast<const P*>(x) + tile.base;
  const P* __restrict__ hp = reinterpret_cast<const P*>(ddx) + tile.base;
  P* __restrict__ gxp = reinterpret_cast<P*>(gx) + tile.base;
  P* __restrict__ gdyp = reinterpret_cast<P*>(gdy) + tile.base;
  return bn::ncs_pack_walk<1>(tile, [&](auto, const auto& off) {
    const P g = gp[off[0]], v = xp[off[0]];
    P h;
    if (with_ddx) h = hp[off[0]];
    P o1, o2;
#pragma unroll
    for (int j = 0; j < P::size; ++j)
      bn::store_double_backward(k, bn::widen(g.v[j]), bn::widen(v.v[j]),
                                with_ddx ? bn::widen(h.v[j]) : Acc(0), mu, &o1.v[j], &o2.v[j]);
    gxp[off[0]] = o1;
    gdyp[off[0]] = o2;
  });
}

// gx and gdy in one pass; ddx is read only when with_ddx != 0. On 16-byte packs where the
// pointers and S allow (bn::ncs_packable).
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_ncs_double_backward_apply(const T* __restrict__ dy, const T* __restrict__ x,
                             const T* __restrict__ ddx, int with_ddx,
                             const Acc* __restrict__ mean, const Acc* __restrict__ coef,
                             long long N, int C, long long S, int col_pieces,
                             T* __restrict__ gx, T* __restrict__ gdy) {
  constexpr int U = bn::Unroll<T>::value;
  const int step = blockDim.x;
  const int c = blockIdx.x;
  const bn::DoubleBackwardCoefficients<Acc> k =
      bn::double_backward_coefficients(coef, C, c, with_ddx != 0);
  const Acc mu = mean[c];
  if (bn::ncs_packable<T>(S, dy, x, with_ddx ? ddx : nullptr) && bn::aligned16(gx) &&
      bn::aligned16(gdy) &&
      ncs_double_backward_apply_packs<T, Acc>(dy, x, ddx, with_ddx != 0, k, mu, N, C, S,
                                              col_pieces, gx, gdy))
    return;
  const bn::NcsTile tile = bn::ncs_tile(N, C, S, col_pieces);
  bn::NcsCursor cur(tile, threadIdx.x, step);
  for (int i = threadIdx.x; i < tile.count; i += U * step) {
    bn::NcsCursor out = cur;
    Acc g[U], v[U], h[U];
    bn::load_ncs_triples(dy, x, ddx, with_ddx != 0, i, step, tile.count, cur, g, v, h);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (i + u * step < tile.count) {
        bn::store_double_backward(k, g[u], v[u], h[u], mu, &gx[out.off], &gdy[out.off]);
        out.advance();
      }
    }
  }
}

// The five per-channel sums, merged across blocks in bn_mc_reduce's two levels.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_mc_double_backward_reduce(const T* __restrict__ dy, const T* __restrict__ x,
                             const T* __restrict__ ddx, const Acc* __restrict__ mean,
                             long long M, int C, int group, Acc* __restrict__ part,
                             Acc* __restrict__ group_part, int* __restrict__ sync,
                             Acc* __restrict__ sums) {
  constexpr int U = bn::Unroll<T>::value;
  constexpr int K = bn::kDoubleBackwardSums;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const bn::McRows rows = bn::mc_rows(M);
  const long long row_step = blockDim.y;
  Acc s[K] = {Acc(0), Acc(0), Acc(0), Acc(0), Acc(0)};
  if (c < C) {
    const Acc mu = mean[c];
    for (long long m = rows.first; m < rows.end; m += U * row_step) {
      Acc g[U], v[U], h[U];
      bn::load_mc_triples(dy, x, ddx, true, m * C + c, m, row_step, rows.end,
                          static_cast<long long>(C), g, v, h);
      const long long left = (rows.end - m + row_step - 1) / row_step;
      bn::add_double_backward_terms(g, v, h, mu, static_cast<int>(left < U ? left : U), s);
    }
  }
  bn::block_sums_rows(s);

  const int P = gridDim.y;
  if (P > 1) {
    const bn::McSync sy = bn::mc_sync(sync, group);
    const long long slots = static_cast<long long>(C) * P;
    const long long base = static_cast<long long>(c) * P;
    if (threadIdx.y == 0 && c < C) {
#pragma unroll
      for (int k = 0; k < K; ++k) part[k * slots + base + blockIdx.y] = s[k];
    }
    if (!bn::arrive_last(sy.group_counter, sy.end - sy.first)) return;
#pragma unroll
    for (int k = 0; k < K; ++k) s[k] = Acc(0);
    if (c < C)
      bn::sum_partials_k<4>(part, slots, base, sy.first + threadIdx.y, sy.end, blockDim.y, s);
    bn::block_sums_rows(s);
    if (sy.groups > 1) {
      const long long group_slots = static_cast<long long>(C) * sy.groups;
      const long long gbase = static_cast<long long>(c) * sy.groups;
      if (threadIdx.y == 0 && c < C) {
#pragma unroll
        for (int k = 0; k < K; ++k) group_part[k * group_slots + gbase + blockIdx.y / group] = s[k];
      }
      if (!bn::arrive_last(sy.tile_counter, sy.groups)) return;
#pragma unroll
      for (int k = 0; k < K; ++k) s[k] = Acc(0);
      if (c < C)
        bn::sum_partials_k<4>(group_part, group_slots, gbase, threadIdx.y, sy.groups,
                              blockDim.y, s);
      bn::block_sums_rows(s);
    }
  }
  if (threadIdx.y == 0 && c < C) {
#pragma unroll
    for (int k = 0; k < K; ++k) sums[k * C + c] = s[k];
  }
}

// bn_mc_double_backward_apply on 16-byte packs along the channels (bn::mc_packable), as
// bn_mc.cu's mc_backward_packs: the tile's six coefficients and mean sit in shared memory.
template <typename T, typename Acc>
__device__ __forceinline__ bool mc_double_backward_apply_packs(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ ddx, bool with_ddx,
    const Acc* __restrict__ mean, const Acc* __restrict__ coef, long long M, int C,
    T* __restrict__ gx, T* __restrict__ gdy) {
  using P = bn::Pack<T>;
  // [field][channel]: gx_dy, gx_ddx, gx_xmu, gx_one, gdy_ddx, gdy_one, mean; read through a
  // volatile pointer with each pack, so that the compiler does not hoist 7 * size of them
  // into registers (73 for float on sm_100)
  __shared__ Acc s_k[7][32];
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  const int c = blockIdx.x * blockDim.x + t;
  if (t < blockDim.x && c < C) {
    const bn::DoubleBackwardCoefficients<Acc> k =
        bn::double_backward_coefficients(coef, C, c, with_ddx);
    s_k[0][t] = k.gx_dy;
    s_k[1][t] = k.gx_ddx;
    s_k[2][t] = k.gx_xmu;
    s_k[3][t] = k.gx_one;
    s_k[4][t] = k.gdy_ddx;
    s_k[5][t] = k.gdy_one;
    s_k[6][t] = mean[c];
  }
  __syncthreads();
  const bn::McPackShare s = bn::mc_pack_share<T>(M, C);
  const volatile Acc* sk = &s_k[0][s.channel - blockIdx.x * blockDim.x];
  const P* __restrict__ gp = reinterpret_cast<const P*>(dy) + s.base;
  const P* __restrict__ xp = reinterpret_cast<const P*>(x) + s.base;
  const P* __restrict__ hp = reinterpret_cast<const P*>(ddx) + s.base;
  P* __restrict__ gxp = reinterpret_cast<P*>(gx) + s.base;
  P* __restrict__ gdyp = reinterpret_cast<P*>(gdy) + s.base;
  return bn::mc_pack_walk<1>(s, [&](auto, const auto& off) {
    const P g = gp[off[0]], v = xp[off[0]];
    P h;
    if (with_ddx) h = hp[off[0]];
    // gx, then gdy: one output pack and the coefficients of one formula live at a time
    P o;
#pragma unroll
    for (int j = 0; j < P::size; ++j) {
      const Acc xmu = bn::widen(v.v[j]) - sk[192 + j];
      const Acc hj = with_ddx ? bn::widen(h.v[j]) : Acc(0);
      bn::store(&o.v[j],
                ((sk[j] * bn::widen(g.v[j]) + sk[32 + j] * hj) + sk[64 + j] * xmu) + sk[96 + j]);
    }
    gxp[off[0]] = o;
#pragma unroll
    for (int j = 0; j < P::size; ++j) {
      const Acc xmu = bn::widen(v.v[j]) - sk[192 + j];
      const Acc hj = with_ddx ? bn::widen(h.v[j]) : Acc(0);
      bn::store(&o.v[j], (sk[128 + j] * hj + sk[j] * xmu) + sk[160 + j]);
    }
    gdyp[off[0]] = o;
  });
}

// gx and gdy in one pass, coefficients as in bn_ncs_double_backward_apply; on 16-byte packs
// where the pointers and C allow (bn::mc_packable). Four resident blocks asked of ptxas (64
// registers): left to itself, ptxas 13.5 gives the packed kernel up to 73 on sm_100.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256, 4)
bn_mc_double_backward_apply(const T* __restrict__ dy, const T* __restrict__ x,
                            const T* __restrict__ ddx, int with_ddx,
                            const Acc* __restrict__ mean, const Acc* __restrict__ coef,
                            long long M, int C, T* __restrict__ gx, T* __restrict__ gdy) {
  constexpr int U = bn::Unroll<T>::value;
  if (bn::mc_packable<T>(C, dy, x, gx, gdy) && (!with_ddx || bn::aligned16(ddx)) &&
      mc_double_backward_apply_packs<T, Acc>(dy, x, ddx, with_ddx != 0, mean, coef, M, C, gx,
                                             gdy))
    return;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const bn::McRows rows = bn::mc_rows(M);
  const long long row_step = blockDim.y;
  const bn::DoubleBackwardCoefficients<Acc> k =
      bn::double_backward_coefficients(coef, C, c, with_ddx != 0);
  const Acc mu = mean[c];
  for (long long m = rows.first; m < rows.end; m += U * row_step) {
    const long long base = m * C + c;
    Acc g[U], v[U], h[U];
    bn::load_mc_triples(dy, x, ddx, with_ddx != 0, base, m, row_step, rows.end,
                        static_cast<long long>(C), g, v, h);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (m + u * row_step < rows.end) {
        const long long at = base + u * row_step * C;
        bn::store_double_backward(k, g[u], v[u], h[u], mu, &gx[at], &gdy[at]);
      }
    }
  }
}
