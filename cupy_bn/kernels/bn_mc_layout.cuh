// The MC layout's block geometry, shared by the MC kernels (bn_mc.cu, bn_double_backward.cu,
// bn_fused.cu): the rows a block covers and the counters of the two-level cross-block merge
// (bn_mc.cu's header comment describes both), and the apply of the plain and fused kernels.
#pragma once

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

// The counters of block (blockIdx.x, blockIdx.y) in the two-level merge.
struct McSync {
  int groups;      // G
  int first, end;  // row ranges [first, end) of this block's group
  int* group_counter;
  int* tile_counter;
  int* done;       // done, bad: the fused running-stat update
  int* bad;
};

__device__ __forceinline__ McSync mc_sync(int* sync, int group) {
  McSync s;
  const int P = gridDim.y, tiles = gridDim.x;
  s.groups = (P + group - 1) / group;
  const int g = blockIdx.y / group;
  s.first = g * group;
  s.end = s.first + group < P ? s.first + group : P;
  s.group_counter = sync + blockIdx.x * s.groups + g;
  s.tile_counter = sync + tiles * s.groups + blockIdx.x;
  s.done = sync + tiles * s.groups + tiles;
  s.bad = s.done + 1;
  return s;
}

// bn_mc_apply and bn_mc_apply_fused: as ncs_apply over MC data (bn_mc.cu's layout).
template <typename T, typename Acc>
__device__ __forceinline__ void mc_apply(const T* __restrict__ x, const T* __restrict__ z,
                                         const Acc* __restrict__ scale,
                                         const Acc* __restrict__ shift, int flags, long long M,
                                         int C, T* __restrict__ y) {
  constexpr int U = Unroll<T>::value;
  if (mc_packable<T>(C, x, y, (flags & kFusedResidual) ? z : nullptr) &&
      mc_apply_packs<T, Acc>(x, z, scale, shift, flags, M, C, y))
    return;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const McRows rows = mc_rows(M);
  const long long row_step = blockDim.y;
  const Acc a = scale[c], b = shift[c];
  const bool residual = (flags & kFusedResidual) != 0;
  for (long long m = rows.first; m < rows.end; m += U * row_step) {
    const long long base = m * C + c;
    Acc v[U], r[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      v[k] = Acc(0);
      r[k] = Acc(0);
      if (m + k * row_step < rows.end) {
        v[k] = widen(x[base + k * row_step * C]);
        if (residual) r[k] = widen(z[base + k * row_step * C]);
      }
    }
#pragma unroll
    for (int k = 0; k < U; ++k)
      if (m + k * row_step < rows.end)
        store(&y[base + k * row_step * C], fused_output(v[k] * a + b, r[k], flags));
  }
}

}  // namespace bn
