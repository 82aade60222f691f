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

// y = act(x * scale[c] + shift[c] + z) (bn::ncs_apply).
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_ncs_apply_fused(const T* __restrict__ x, const T* __restrict__ z,
                   const Acc* __restrict__ scale, const Acc* __restrict__ shift, int flags,
                   long long N, int C, long long S, int col_pieces, T* __restrict__ y) {
  bn::ncs_apply<T, Acc>(x, z, scale, shift, flags, N, C, S, col_pieces, y);
}

// y = act(x * scale[c] + shift[c] + z) over MC data (bn::mc_apply).
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
bn_mc_apply_fused(const T* __restrict__ x, const T* __restrict__ z,
                  const Acc* __restrict__ scale, const Acc* __restrict__ shift, int flags,
                  long long M, int C, T* __restrict__ y) {
  bn::mc_apply<T, Acc>(x, z, scale, shift, flags, M, C, y);
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
