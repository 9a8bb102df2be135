// clusterfuse/ffn/block_phases.cuh — the fused FFN block's kernel parameters and its phases as
// device functions, for the per-block kernel (kernels/ffn/ffn_block.cu) and the persistent decode
// program to compose: the norm, the gate/up GEMV and the down GEMV so far (and the MoE block's
// weighted, accumulating down GEMV). SiLU·up and the exchange stay statements of the FFN program
// (ffn/group_program_body.cuh, which both callers include), and the kernel keeps its own
// cross-cluster reduction: as functions their machine code differed. Each moved here only when
// tools/compare_machine_code.sh shows unchanged machine code. Every function is block-collective
// (all threads of the block call it) unless it says otherwise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "clusterfuse/elements.cuh"
#include "clusterfuse/gemv.cuh"
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

// Phase 1, the gate/up GEMV: this block's gate and up rows (w1: two segments of rows1 rows, full
// K = H) times the normed x (xs [B][ld1]) into res [2·rows1][B] fp32 (gate rows, then up rows).
// part: the GEMV's k-split partials. No barrier after it (the caller's follows the next weights'
// L2 prefetches, so that they are in flight during the wait).
template <typename T, int NT, int kDepth>
__device__ __forceinline__ void gate_up_gemv(const gemv::WeightRows<T>& w1, int ks, const T* xs, int ld1, int B,
                                             float* part, float* res) {
  gemv::block_gemv<T, NT, kDepth>(w1, ks, xs, ld1, B, part, [&](int row, int n, float v) { res[row * B + n] = v; });
}

// Phase 2, the down GEMV: this block's rows h0.. of W_down restricted to the cluster's columns (w2)
// times the cluster's activation slice (act [B][ld2]) into the cluster's fp32 partial yc [B][H]
// (rows h0.. of each sequence). part: the GEMV's k-split partials. No barrier after it (the
// cross-cluster reduction starts with the grid barrier).
template <typename T, int NT, int kDepth>
__device__ __forceinline__ void down_gemv(const gemv::WeightRows<T>& w2, int ks, const T* act, int ld2, int B, int H,
                                          int h0, float* part, float* yc) {
  gemv::block_gemv<T, NT, kDepth>(w2, ks, act, ld2, B, part, [&](int row, int n, float v) { yc[(size_t)n * H + h0 + row] = v; });
}

// Phase 2 of a block whose partial sums several weight pieces (the MoE block: each routed
// expert's output weighted per sequence): as down_gemv, but yc[n][h0 + row] = (first ? 0 :
// yc[n][h0 + row]) + scale[n] · value. scale: B floats (shared memory). Every output element is
// written by one thread, and the caller's barrier between pieces orders the read-modify-writes.
template <typename T, int NT, int kDepth>
__device__ __forceinline__ void down_gemv_scaled_accumulate(const gemv::WeightRows<T>& w2, int ks, const T* act,
                                                            int ld2, int B, int H, int h0, const float* scale,
                                                            bool first, float* part, float* yc) {
  gemv::block_gemv<T, NT, kDepth>(w2, ks, act, ld2, B, part, [&](int row, int n, float v) {
    float* y = yc + (size_t)n * H + h0 + row;
    *y = (first ? 0.f : *y) + scale[n] * v;
  });
}

// The cross-cluster reduction, after the grid barrier: this block's share of the [B, H] output,
// the NC clusters' fp32 partials summed in cluster order, plus the residual (x's dtype T) when
// there is one, else stored as fp32. The MoE block's; the FFN kernel keeps its own inline copy,
// because calling this changed its register allocation (tools/compare_machine_code.sh).
template <typename T>
__device__ __forceinline__ void sum_partials(const float* partials, int NC, int B, int H, const void* residual,
                                             void* out) {
  int e0, e1;
  split_range(B * H / 4, gridDim.x, blockIdx.x, 4, e0, e1);
  if (residual) {
    const T* resid = static_cast<const T*>(residual);
    T* o = static_cast<T*>(out);
    grid::reduce_partials(partials, NC, (size_t)B * H, e0, e1, [&](int e, float4 s) {
      const float v[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) o[e + i] = from_f<T>(to_f(resid[e + i]) + v[i]);
    });
  } else {
    float* o = static_cast<float*>(out);
    grid::reduce_partials(partials, NC, (size_t)B * H, e0, e1,
                          [&](int e, float4 s) { *reinterpret_cast<float4*>(o + e) = s; });
  }
}

}  // namespace ffn
}  // namespace clusterfuse
