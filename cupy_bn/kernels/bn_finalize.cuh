// Cross-block finalize of the reduction kernels, in the last block to arrive.
//
// A reduction splits each unit (an NCS channel, or an MC tile of channels) over gridDim.y
// blocks. Every block writes its partial to a workspace laid out [C][P] (P = gridDim.y), then
// counts itself in with an integer atomicAdd on a counter; the block that draws the last
// ticket merges the partials in index order (never in arrival order), so the result is
// bitwise identical whichever block arrives last. No floating-point atomics. (The MC kernels
// merge in two levels, fixed groups of row ranges first: see bn_mc.cu.)
//
// `sync` holds the counters, then `done` and `bad` for the fused running-stat update: int32
// zeros before the launch (each launch gets its own buffer), and zeros again after it (each
// counter is reset by the block that drew its last ticket).
//
// Memory ordering: writers release their partials with __threadfence before the atomicAdd;
// the last block fences again (acquire) and reads the partials with __ldcg (L2, not the
// non-coherent L1).
#pragma once
#include "bn_common.cuh"

#define BN_AFFINE 1   // also write invstd, scale, shift
#define BN_WEIGHT 2   // scale = weight * invstd (else invstd)
#define BN_BIAS 4     // shift = bias - mean * scale (else -mean * scale)
#define BN_RUNNING 8  // update the running statistics when every channel is finite

namespace bn {

// The per-channel outputs of a statistics kernel (pointers used only under their flag).
template <typename Acc>
struct StatsOutputs {
  int flags;
  int C;
  const Acc* weight;
  const Acc* bias;
  Acc eps;
  double momentum;  // weight of the new batch
  double unbias;    // count / (count - 1)
  Acc* mean;
  Acc* var;
  Acc* invstd;
  Acc* scale;
  Acc* shift;
  Acc* running_mean;
  Acc* running_var;
  Acc* running_backup;  // 2 * C: the running mean, then variance, before this launch
};

// True in every thread of the block that arrives last at `counter` (of `arrivals` blocks).
// All threads call it after writing their share of the block's partial. (Counter: int or
// unsigned.)
template <typename Counter>
__device__ __forceinline__ bool arrive_last(Counter* counter, int arrivals) {
  __shared__ int s_last;
  __threadfence();  // release this thread's partial writes
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    s_last = atomicAdd(counter, Counter(1)) == Counter(arrivals - 1);
    if (s_last) atomicExch(counter, Counter(0));  // all others have counted in: reset for reuse
  }
  __syncthreads();
  const bool last = s_last != 0;
  if (last) __threadfence();  // acquire the other blocks' partials
  return last;
}

template <typename Acc, typename Count>
__device__ __forceinline__ Welford<Acc, long long> load_partial(const Acc* part_mean,
                                                                const Acc* part_m2,
                                                                const Count* part_count,
                                                                long long slot) {
  Welford<Acc, long long> w;
  w.n = __ldcg(part_count + slot);
  w.mean = __ldcg(part_mean + slot);
  w.m2 = __ldcg(part_m2 + slot);
  return w;
}

// Chan-merge the partials row + p for p = first, first + stride, ... < end, in that order,
// with K partials loaded before any is merged (the loads overlap; the merge order does not
// change).
template <int K, typename Acc, typename Count>
__device__ __forceinline__ Welford<Acc, long long> merge_partials(
    const Acc* part_mean, const Acc* part_m2, const Count* part_count, long long row, int first,
    int end, int stride) {
  Welford<Acc, long long> acc = {0, Acc(0), Acc(0)};
  for (int p = first; p < end; p += K * stride) {
    Welford<Acc, long long> v[K];
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (p + k * stride < end) v[k] = load_partial(part_mean, part_m2, part_count, row + p + k * stride);
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (p + k * stride < end) acc = chan_merge(acc, v[k]);
  }
  return acc;
}

