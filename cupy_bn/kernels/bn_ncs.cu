// Batch-norm kernels for the NCS layout: x is a C-contiguous (N, C, S) tensor (channels first,
// S = product of the spatial axes).
//
// Grid: (C, P), block: 1-D, a multiple of 32 threads (the launch code uses 256). Block (c, p)
// owns tile p of channel c (bn::ncs_tile): P = row_pieces * col_pieces, so a channel is split
// over several blocks when C alone would leave SMs idle. Reductions write one partial per
// (channel, tile) to a workspace laid out [C][P]; bn_finalize.cu merges them in tile order.
//
// Tensor passes (R = one full read of a tensor, W = one full write):
//   bn_ncs_stats      R1      per-tile Welford triples (count, mean, M2) of x
//   bn_ncs_apply      R1 W1   y = x * scale[c] + shift[c]
//   bn_ncs_reduce     R2      per-tile sums of dy and dy * (x - mean[c])
//   bn_ncs_backward   R2 W1   dx = p[c] * dy + q[c] * (x - mean[c]) + r[c]
#include "bn_common.cuh"

// Per-tile statistics: Welford per thread (values folded U at a time), warp shuffles, then
// shared memory across warps. No floating-point atomics: the tree is fixed, so the partials
// are bitwise identical run to run.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_ncs_stats(const T* __restrict__ x, long long N, int C, long long S, int col_pieces,
             Acc* __restrict__ part_mean, Acc* __restrict__ part_m2,
             int* __restrict__ part_count) {
  constexpr int U = bn::Unroll<T>::value;
  const int step = blockDim.x;
  const bn::NcsTile tile = bn::ncs_tile(N, C, S, col_pieces);
  bn::NcsCursor cur(tile, threadIdx.x, step);
  bn::Welford<Acc, int> w = {0, Acc(0), Acc(0)};
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
  w = bn::block_merge(w);
  if (threadIdx.x == 0) {
    const long long slot = static_cast<long long>(blockIdx.x) * gridDim.y + blockIdx.y;
    part_mean[slot] = w.mean;
    part_m2[slot] = w.m2;
    part_count[slot] = w.n;
  }
}

// y = x * scale[c] + shift[c], computed in Acc and rounded once to T.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_ncs_apply(const T* __restrict__ x, const Acc* __restrict__ scale,
             const Acc* __restrict__ shift, long long N, int C, long long S, int col_pieces,
             T* __restrict__ y) {
  constexpr int U = bn::Unroll<T>::value;
  const int step = blockDim.x;
  const bn::NcsTile tile = bn::ncs_tile(N, C, S, col_pieces);
  const Acc a = scale[blockIdx.x], b = shift[blockIdx.x];
  bn::NcsCursor cur(tile, threadIdx.x, step);
  for (int i = threadIdx.x; i < tile.count; i += U * step) {
    bn::NcsCursor out = cur;
    Acc v[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      v[k] = Acc(0);
      if (i + k * step < tile.count) {
        v[k] = bn::widen(x[cur.off]);
        cur.advance();
      }
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
      if (i + k * step < tile.count) {
        bn::store(&y[out.off], v[k] * a + b);
        out.advance();
      }
    }
  }
}

// Per-tile sum(dy) and sum(dy * (x - mean[c])), both in one pass over dy and x.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_ncs_reduce(const T* __restrict__ dy, const T* __restrict__ x, const Acc* __restrict__ mean,
              long long N, int C, long long S, int col_pieces,
              Acc* __restrict__ part_dy, Acc* __restrict__ part_dy_xmu) {
  constexpr int U = bn::Unroll<T>::value;
  const int step = blockDim.x;
  const bn::NcsTile tile = bn::ncs_tile(N, C, S, col_pieces);
  const Acc mu = mean[blockIdx.x];
  bn::NcsCursor cur(tile, threadIdx.x, step);
  Acc sum_dy = Acc(0), sum_dy_xmu = Acc(0);
  for (int i = threadIdx.x; i < tile.count; i += U * step) {
    Acc g[U], v[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      g[k] = Acc(0);
      v[k] = Acc(0);
      if (i + k * step < tile.count) {
        g[k] = bn::widen(dy[cur.off]);
        v[k] = bn::widen(x[cur.off]);
        cur.advance();
      }
    }
    Acc group_dy = Acc(0), group_dy_xmu = Acc(0);
#pragma unroll
    for (int k = 0; k < U; ++k) {
      if (i + k * step < tile.count) {
        group_dy += g[k];
        group_dy_xmu += g[k] * (v[k] - mu);
      }
    }
    sum_dy += group_dy;
    sum_dy_xmu += group_dy_xmu;
  }
  bn::block_sum2(sum_dy, sum_dy_xmu);
  if (threadIdx.x == 0) {
    const long long slot = static_cast<long long>(blockIdx.x) * gridDim.y + blockIdx.y;
    part_dy[slot] = sum_dy;
    part_dy_xmu[slot] = sum_dy_xmu;
  }
}

// dx of training-mode batch norm: with p = gamma * invstd, q = -p * invstd^2 * sum_dy_xmu / M
// and r = -p * sum_dy / M (computed per block in double), dx = p * dy + q * (x - mean) + r.
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
  const double is = static_cast<double>(invstd[c]);
  const double p64 = static_cast<double>(gamma[c]) * is;
  const Acc p = static_cast<Acc>(p64);
  const Acc q = static_cast<Acc>(-p64 * is * is * static_cast<double>(sum_dy_xmu[c]) /
                                 static_cast<double>(count));
  const Acc r = static_cast<Acc>(-p64 * static_cast<double>(sum_dy[c]) /
                                 static_cast<double>(count));
  const Acc mu = mean[c];
  bn::NcsCursor cur(tile, threadIdx.x, step);
  for (int i = threadIdx.x; i < tile.count; i += U * step) {
    bn::NcsCursor out = cur;
    Acc g[U], v[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      g[k] = Acc(0);
      v[k] = Acc(0);
      if (i + k * step < tile.count) {
        g[k] = bn::widen(dy[cur.off]);
        v[k] = bn::widen(x[cur.off]);
        cur.advance();
      }
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
      if (i + k * step < tile.count) {
        bn::store(&dx[out.off], (g[k] * p + (v[k] - mu) * q) + r);
        out.advance();
      }
    }
  }
}
