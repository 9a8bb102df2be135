// clusterfuse/rms_norm.cuh — block-collective RMSNorm of a small batch of vectors (the fused
// blocks' prologue): x[n] for n < B, H elements each (H a multiple of 8, rows 16-byte aligned).
//
// The whole block reads every vector, each thread a strided set of 16-byte pieces with all its
// loads in flight at once: one memory latency per vector, where one warp per vector walking H/256
// dependent steps took 4-8 µs at batch 1 (bench/results/attention_timeline_h200.md, "norm").
// Sums are deterministic: each thread in k order, warps by a fixed shuffle tree, then the warps'
// sums in warp order.
#pragma once

#include "clusterfuse/elements.cuh"

namespace clusterfuse::norm {

// One pass of block_sum_squares over the kV vectors n0 .. n0 + kV - 1 (all < B): no per-vector
// guard inside the k loop, so that the loads of all kV vectors are issued before the first sum.
template <int kV, typename T, int kThreads>
__device__ __forceinline__ void sum_squares_pass(const T* x, int n0, int H, float* red) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float ss[kV] = {};
#pragma unroll 4
  for (int k = threadIdx.x * 8; k < H; k += kThreads * 8) {
    float f[kV][8];
#pragma unroll
    for (int j = 0; j < kV; ++j) unpack8<T>(*reinterpret_cast<const uint4*>(x + (size_t)(n0 + j) * H + k), f[j]);
#pragma unroll
    for (int j = 0; j < kV; ++j)
#pragma unroll
      for (int i = 0; i < 8; ++i) ss[j] = fmaf(f[j][i], f[j][i], ss[j]);
  }
#pragma unroll
  for (int j = 0; j < kV; ++j) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss[j] += __shfl_xor_sync(0xffffffffu, ss[j], o);
    if (lane == 0) red[(n0 + j) * (kThreads / 32) + warp] = ss[j];
  }
}

// red[n * (kThreads / 32) + warp] = this warp's share of Σ_k x[n][k]² (fp32). No barrier: other
// work may run before finish_rstd. Four vectors per pass while four remain, so that a thread's
// loads of all four are in flight together (one vector per pass paid one memory latency per
// vector, ~0.5 µs each: 9.4 µs at batch 16, bench/results/attention_timeline_h100.md), then one
// at a time. c72844b guarded one four-vector loop instead (`if (n0 + j >= B) break` inside the k
// loop), and its norm phase, which then also held a serial work-list build, went from 1.5 to 2.3 µs
// at batch 1 and from 9.1 to 18.8 at batch 16 (H200). A vector's sum is the same in either pass:
// a thread's pieces in k order, then the warp's fixed shuffle tree.
template <typename T, int kThreads>
__device__ __forceinline__ void block_sum_squares(const T* x, int B, int H, float* red) {
  int n0 = 0;
  for (; n0 + 4 <= B; n0 += 4) sum_squares_pass<4, T, kThreads>(x, n0, H, red);
  for (; n0 < B; ++n0) sum_squares_pass<1, T, kThreads>(x, n0, H, red);
}

// rstd[n] = 1 / sqrt(mean(x[n]²) + eps) from block_sum_squares' red. Block-collective (barriers
// before and after).
template <int kThreads>
__device__ __forceinline__ void finish_rstd(const float* red, int B, int H, float eps, float* rstd) {
  __syncthreads();
  for (int n = threadIdx.x; n < B; n += kThreads) {
    float s = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) s += red[n * (kThreads / 32) + w];
    rstd[n] = rsqrtf(s / (float)H + eps);
  }
  __syncthreads();
}

// xs[n][k - k0] = T(w[k] · T(x[n][k] · rstd[n])) for k in [k0, k0 + kc): Hugging Face
// LlamaRMSNorm's rounding. All threads, 8 elements each; no barrier. Unrolled so that several
// pieces' loads are in flight at once (a batch of 16 gives each thread up to 64 pieces).
template <typename T, int kThreads>
__device__ __forceinline__ void normed_to_smem(const T* x, const T* w, const float* rstd, int B, int H, int k0,
                                               int kc, T* xs, int ld) {
#pragma unroll 4
  for (int e = threadIdx.x; e < B * (kc / 8); e += kThreads) {
    const int n = e / (kc / 8), k = (e - n * (kc / 8)) * 8;
    float xf[8], wf[8];
    unpack8<T>(*reinterpret_cast<const uint4*>(x + (size_t)n * H + k0 + k), xf);
    unpack8<T>(*reinterpret_cast<const uint4*>(w + k0 + k), wf);
#pragma unroll
    for (int i = 0; i < 8; ++i) xf[i] = wf[i] * round_to<T>(xf[i] * rstd[n]);
    *reinterpret_cast<uint4*>(xs + n * ld + k) = pack8<T>(xf);
  }
}

}  // namespace clusterfuse::norm
