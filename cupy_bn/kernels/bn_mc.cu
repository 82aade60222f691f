// Batch-norm kernels for the MC layout: x is a C-contiguous (M, C) tensor (channels last:
// NHWC and dense (N, C) input).
//
// Grid: (ceil(C / bx), P), block: (bx, by) with bx * by <= 256 and by a power of two. Threads
// run along C, so a warp reads consecutive channels of a row (coalesced); thread (tx, ty) of
// block (cb, p) owns channel cb * bx + tx and rows m0 + ty, m0 + ty + by, ... of the row range
// [m0, m1) = [M * p / P, M * (p + 1) / P).
//
// Reductions merge a block's rows in shared memory, then across blocks in the same launch
// (bn_finalize.cuh), in two fixed levels because a channel tile may span hundreds of row
// ranges while only `by` threads of the last block serve each channel: the row ranges form
// groups of `group` consecutive ranges (G = ceil(P / group) groups); the last block of a group
// merges the group's partials ([C][P] workspace) in order, and with G > 1 writes a group
// partial ([C][G]) and the last group of the tile merges those in order.
// `sync`: tile * G + g group counters, then one counter per tile (after ceil(C/bx) * G of
// them), then done and bad.
//
// Tensor passes (R = one full read of a tensor, W = one full write), one launch each:
//   bn_mc_stats      R1      per-channel mean, var (+ invstd, scale, shift, running stats)
//   bn_mc_apply      R1 W1   y = x * scale[c] + shift[c]
//   bn_mc_reduce     R2      per-channel sum(dy), sum(dy * (x - mean[c]))
//   bn_mc_backward   R2 W1   dx = p[c] * dy + q[c] * (x - mean[c]) + r[c]
#include "bn_common.cuh"
#include "bn_finalize.cuh"
#include "bn_mc_layout.cuh"

// The per-thread loads of bn_mc_stats on 16-byte packs along the channels (bn::mc_packable;
// 16-bit types, bn::StatsPacks):
// a thread folds kMcPackRows rows of its pack's channels at a time into one Welford triple
// per channel; through shared memory, thread (tx, ty) of the element-by-element layout then
// merges the triples of channel tx in a fixed row order, and the block goes on as there.
constexpr int kMcPackRows = 2;

template <typename T, typename Acc>
__device__ __forceinline__ bool mc_stats_packs(const T* __restrict__ x, long long M, int C,
                                               bn::Welford<Acc, int>& w) {
  using P = bn::Pack<T>;
  constexpr int size = P::size;
  __shared__ int s_count[256 * size];
  __shared__ Acc s_mean[256 * size];
  __shared__ Acc s_m2[256 * size];
  const bn::McPackShare s = bn::mc_pack_share<T>(M, C);
  bn::Welford<Acc, int> acc[size];
#pragma unroll
  for (int j = 0; j < size; ++j) acc[j] = {0, Acc(0), Acc(0)};
  const P* __restrict__ xp = reinterpret_cast<const P*>(x) + s.base;
  const bool walked = bn::mc_pack_walk<kMcPackRows>(s, [&](auto n, const auto& off) {
    constexpr int G = decltype(n)::value;
    P p[G];
#pragma unroll
    for (int g = 0; g < G; ++g) p[g] = xp[off[g]];
#pragma unroll
    for (int j = 0; j < size; ++j) {
      Acc v[G];
#pragma unroll
      for (int g = 0; g < G; ++g) v[g] = bn::widen(p[g].v[j]);
      bn::fold_group<G>(acc[j], v, G);
    }
  });
  if (!walked) return false;
  const int lanes = blockDim.x / size;
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  const int slot = (t / lanes) * blockDim.x + (t % lanes) * size;
#pragma unroll
  for (int j = 0; j < size; ++j) {
    s_count[slot + j] = acc[j].n;
    s_mean[slot + j] = acc[j].mean;
    s_m2[slot + j] = acc[j].m2;
  }
  __syncthreads();
  // thread (tx, ty): the triples of channel tx from rows ty * size, ty * size + 1, ...
#pragma unroll
  for (int i = 0; i < size; ++i) {
    const int at = (threadIdx.y * size + i) * blockDim.x + threadIdx.x;
    const bn::Welford<Acc, int> r = {s_count[at], s_mean[at], s_m2[at]};
    w = bn::chan_merge(w, r);
  }
  return true;
}

