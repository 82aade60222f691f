// Batch-norm kernels for the NCS layout: x is a C-contiguous (N, C, S) tensor (channels first,
// S = product of the spatial axes).
//
// Grid: (C, P), block: 1-D, a multiple of 32 threads (the launch code uses 256). Block (c, p)
// owns tile p of channel c (bn::ncs_tile): P = row_pieces * col_pieces, so a channel is split
// over several blocks when C alone would leave SMs idle. The reductions finish in the same
// launch: with P > 1 each block writes a partial to a [C][P] workspace and the last block of
// the channel to arrive merges the P partials in tile order (bn_finalize.cuh).
//
// Tensor passes (R = one full read of a tensor, W = one full write), one launch each:
//   bn_ncs_stats      R1      per-channel mean, var (+ invstd, scale, shift, running stats)
//   bn_ncs_apply      R1 W1   y = x * scale[c] + shift[c]
//   bn_ncs_reduce     R2      per-channel sum(dy), sum(dy * (x - mean[c]))
//   bn_ncs_backward   R2 W1   dx = p[c] * dy + q[c] * (x - mean[c]) + r[c]
#include "bn_common.cuh"
#include "bn_finalize.cuh"

// The per-thread loads of bn_ncs_stats on 16-byte packs (bn::ncs_packable; 16-bit types,
// bn::StatsPacks): each group of PackUnroll<T> packs (U values) is folded into `w` at once, a
// last single pack on its own.
template <typename T, typename Acc>
__device__ __forceinline__ bool ncs_stats_packs(const T* __restrict__ x, long long N, int C,
                                                long long S, int col_pieces,
                                                bn::Welford<Acc, int>& w) {
  using P = bn::Pack<T>;
  const bn::NcsTile tile = bn::ncs_tile(N, C, S / P::size, col_pieces);
  const P* __restrict__ xp = reinterpret_cast<const P*>(x) + tile.base;
  return bn::ncs_pack_walk<bn::PackUnroll<T>::value>(tile, [&](auto n, const auto& off) {
    constexpr int K = decltype(n)::value;
    Acc v[K * P::size];
    bn::load_packs<K, T>(xp, off, v);
    bn::fold_group<K * P::size>(w, v, K * P::size);
  });
}

// Statistics: Welford per thread (values folded U at a time), warp shuffles, shared memory
// across warps, then the fixed-order cross-block merge. No floating-point atomics: results are
// bitwise identical run to run. `sync`: C channel counters, done, bad (see bn_finalize.cuh);
// `flags`: BN_AFFINE, BN_WEIGHT, BN_BIAS, BN_RUNNING select the fused per-channel outputs.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_ncs_stats(const T* __restrict__ x, long long N, int C, long long S, int col_pieces,
             Acc* __restrict__ part_mean, Acc* __restrict__ part_m2,
             int* __restrict__ part_count, int* __restrict__ sync, int flags,
             const Acc* __restrict__ weight, const Acc* __restrict__ bias, Acc eps,
             double momentum, double unbias, Acc* __restrict__ mean, Acc* __restrict__ var,
             Acc* __restrict__ invstd, Acc* __restrict__ scale, Acc* __restrict__ shift,
             Acc* __restrict__ running_mean, Acc* __restrict__ running_var,
             Acc* __restrict__ running_backup) {
  constexpr int U = bn::Unroll<T>::value;
  const int step = blockDim.x;
  bn::Welford<Acc, int> w = {0, Acc(0), Acc(0)};
  if (!(bn::StatsPacks<T>::value && bn::ncs_packable<T>(S, x, x) &&
        ncs_stats_packs<T, Acc>(x, N, C, S, col_pieces, w))) {
    const bn::NcsTile tile = bn::ncs_tile(N, C, S, col_pieces);
    bn::NcsCursor cur(tile, threadIdx.x, step);
    for (int i = threadIdx.x; i < tile.count; i += U * step) {
      Acc v[U];
      int cnt = 0;
#pragma unroll
      for (int k = 0; k < U; ++k) {
        v[k] = Acc(0);
        if (i + k * step < tile.count) {
          v[k] = bn::widen(x[cur.off]);
          cur.advance();
          ++cnt;
        }
      }
      bn::fold_group<U>(w, v, cnt);
    }
  }
  w = bn::block_merge(w);

  const int c = blockIdx.x, P = gridDim.y;
  bn::Welford<Acc, long long> total = {w.n, w.mean, w.m2};  // valid in thread 0
  if (P > 1) {
    const long long base = static_cast<long long>(c) * P;
    if (threadIdx.x == 0) {
      part_mean[base + blockIdx.y] = w.mean;
      part_m2[base + blockIdx.y] = w.m2;
      part_count[base + blockIdx.y] = w.n;
    }
    if (!bn::arrive_last(&sync[c], P)) return;
    total = bn::merge_partials<4>(part_mean, part_m2, part_count, base, threadIdx.x, P, step);
    total = bn::block_merge(total);
  }
  const bn::StatsOutputs<Acc> out = {flags,  C,      weight, bias,   eps,
                                     momentum, unbias, mean, var, invstd,
                                     scale,  shift,  running_mean, running_var,
                                     running_backup};
  const int bad = threadIdx.x == 0 ? bn::write_channel_stats(out, c, total) : 0;
  if (flags & BN_RUNNING)  // done, bad follow the C channel counters
    bn::update_running_if_last(out, &sync[C], &sync[C + 1], C, bad, C);
}

