// Batch-norm kernels for the MC layout: x is a C-contiguous (M, C) tensor (channels last:
// NHWC and dense (N, C) input).
//
// Grid: (ceil(C / bx), P), block: (bx, by) with bx * by <= 256 and by a power of two. Threads
// run along C, so a warp reads consecutive channels of a row (coalesced); thread (tx, ty) of
// block (cb, p) owns channel cb * bx + tx and rows m0 + ty, m0 + ty + by, ... of the row range
// [m0, m1) = [M * p / P, M * (p + 1) / P). Reductions merge a block's rows in shared memory and
// write one partial per (channel, row range) to a workspace laid out [C][P]; bn_finalize.cu
// merges them in row-range order.
//
// Tensor passes (R = one full read of a tensor, W = one full write):
//   bn_mc_stats      R1      per-range Welford triples (count, mean, M2) of x
//   bn_mc_apply      R1 W1   y = x * scale[c] + shift[c]
//   bn_mc_reduce     R2      per-range sums of dy and dy * (x - mean[c])
//   bn_mc_backward   R2 W1   dx = p[c] * dy + q[c] * (x - mean[c]) + r[c]
#include "bn_common.cuh"

namespace bn {

// Rows of block row range blockIdx.y.
struct McRows {
  long long first, end;
};

__device__ __forceinline__ McRows mc_rows(long long M) {
  McRows r;
  r.first = M * blockIdx.y / gridDim.y + threadIdx.y;
  r.end = M * (blockIdx.y + 1) / gridDim.y;
  return r;
}

}  // namespace bn

// Per-range statistics: each thread folds its channel's values U rows at a time into a Welford
// triple (U loads in flight), then the block merges its rows with a fixed shared-memory tree.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_mc_stats(const T* __restrict__ x, long long M, int C,
            Acc* __restrict__ part_mean, Acc* __restrict__ part_m2,
            int* __restrict__ part_count) {
  constexpr int U = bn::Unroll<T>::value;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const bn::McRows rows = bn::mc_rows(M);
  const long long row_step = blockDim.y;
  bn::Welford<Acc, int> w = {0, Acc(0), Acc(0)};
  if (c < C) {
    for (long long m = rows.first; m < rows.end; m += U * row_step) {
      const T* p = x + m * C + c;
      Acc v[U];
      int cnt = 0;
#pragma unroll
      for (int k = 0; k < U; ++k) {
        v[k] = Acc(0);
        if (m + k * row_step < rows.end) {
          v[k] = bn::widen(p[k * row_step * C]);
          ++cnt;
        }
      }
      bn::fold_group<U>(w, v, cnt);
    }
  }
  w = bn::block_merge_rows(w);
  if (threadIdx.y == 0 && c < C) {
    const long long slot = static_cast<long long>(c) * gridDim.y + blockIdx.y;
    part_mean[slot] = w.mean;
    part_m2[slot] = w.m2;
    part_count[slot] = w.n;
  }
}

// y = x * scale[c] + shift[c], computed in Acc and rounded once to T.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_mc_apply(const T* __restrict__ x, const Acc* __restrict__ scale,
            const Acc* __restrict__ shift, long long M, int C, T* __restrict__ y) {
  constexpr int U = bn::Unroll<T>::value;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const bn::McRows rows = bn::mc_rows(M);
  const long long row_step = blockDim.y;
  const Acc a = scale[c], b = shift[c];
  for (long long m = rows.first; m < rows.end; m += U * row_step) {
    const long long base = m * C + c;
    Acc v[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      v[k] = Acc(0);
      if (m + k * row_step < rows.end) v[k] = bn::widen(x[base + k * row_step * C]);
    }
#pragma unroll
    for (int k = 0; k < U; ++k)
      if (m + k * row_step < rows.end) bn::store(&y[base + k * row_step * C], v[k] * a + b);
  }
}

// Per-range sum(dy) and sum(dy * (x - mean[c])), both in one pass over dy and x.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_mc_reduce(const T* __restrict__ dy, const T* __restrict__ x, const Acc* __restrict__ mean,
             long long M, int C, Acc* __restrict__ part_dy, Acc* __restrict__ part_dy_xmu) {
  constexpr int U = bn::Unroll<T>::value;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const bn::McRows rows = bn::mc_rows(M);
  const long long row_step = blockDim.y;
  Acc sum_dy = Acc(0), sum_dy_xmu = Acc(0);
  if (c < C) {
    const Acc mu = mean[c];
    for (long long m = rows.first; m < rows.end; m += U * row_step) {
      const long long base = m * C + c;
      Acc g[U], v[U];
#pragma unroll
      for (int k = 0; k < U; ++k) {
        g[k] = Acc(0);
        v[k] = Acc(0);
        if (m + k * row_step < rows.end) {
          g[k] = bn::widen(dy[base + k * row_step * C]);
          v[k] = bn::widen(x[base + k * row_step * C]);
        }
      }
      Acc group_dy = Acc(0), group_dy_xmu = Acc(0);
#pragma unroll
      for (int k = 0; k < U; ++k) {
        if (m + k * row_step < rows.end) {
          group_dy += g[k];
          group_dy_xmu += g[k] * (v[k] - mu);
        }
      }
      sum_dy += group_dy;
      sum_dy_xmu += group_dy_xmu;
    }
  }
  bn::block_sum2_rows(sum_dy, sum_dy_xmu);
  if (threadIdx.y == 0 && c < C) {
    const long long slot = static_cast<long long>(c) * gridDim.y + blockIdx.y;
    part_dy[slot] = sum_dy;
    part_dy_xmu[slot] = sum_dy_xmu;
  }
}

// dx of training-mode batch norm, coefficients as in bn_ncs_backward.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_mc_backward(const T* __restrict__ dy, const T* __restrict__ x, const Acc* __restrict__ mean,
               const Acc* __restrict__ invstd, const Acc* __restrict__ gamma,
               const Acc* __restrict__ sum_dy, const Acc* __restrict__ sum_dy_xmu,
               long long count, long long M, int C, T* __restrict__ dx) {
  constexpr int U = bn::Unroll<T>::value;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const bn::McRows rows = bn::mc_rows(M);
  const long long row_step = blockDim.y;
  const double is = static_cast<double>(invstd[c]);
  const double p64 = static_cast<double>(gamma[c]) * is;
  const Acc p = static_cast<Acc>(p64);
  const Acc q = static_cast<Acc>(-p64 * is * is * static_cast<double>(sum_dy_xmu[c]) /
                                 static_cast<double>(count));
  const Acc r = static_cast<Acc>(-p64 * static_cast<double>(sum_dy[c]) /
                                 static_cast<double>(count));
  const Acc mu = mean[c];
  for (long long m = rows.first; m < rows.end; m += U * row_step) {
    const long long base = m * C + c;
    Acc g[U], v[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      g[k] = Acc(0);
      v[k] = Acc(0);
      if (m + k * row_step < rows.end) {
        g[k] = bn::widen(dy[base + k * row_step * C]);
        v[k] = bn::widen(x[base + k * row_step * C]);
      }
    }
#pragma unroll
    for (int k = 0; k < U; ++k)
      if (m + k * row_step < rows.end)
        bn::store(&dx[base + k * row_step * C], (g[k] * p + (v[k] - mu) * q) + r);
  }
}