// Statistics: each thread folds its channel's values U rows at a time into a Welford triple
// (U loads in flight), the block merges its rows with a fixed shared-memory tree, then the
// fixed-order cross-block merge. `sync`: one counter per channel tile, done, bad;
// `flags` as for bn_ncs_stats.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256, 3)
bn_mc_stats(const T* __restrict__ x, long long M, int C, int group,
            Acc* __restrict__ part_mean, Acc* __restrict__ part_m2,
            int* __restrict__ part_count, Acc* __restrict__ group_mean,
            Acc* __restrict__ group_m2, long long* __restrict__ group_count,
            int* __restrict__ sync, int flags,
            const Acc* __restrict__ weight, const Acc* __restrict__ bias, Acc eps,
            double momentum, double unbias, Acc* __restrict__ mean, Acc* __restrict__ var,
            Acc* __restrict__ invstd, Acc* __restrict__ scale, Acc* __restrict__ shift,
            Acc* __restrict__ running_mean, Acc* __restrict__ running_var,
            Acc* __restrict__ running_backup) {
  constexpr int U = bn::Unroll<T>::value;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const bn::McRows rows = bn::mc_rows(M);
  const long long row_step = blockDim.y;
  bn::Welford<Acc, int> w = {0, Acc(0), Acc(0)};
  if (!(bn::StatsPacks<T>::value && bn::mc_packable<T>(C, x, x) &&
        mc_stats_packs<T, Acc>(x, M, C, w)) &&
      c < C) {
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

  const int P = gridDim.y;
  const bn::McSync sy = bn::mc_sync(sync, group);
  bn::Welford<Acc, long long> total = {w.n, w.mean, w.m2};  // valid in row 0
  if (P > 1) {
    const long long base = static_cast<long long>(c) * P;
    if (threadIdx.y == 0 && c < C) {
      part_mean[base + blockIdx.y] = w.mean;
      part_m2[base + blockIdx.y] = w.m2;
      part_count[base + blockIdx.y] = w.n;
    }
    if (!bn::arrive_last(sy.group_counter, sy.end - sy.first)) return;
    total = {0, Acc(0), Acc(0)};
    if (c < C)
      total = bn::merge_partials<4>(part_mean, part_m2, part_count, base,
                                    sy.first + threadIdx.y, sy.end, blockDim.y);
    total = bn::block_merge_rows(total);
    if (sy.groups > 1) {
      const long long gbase = static_cast<long long>(c) * sy.groups;
      if (threadIdx.y == 0 && c < C) {
        group_mean[gbase + blockIdx.y / group] = total.mean;
        group_m2[gbase + blockIdx.y / group] = total.m2;
        group_count[gbase + blockIdx.y / group] = total.n;
      }
      if (!bn::arrive_last(sy.tile_counter, sy.groups)) return;
      total = {0, Acc(0), Acc(0)};
      if (c < C)
        total = bn::merge_partials<4>(group_mean, group_m2, group_count, gbase, threadIdx.y,
                                      sy.groups, blockDim.y);
      total = bn::block_merge_rows(total);
    }
  }
  const bn::StatsOutputs<Acc> out = {flags,  C,      weight, bias,   eps,
                                     momentum, unbias, mean, var, invstd,
                                     scale,  shift,  running_mean, running_var,
                                     running_backup};
  const int bad = threadIdx.y == 0 && c < C ? bn::write_channel_stats(out, c, total) : 0;
  if (flags & BN_RUNNING) bn::update_running_if_last(out, sy.done, sy.bad, gridDim.x, bad, C);
}

// y = x * scale[c] + shift[c], computed in Acc and rounded once to T (bn::mc_apply).
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_mc_apply(const T* __restrict__ x, const Acc* __restrict__ scale,
            const Acc* __restrict__ shift, long long M, int C, T* __restrict__ y) {
  bn::mc_apply<T, Acc>(x, x, scale, shift, 0, M, C, y);
}

// The per-thread sums of bn_mc_reduce on 16-byte packs of dy and x along the channels
// (bn::mc_packable): a row of the pack's channels at a time, one pair of sums per channel;
// thread (tx, ty) of the element-by-element layout then adds those of channel tx in a fixed
// row order (bn::mc_pack_column_sums).
template <typename T, typename Acc>
__device__ __forceinline__ bool mc_reduce_packs(const T* __restrict__ dy,
                                                const T* __restrict__ x,
                                                const Acc* __restrict__ mean, long long M, int C,
                                                Acc& sum_dy, Acc& sum_dy_xmu) {
  using P = bn::Pack<T>;
  constexpr int size = P::size;
  __shared__ Acc s_buf[256 * size];
  const bn::McPackShare s = bn::mc_pack_share<T>(M, C);
  Acc sums[2][size], mu[size];
#pragma unroll
  for (int j = 0; j < size; ++j) {
    sums[0][j] = Acc(0);
    sums[1][j] = Acc(0);
    mu[j] = s.active ? mean[s.channel + j] : Acc(0);
  }
  const P* __restrict__ gp = reinterpret_cast<const P*>(dy) + s.base;
  const P* __restrict__ xp = reinterpret_cast<const P*>(x) + s.base;
  // one row at a time: two would take the 16-bit types past 64 registers on sm_100
  const bool walked = bn::mc_pack_walk<1>(s, [&](auto n, const auto& off) {
    constexpr int G = decltype(n)::value;
    P g[G], v[G];
#pragma unroll
    for (int k = 0; k < G; ++k) {
      g[k] = gp[off[k]];
      v[k] = xp[off[k]];
    }
#pragma unroll
    for (int j = 0; j < size; ++j) {
      Acc gj[G], vj[G];
#pragma unroll
      for (int k = 0; k < G; ++k) {
        gj[k] = bn::widen(g[k].v[j]);
        vj[k] = bn::widen(v[k].v[j]);
      }
      bn::add_dy_xmu(gj, vj, mu[j], G, sums[0][j], sums[1][j]);
    }
  });
  if (!walked) return false;
  Acc out[2] = {Acc(0), Acc(0)};
  bn::mc_pack_column_sums<2, T>(s_buf, sums, out);
  sum_dy = out[0];
  sum_dy_xmu = out[1];
  return true;
}

// sum(dy) and sum(dy * (x - mean[c])) per channel, both in one pass over dy and x, merged
// across blocks in the statistics' two levels. Four resident blocks asked of ptxas (64
// registers): left to itself, ptxas 13.5 spills the __half instantiation on sm_80.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256, 4)
bn_mc_reduce(const T* __restrict__ dy, const T* __restrict__ x, const Acc* __restrict__ mean,
             long long M, int C, int group, Acc* __restrict__ part_dy,
             Acc* __restrict__ part_dy_xmu, Acc* __restrict__ group_dy,
             Acc* __restrict__ group_dy_xmu, int* __restrict__ sync, Acc* __restrict__ out_dy,
             Acc* __restrict__ out_dy_xmu) {
  constexpr int U = bn::Unroll<T>::value;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const bn::McRows rows = bn::mc_rows(M);
  const long long row_step = blockDim.y;
  Acc sum_dy = Acc(0), sum_dy_xmu = Acc(0);
  if (!(bn::mc_packable<T>(C, dy, x) &&
        mc_reduce_packs<T, Acc>(dy, x, mean, M, C, sum_dy, sum_dy_xmu)) &&
      c < C) {
    const Acc mu = mean[c];
    for (long long m = rows.first; m < rows.end; m += U * row_step) {
      const long long base = m * C + c;
      Acc g[U], v[U];
      bn::load_mc_pairs(dy, x, base, m, row_step, rows.end, static_cast<long long>(C), g, v);
      const long long left = (rows.end - m + row_step - 1) / row_step;
      bn::add_dy_xmu(g, v, mu, static_cast<int>(left < U ? left : U), sum_dy, sum_dy_xmu);
    }
  }
  bn::block_sum2_rows(sum_dy, sum_dy_xmu);

  const int P = gridDim.y;
  if (P > 1) {
    const bn::McSync sy = bn::mc_sync(sync, group);
    const long long base = static_cast<long long>(c) * P;
    if (threadIdx.y == 0 && c < C) {
      part_dy[base + blockIdx.y] = sum_dy;
      part_dy_xmu[base + blockIdx.y] = sum_dy_xmu;
    }
    if (!bn::arrive_last(sy.group_counter, sy.end - sy.first)) return;
    sum_dy = Acc(0);
    sum_dy_xmu = Acc(0);
    if (c < C)
      bn::sum_partials<4>(part_dy, part_dy_xmu, base, sy.first + threadIdx.y, sy.end,
                          blockDim.y, sum_dy, sum_dy_xmu);
    bn::block_sum2_rows(sum_dy, sum_dy_xmu);
    if (sy.groups > 1) {
      const long long gbase = static_cast<long long>(c) * sy.groups;
      if (threadIdx.y == 0 && c < C) {
        group_dy[gbase + blockIdx.y / group] = sum_dy;
        group_dy_xmu[gbase + blockIdx.y / group] = sum_dy_xmu;
      }
      if (!bn::arrive_last(sy.tile_counter, sy.groups)) return;
      sum_dy = Acc(0);
      sum_dy_xmu = Acc(0);
      if (c < C)
        bn::sum_partials<4>(group_dy, group_dy_xmu, gbase, threadIdx.y, sy.groups, blockDim.y,
                            sum_dy, sum_dy_xmu);
      bn::block_sum2_rows(sum_dy, sum_dy_xmu);
    }
  }
  if (threadIdx.y == 0 && c < C) {
    out_dy[c] = sum_dy;
    out_dy_xmu[c] = sum_dy_xmu;
  }
}

// bn_mc_backward on 16-byte packs of dy, x and dx along the channels (bn::mc_packable), as
// bn::mc_apply_packs. The tile's coefficients (p, q, r, mean of blockDim.x channels) sit in shared
// memory, read with the packs: in registers they would take 32 of them for 16-bit types.
template <typename T, typename Acc>
__device__ __forceinline__ bool mc_backward_packs(
    const T* __restrict__ dy, const T* __restrict__ x, const Acc* __restrict__ mean,
    const Acc* __restrict__ invstd, const Acc* __restrict__ gamma,
    const Acc* __restrict__ sum_dy, const Acc* __restrict__ sum_dy_xmu, long long count,
    long long M, int C, T* __restrict__ dx) {
  using P = bn::Pack<T>;
  __shared__ Acc s_k[4][32];
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  const int c = blockIdx.x * blockDim.x + t;
  if (t < blockDim.x && c < C) {
    const bn::DxCoefficients<Acc> k =
        bn::dx_coefficients(invstd, gamma, sum_dy, sum_dy_xmu, count, c);
    s_k[0][t] = k.p;
    s_k[1][t] = k.q;
    s_k[2][t] = k.r;
    s_k[3][t] = mean[c];
  }
  __syncthreads();
  const bn::McPackShare s = bn::mc_pack_share<T>(M, C);
  const int j0 = s.channel - blockIdx.x * blockDim.x;
  const P* __restrict__ gp = reinterpret_cast<const P*>(dy) + s.base;
  const P* __restrict__ xp = reinterpret_cast<const P*>(x) + s.base;
  P* __restrict__ dxp = reinterpret_cast<P*>(dx) + s.base;
  return bn::mc_pack_walk<1>(s, [&](auto, const auto& off) {
    const P g = gp[off[0]], v = xp[off[0]];
    P o;
#pragma unroll
    for (int j = 0; j < P::size; ++j)
      bn::store(&o.v[j], (bn::widen(g.v[j]) * s_k[0][j0 + j] +
                          (bn::widen(v.v[j]) - s_k[3][j0 + j]) * s_k[1][j0 + j]) +
                             s_k[2][j0 + j]);
    dxp[off[0]] = o;
  });
}

// dx of training-mode batch norm, coefficients as in bn_ncs_backward; on 16-byte packs where
// the pointers and C allow (bn::mc_packable).
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_mc_backward(const T* __restrict__ dy, const T* __restrict__ x, const Acc* __restrict__ mean,
               const Acc* __restrict__ invstd, const Acc* __restrict__ gamma,
               const Acc* __restrict__ sum_dy, const Acc* __restrict__ sum_dy_xmu,
               long long count, long long M, int C, T* __restrict__ dx) {
  constexpr int U = bn::Unroll<T>::value;
  if (bn::mc_packable<T>(C, dy, x, dx) &&
      mc_backward_packs<T, Acc>(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xmu, count, M, C, dx))
    return;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const bn::McRows rows = bn::mc_rows(M);
  const long long row_step = blockDim.y;
  const bn::DxCoefficients<Acc> k_dx =
      bn::dx_coefficients(invstd, gamma, sum_dy, sum_dy_xmu, count, c);
  const Acc p = k_dx.p, q = k_dx.q, r = k_dx.r;
  const Acc mu = mean[c];
  for (long long m = rows.first; m < rows.end; m += U * row_step) {
    const long long base = m * C + c;
    Acc g[U], v[U];
    bn::load_mc_pairs(dy, x, base, m, row_step, rows.end, static_cast<long long>(C), g, v);
#pragma unroll
    for (int k = 0; k < U; ++k)
      if (m + k * row_step < rows.end)
        bn::store(&dx[base + k * row_step * C], (g[k] * p + (v[k] - mu) * q) + r);
  }
}