// Sums of the partials row + p for p = first, first + stride, ... < end, in that order, K
// loads in flight.
template <int K, typename Acc>
__device__ __forceinline__ void sum_partials(const Acc* part_a, const Acc* part_b, long long row,
                                             int first, int end, int stride, Acc& a, Acc& b) {
  a = Acc(0);
  b = Acc(0);
  for (int p = first; p < end; p += K * stride) {
    Acc va[K], vb[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      va[k] = Acc(0);
      vb[k] = Acc(0);
      if (p + k * stride < end) {
        va[k] = __ldcg(part_a + row + p + k * stride);
        vb[k] = __ldcg(part_b + row + p + k * stride);
      }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      a += va[k];
      b += vb[k];
    }
  }
}

// Mean, biased variance and (with BN_AFFINE) invstd, scale, shift of channel c; returns 1 when
// mean or variance is not finite. An empty channel gives zeros.
template <typename Acc>
__device__ __forceinline__ int write_channel_stats(const StatsOutputs<Acc>& o, int c,
                                                   const Welford<Acc, long long>& w) {
  const Acc m = w.n > 0 ? w.mean : Acc(0);
  const Acc m2 = w.m2 < Acc(0) ? Acc(0) : w.m2;  // rounding can dip below 0; NaN stays
  const Acc v = w.n > 0 ? m2 / static_cast<Acc>(w.n) : Acc(0);
  o.mean[c] = m;
  o.var[c] = v;
  if (o.flags & BN_AFFINE) {
    const Acc is = Acc(1) / sqrt(v + o.eps);
    const Acc sc = (o.flags & BN_WEIGHT) ? o.weight[c] * is : is;
    Acc sh = -m * sc;
    if (o.flags & BN_BIAS) sh = sh + o.bias[c];
    o.invstd[c] = is;
    o.scale[c] = sc;
    o.shift[c] = sh;
  }
  if (o.flags & BN_RUNNING) {  // keep the old values for update_running_if_last
    const Acc rm = o.running_mean[c], rv = o.running_var[c];
    o.running_backup[c] = rm;
    o.running_backup[o.C + c] = rv;
    o.running_mean[c] = static_cast<Acc>((1.0 - o.momentum) * static_cast<double>(rm) +
                                         o.momentum * static_cast<double>(m));
    o.running_var[c] = static_cast<Acc>((1.0 - o.momentum) * static_cast<double>(rv) +
                                        o.momentum * (static_cast<double>(v) * o.unbias));
  }
  return !(isfinite(m) && isfinite(v));
}

// Called by every block that finalized a unit (`units` of them), `bad` nonzero in threads
// that found a non-finite channel, after write_channel_stats updated the running statistics
// of the unit's channels (in parallel over channels, old values kept in running_backup). The
// last of them restores all C channels from the backup when any channel was bad, so the
// update is all or nothing; then it resets `done` and `bad_flag`.
template <typename Acc>
__device__ __forceinline__ void update_running_if_last(const StatsOutputs<Acc>& o, int* done,
                                                       int* bad_flag, int units, int bad, int C) {
  __shared__ int s_state;  // 0: not the last or all finite, 2: last and a channel bad
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  if (bad) atomicOr(bad_flag, 1);
  __threadfence();  // release this unit's running statistics and their backup
  __syncthreads();
  if (tid == 0) {
    s_state = 0;
    if (atomicAdd(done, 1) == units - 1) {
      s_state = atomicOr(bad_flag, 0) ? 2 : 0;
      atomicExch(done, 0);
      atomicExch(bad_flag, 0);
    }
  }
  __syncthreads();
  if (s_state != 2) return;
  __threadfence();  // acquire the other units' backups
  for (int c = tid; c < C; c += blockDim.x * blockDim.y) {
    o.running_mean[c] = __ldcg(o.running_backup + c);
    o.running_var[c] = __ldcg(o.running_backup + C + c);
  }
}

}  // namespace bn