// y = x * scale[c] + shift[c], computed in Acc and rounded once to T (bn::ncs_apply).
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_ncs_apply(const T* __restrict__ x, const Acc* __restrict__ scale,
             const Acc* __restrict__ shift, long long N, int C, long long S, int col_pieces,
             T* __restrict__ y) {
  bn::ncs_apply<T, Acc>(x, x, scale, shift, 0, N, C, S, col_pieces, y);
}

// The per-thread sums of bn_ncs_reduce on 16-byte packs of dy and x (bn::ncs_packable), a
// group of PackUnroll<T> packs (U pairs) at a time.
template <typename T, typename Acc>
__device__ __forceinline__ bool ncs_reduce_packs(const T* __restrict__ dy,
                                                 const T* __restrict__ x, Acc mu, long long N,
                                                 int C, long long S, int col_pieces,
                                                 Acc& sum_dy, Acc& sum_dy_xmu) {
  using P = bn::Pack<T>;
  const bn::NcsTile tile = bn::ncs_tile(N, C, S / P::size, col_pieces);
  const P* __restrict__ gp = reinterpret_cast<const P*>(dy) + tile.base;
  const P* __restrict__ xp = reinterpret_cast<const P*>(x) + tile.base;
  return bn::ncs_pack_walk<bn::PackUnroll<T>::value>(tile, [&](auto n, const auto& off) {
    constexpr int K = decltype(n)::value;
    Acc g[K * P::size], v[K * P::size];
    bn::load_packs<K, T>(gp, off, g);
    bn::load_packs<K, T>(xp, off, v);
    bn::add_dy_xmu(g, v, mu, K * P::size, sum_dy, sum_dy_xmu);
  });
}

// sum(dy) and sum(dy * (x - mean[c])) per channel, both in one pass over dy and x, merged
// across blocks like the statistics (`sync`: C channel counters).
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_ncs_reduce(const T* __restrict__ dy, const T* __restrict__ x, const Acc* __restrict__ mean,
              long long N, int C, long long S, int col_pieces,
              Acc* __restrict__ part_dy, Acc* __restrict__ part_dy_xmu, int* __restrict__ sync,
              Acc* __restrict__ out_dy, Acc* __restrict__ out_dy_xmu) {
  constexpr int U = bn::Unroll<T>::value;
  const int step = blockDim.x;
  const Acc mu = mean[blockIdx.x];
  Acc sum_dy = Acc(0), sum_dy_xmu = Acc(0);
  if (!(bn::ncs_packable<T>(S, dy, x) &&
        ncs_reduce_packs<T, Acc>(dy, x, mu, N, C, S, col_pieces, sum_dy, sum_dy_xmu))) {
    const bn::NcsTile tile = bn::ncs_tile(N, C, S, col_pieces);
    bn::NcsCursor cur(tile, threadIdx.x, step);
    for (int i = threadIdx.x; i < tile.count; i += U * step) {
      Acc g[U], v[U];
      bn::load_ncs_pairs(dy, x, i, step, tile.count, cur, g, v);
      bn::add_dy_xmu(g, v, mu, (tile.count - i + step - 1) / step, sum_dy, sum_dy_xmu);
    }
  }
  bn::block_sum2(sum_dy, sum_dy_xmu);

  const int c = blockIdx.x, P = gridDim.y;
  if (P > 1) {
    const long long base = static_cast<long long>(c) * P;
    if (threadIdx.x == 0) {
      part_dy[base + blockIdx.y] = sum_dy;
      part_dy_xmu[base + blockIdx.y] = sum_dy_xmu;
    }
    if (!bn::arrive_last(&sync[c], P)) return;
    bn::sum_partials<4>(part_dy, part_dy_xmu, base, threadIdx.x, P, step, sum_dy, sum_dy_xmu);
    bn::block_sum2(sum_dy, sum_dy_xmu);
  }
  if (threadIdx.x == 0) {
    out_dy[c] = sum_dy;
    out_dy_xmu[c] = sum_dy_xmu;
  }
}

