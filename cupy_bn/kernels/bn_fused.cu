// Fused forms of the forward apply and the ReLU's backward: cupy_bn.functional's
// `activation="relu"` and `residual=z` (ResNet's BN + add + ReLU).
//
// Tensor passes (R = one full read of a tensor, W = one full write), one launch each:
//   bn_ncs_apply_fused   R1 W1 (R2 W1 with a residual)   y = act(x * scale[c] + shift[c] + z)
//   bn_mc_apply_fused    R1 W1 (R2 W1 with a residual)   the same over MC data
//   bn_relu_gradient     R2 W1                            g = y > 0 ? dy : 0
//
// The apply kernels take the launch geometry of bn_ncs_apply / bn_mc_apply (bn_ncs.cu,
// bn_mc.cu) and `flags`: kFusedResidual (z is read; any valid pointer otherwise) and
// kFusedRelu. The sum and the ReLU are taken in Acc and rounded once to T. The ReLU keeps a
// NaN (`v < 0 ? 0 : v`), as PyTorch's and NumPy's maximum do. bn_relu_gradient is a flat
// grid-stride loop: it needs no channel index.
#include "bn_common.cuh"
#include "bn_mc_layout.cuh"

// y = act(x * scale[c] + shift[c] + z); on 16-byte packs where the pointers and S allow.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_ncs_apply_fused(const T* __restrict__ x, const T* __restrict__ z,
                   const Acc* __restrict__ scale, const Acc* __restrict__ shift, int flags,
                   long long N, int C, long long S, int col_pieces, T* __restrict__ y) {
  constexpr int U = bn::Unroll<T>::value;
  const int step = blockDim.x;
  const Acc a = scale[blockIdx.x], b = shift[blockIdx.x];
  const bool residual = (flags & bn::kFusedResidual) != 0;
  if (bn::ncs_packable<T>(S, x, y, residual ? z : nullptr) &&
      bn::ncs_apply_packs<T, Acc>(x, z, a, b, flags, N, C, S, col_pieces, y))
    return;
  const bn::NcsTile tile = bn::ncs_tile(N, C, S, col_pieces);
  bn::NcsCursor cur(tile, threadIdx.x, step);
  for (int i = threadIdx.x; i < tile.count; i += U * step) {
    bn::NcsCursor out = cur;
    Acc v[U], r[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      v[k] = Acc(0);
      r[k] = Acc(0);
      if (i + k * step < tile.count) {
        v[k] = bn::widen(x[cur.off]);
        if (residual) r[k] = bn::widen(z[cur.off]);
        cur.advance();
      }
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
      if (i + k * step < tile.count) {
        bn::store(&y[out.off], bn::fused_output(v[k] * a + b, r[k], flags));
        out.advance();
      }
    }
  }
}

// y = act(x * scale[c] + shift[c] + z) over MC data; on 16-byte packs where the pointers and
// C allow.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_mc_apply_fused(const T* __restrict__ x, const T* __restrict__ z,
                  const Acc* __restrict__ scale, const Acc* __restrict__ shift, int flags,
                  long long M, int C, T* __restrict__ y) {
  constexpr int U = bn::Unroll<T>::value;
  if (bn::mc_packable<T>(C, x, y, (flags & bn::kFusedResidual) ? z : nullptr) &&
      bn::mc_apply_packs<T, Acc>(x, z, scale, shift, flags, M, C, y))
    return;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const bn::McRows rows = bn::mc_rows(M);
  const long long row_step = blockDim.y;
  const Acc a = scale[c], b = shift[c];
  const bool residual = (flags & bn::kFusedResidual) != 0;
  for (long long m = rows.first; m < rows.end; m += U * row_step) {
    const long long base = m * C + c;
    Acc v[U], r[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      v[k] = Acc(0);
      r[k] = Acc(0);
      if (m + k * row_step < rows.end) {
        v[k] = bn::widen(x[base + k * row_step * C]);
        if (residual) r[k] = bn::widen(z[base + k * row_step * C]);
      }
    }
#pragma unroll
    for (int k = 0; k < U; ++k)
      if (m + k * row_step < rows.end)
        bn::store(&y[base + k * row_step * C], bn::fused_output(v[k] * a + b, r[k], flags));
  }
}

// g = dy where y > 0, else 0 (a NaN in dy where y <= 0 does not pass), over n elements; in
// 16-byte packs when dy, y and g are 16-byte aligned (the last n % size elements one by one).
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_relu_gradient(const T* __restrict__ dy, const T* __restrict__ y, long long n,
                 T* __restrict__ g) {
  using P = bn::Pack<T>;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  long long i = first;
  if (bn::aligned16(dy) && bn::aligned16(y) && bn::aligned16(g)) {
    const P* __restrict__ dp = reinterpret_cast<const P*>(dy);
    const P* __restrict__ yp = reinterpret_cast<const P*>(y);
    P* __restrict__ gp = reinterpret_cast<P*>(g);
    const long long packs = n / P::size;
#pragma unroll 1
    for (long long k = first; k < packs; k += stride) {
      const P d = dp[k], v = yp[k];
      P o;
#pragma unroll
      for (int j = 0; j < P::size; ++j)
        bn::store(&o.v[j], bn::widen(v.v[j]) > Acc(0) ? bn::widen(d.v[j]) : Acc(0));
      gp[k] = o;
    }
    i = packs * P::size + first;
  }
  for (; i < n; i += stride) {
    const Acc d = bn::widen(dy[i]);
    bn::store(&g[i], bn::widen(y[i]) > Acc(0) ? d : Acc(0));
  }
}
