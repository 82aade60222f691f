// Per-channel finalize kernels: merge the [C][P] partials of the NCS / MC reductions.
//
// A channel is merged by `lanes` threads, 1 or 32 (the launch code takes 32 when P > 16):
// with one thread, partials 0, 1, ..., P-1 are merged in order; with a warp, lane l merges
// partials l, l + 32, l + 64, ... in order and the 32 lane results meet in a fixed shuffle
// tree. The merge order depends only on P, never on timing: results are bitwise identical run
// to run. No tensor passes: these read C * P partials and write C values.
//
//   bn_finalize_stats  Welford partials -> mean, biased var; with FINALIZE_AFFINE also
//                      invstd = 1 / sqrt(var + eps), scale = weight * invstd (weight optional),
//                      shift = bias - mean * scale (bias optional); with FINALIZE_RUNNING (a
//                      single-block launch only) the running statistics are updated in place,
//                      in double, when every channel's mean and var are finite, and left
//                      untouched otherwise (the caller then reports the non-finite channels).
//   bn_finalize_sums   gradient partials -> sum_dy, sum_dy_xmu
#include "bn_common.cuh"

#define FINALIZE_AFFINE 1
#define FINALIZE_WEIGHT 2
#define FINALIZE_BIAS 4
#define FINALIZE_RUNNING 8

template <typename Acc>
__global__ void __launch_bounds__(1024)
bn_finalize_stats(const Acc* __restrict__ part_mean, const Acc* __restrict__ part_m2,
                  const int* __restrict__ part_count, int C, int P, int lanes, int flags,
                  const Acc* __restrict__ weight, const Acc* __restrict__ bias, Acc eps,
                  double momentum, double unbias,
                  Acc* __restrict__ mean, Acc* __restrict__ var, Acc* __restrict__ invstd,
                  Acc* __restrict__ scale, Acc* __restrict__ shift,
                  Acc* __restrict__ running_mean, Acc* __restrict__ running_var) {
  const int lane = threadIdx.x % lanes;
  const int groups = blockDim.x / lanes;
  int bad = 0;
  // with lanes == 32 a warp shares a channel, so the loop is uniform over each warp
  for (int c = blockIdx.x * groups + threadIdx.x / lanes; c < C; c += gridDim.x * groups) {
    bn::Welford<Acc, long long> w = {0, Acc(0), Acc(0)};
    for (int p = lane; p < P; p += lanes) {
      const long long slot = static_cast<long long>(c) * P + p;
      bn::Welford<Acc, long long> part;
      part.n = part_count[slot];
      part.mean = part_mean[slot];
      part.m2 = part_m2[slot];
      w = bn::chan_merge(w, part);
    }
    if (lanes == 32) w = bn::warp_merge(w);
    if (lane == 0) {
      const Acc m = w.n > 0 ? w.mean : Acc(0);
      const Acc m2 = w.m2 < Acc(0) ? Acc(0) : w.m2;  // keeps NaN
      const Acc v = w.n > 0 ? m2 / static_cast<Acc>(w.n) : Acc(0);
      mean[c] = m;
      var[c] = v;
      if (flags & FINALIZE_AFFINE) {
        const Acc is = Acc(1) / sqrt(v + eps);
        const Acc sc = (flags & FINALIZE_WEIGHT) ? weight[c] * is : is;
        Acc sh = -m * sc;
        if (flags & FINALIZE_BIAS) sh = sh + bias[c];
        invstd[c] = is;
        scale[c] = sc;
        shift[c] = sh;
      }
      bad |= !(isfinite(m) && isfinite(v));
    }
  }
  if (flags & FINALIZE_RUNNING) {
    // Every thread reaches this barrier: flags is uniform over the launch.
    if (__syncthreads_or(bad) == 0) {
      for (int c = threadIdx.x; c < C; c += blockDim.x) {
        running_mean[c] = static_cast<Acc>((1.0 - momentum) * static_cast<double>(running_mean[c]) +
                                           momentum * static_cast<double>(mean[c]));
        running_var[c] = static_cast<Acc>((1.0 - momentum) * static_cast<double>(running_var[c]) +
                                          momentum * (static_cast<double>(var[c]) * unbias));
      }
    }
  }
}

template <typename Acc>
__global__ void __launch_bounds__(1024)
bn_finalize_sums(const Acc* __restrict__ part_dy, const Acc* __restrict__ part_dy_xmu, int C,
                 int P, int lanes, Acc* __restrict__ sum_dy, Acc* __restrict__ sum_dy_xmu) {
  const int lane = threadIdx.x % lanes;
  const int groups = blockDim.x / lanes;
  for (int c = blockIdx.x * groups + threadIdx.x / lanes; c < C; c += gridDim.x * groups) {
    Acc a = Acc(0), b = Acc(0);
    for (int p = lane; p < P; p += lanes) {
      const long long slot = static_cast<long long>(c) * P + p;
      a += part_dy[slot];
      b += part_dy_xmu[slot];
    }
    if (lanes == 32) {
      a = bn::warp_sum(a);
      b = bn::warp_sum(b);
    }
    if (lane == 0) {
      sum_dy[c] = a;
      sum_dy_xmu[c] = b;
    }
  }
}