// bn_ncs_backward on 16-byte packs of dy, x and dx (bn::ncs_packable), as bn::ncs_apply_packs.
template <typename T, typename Acc>
__device__ __forceinline__ bool ncs_backward_packs(const T* __restrict__ dy,
                                                   const T* __restrict__ x, Acc p, Acc q, Acc r,
                                                   Acc mu, long long N, int C, long long S,
                                                   int col_pieces, T* __restrict__ dx) {
  using P = bn::Pack<T>;
  // one pack of each tensor in flight for double: two would take sm_80 past 48 registers
  constexpr int K = sizeof(T) >= 8 ? 1 : bn::PackUnroll<T>::value;
  // 64-bit offsets: with 32-bit ones ptxas gives the float instantiation 64 registers on
  // sm_100 (and spills it when bounded to 48)
  const bn::NcsTile tile = bn::ncs_tile(N, C, S / P::size, col_pieces);
  const P* __restrict__ gp = reinterpret_cast<const P*>(dy) + tile.base;
  const P* __restrict__ xp = reinterpret_cast<const P*>(x) + tile.base;
  P* __restrict__ dxp = reinterpret_cast<P*>(dx) + tile.base;
  return bn::ncs_pack_walk<K, long long>(tile, [&](auto n, const auto& off) {
    constexpr int G = decltype(n)::value;
    P g[G], v[G];
#pragma unroll
    for (int k = 0; k < G; ++k) {
      g[k] = gp[off[k]];
      v[k] = xp[off[k]];
    }
#pragma unroll
    for (int k = 0; k < G; ++k) {
      P o;
#pragma unroll
      for (int j = 0; j < P::size; ++j)
        bn::store(&o.v[j], (bn::widen(g[k].v[j]) * p + (bn::widen(v[k].v[j]) - mu) * q) + r);
      dxp[off[k]] = o;
    }
  });
}

// dx of training-mode batch norm: with p = gamma * invstd, q = -p * invstd^2 * sum_dy_xmu / M
// and r = -p * sum_dy / M (computed per block in double), dx = p * dy + q * (x - mean) + r;
// on 16-byte packs where the pointers and S allow (bn::ncs_packable).
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_ncs_backward(const T* __restrict__ dy, const T* __restrict__ x, const Acc* __restrict__ mean,
                const Acc* __restrict__ invstd, const Acc* __restrict__ gamma,
                const Acc* __restrict__ sum_dy, const Acc* __restrict__ sum_dy_xmu,
                long long count, long long N, int C, long long S, int col_pieces,
                T* __restrict__ dx) {
  constexpr int U = bn::Unroll<T>::value;
  const int step = blockDim.x;
  const bn::NcsTile tile = bn::ncs_tile(N, C, S, col_pieces);
  const int c = blockIdx.x;
  const bn::DxCoefficients<Acc> k_dx =
      bn::dx_coefficients(invstd, gamma, sum_dy, sum_dy_xmu, count, c);
  const Acc p = k_dx.p, q = k_dx.q, r = k_dx.r;
  const Acc mu = mean[c];
  if (bn::ncs_packable<T>(S, dy, x, dx) &&
      ncs_backward_packs<T, Acc>(dy, x, p, q, r, mu, N, C, S, col_pieces, dx))
    return;
  bn::NcsCursor cur(tile, threadIdx.x, step);
  for (int i = threadIdx.x; i < tile.count; i += U * step) {
    bn::NcsCursor out = cur;
    Acc g[U], v[U];
    bn::load_ncs_pairs(dy, x, i, step, tile.count, cur, g, v);
#pragma unroll
    for (int k = 0; k < U; ++k) {
      if (i + k * step < tile.count) {
        bn::store(&dx[out.off], (g[k] * p + (v[k] - mu) * q) + r);
        out.advance();
      }
    }
  }
}
