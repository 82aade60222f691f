// The MC layout's block geometry, shared by the MC kernels (bn_mc.cu, bn_double_backward.cu):
// the rows a block covers and the counters of the two-level cross-block merge (bn_mc.cu's
// header comment describes both).
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

}  // namespace bn
