// clusterfuse/ffn/block_phases.cuh — the fused FFN block's kernel parameters and its phases as
// device functions, for the per-block kernel (kernels/ffn/ffn_block.cu) and the persistent decode
// program to compose; each moved here checked for unchanged machine code
// (tools/compare_machine_code.sh). Every function is block-collective (all threads of the block
// call it) unless it says otherwise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "clusterfuse/elements.cuh"
#include "clusterfuse/grid_sync.cuh"
#include "clusterfuse/rms_norm.cuh"
#include "clusterfuse/split_range.cuh"

namespace clusterfuse {
namespace ffn {

// The kernel's parameters (filled by cf_ffn_block_launch from the C ABI's CfFfnBlockArgs and plan).
struct FfnParams {
  const void* x;          // [B, H]
  const void* norm_w;     // [H]
  const void* w_gate_up;  // [2I, H]
  const void* w_down;     // [H, I]
  const void* residual;   // [B, H] or nullptr
  void* out;              // [B, H]: x's dtype with residual, else fp32
  float* partials;        // [NC, B, H] fp32
  void* act_ws;           // [NC, B, lmax] x's dtype (global exchange only)
  unsigned int* counter;  // grid barrier counter (zero once, self-resetting)
  int B, H, I, cluster;
  int lmax;               // longest cluster slice of I (multiple of 8)
  int ksplit1, ksplit2;   // k split of phase 1 / phase 2 GEMVs
  float eps;
  int pdl_early;          // programmatic launch: let the next kernel start before the grid barrier
};

// Phase 0, the norm: the normed x (RMSNorm(x) · norm_w, rounded to T) of all B sequences into xs
// [B][ld1] (shared memory). scratch: at least B·(kThreads/32 + 1) floats of shared memory that are
// free until the phase-1 GEMV (its sums of squares, then rstd). x is the previous kernel's output:
// call it after the programmatic-launch wait. Ends with no barrier of its own past the norm
// helpers' (the caller's next barrier publishes xs).
template <typename T, int kThreads>
__device__ __forceinline__ void norm_x(const T* x, const T* norm_w, int B, int H, float eps, float* scratch, T* xs,
                                       int ld1) {
  namespace nm = clusterfuse::norm;
  constexpr int kWarps = kThreads / 32;
  nm::block_sum_squares<T, kThreads>(x, B, H, scratch);
  nm::finish_rstd<kThreads>(scratch, B, H, eps, scratch + B * kWarps);
  nm::normed_to_smem<T, kThreads>(x, norm_w, scratch + B * kWarps, B, H, 0, H, xs, ld1);
}

// act = silu(gate) · up for this block's rows1 rows (a multiple of 8) of all B sequences, from the
// phase-1 GEMV's fp32 results res [2·rows1][B] (gate rows, then up rows), rounded to T, 8
// consecutive rows (16 bytes) per thread, into dst[n·ld + r] (the block's piece of the cluster's
// activation slice: its tile for the DSM gather, or its rows of the global workspace). No barrier:
// the exchange that follows orders it.
template <typename T, int kThreads>
__device__ __forceinline__ void silu_mul(const float* res, int rows1, int B, T* dst, size_t ld) {
  for (int e = threadIdx.x; e < (rows1 / 8) * B; e += kThreads) {
    const int n = e / (rows1 / 8), r = (e - n * (rows1 / 8)) * 8;
    Pack8 o;
    o.u = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float g = res[(r + i) * B + n], u = res[(rows1 + r + i) * B + n];
      o.at<T>(i) = from_f<T>(g / (1.f + __expf(-g)) * u);
    }
    *reinterpret_cast<uint4*>(dst + n * ld + r) = o.u;
  }
}

// The cross-cluster sum after the grid barrier (grid_sync.cuh; every block co-resident, checked on
// the host): the NC clusters' fp32 partials [NC][B][H] summed in cluster order (deterministic, no
// atomics), each block an equal slice of [B][H], into out: residual + sum in T where residual is
// given, else fp32. Starts with the grid barrier; no barrier after it.
template <typename T>
__device__ __forceinline__ void reduce_clusters(const float* partials, int NC, int B, int H, const T* resid, void* out_,
                                                unsigned int* counter) {
  grid::barrier(counter);
  int e0, e1;
  split_range(B * H / 4, gridDim.x, blockIdx.x, 4, e0, e1);
  if (resid) {
    T* out = static_cast<T*>(out_);
    grid::reduce_partials(partials, NC, (size_t)B * H, e0, e1, [&](int e, float4 s) {
      const float v[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) out[e + i] = from_f<T>(to_f(resid[e + i]) + v[i]);
    });
  } else {
    float* out = static_cast<float*>(out_);
    grid::reduce_partials(partials, NC, (size_t)B * H, e0, e1,
                          [&](int e, float4 s) { *reinterpret_cast<float4*>(out + e) = s; });
  }
}

}  // namespace ffn
}  // namespace clusterfuse
