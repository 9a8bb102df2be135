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
// kStage: each loaded piece is also stored raw at stage[n * ld + k] (PrologueNorm). A thread's
// pieces go kPieces at a time, all their loads issued before the first use: with a store per piece
// in the loop body, the compiler's unrolled loop issued each piece's loads only after the previous
// piece's store, which waits for its data (one memory latency per piece: the norm phase 1.7 ->
// 2.7 µs, H100, Llama-2-7B batch 1).
template <int kV, typename T, int kThreads, bool kStage>
__device__ __forceinline__ void sum_squares_pass(const T* x, int n0, int H, float* red, T* stage, int ld) {
  constexpr int kPieces = 4;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float ss[kV] = {};
  for (int k0 = threadIdx.x * 8; k0 < H; k0 += kPieces * kThreads * 8) {
    uint4 u[kPieces][kV];
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {
      const int k = k0 + i * kThreads * 8;
#pragma unroll
      for (int j = 0; j < kV; ++j)
        if (k < H) u[i][j] = *reinterpret_cast<const uint4*>(x + (size_t)(n0 + j) * H + k);
    }
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {
      const int k = k0 + i * kThreads * 8;
      if (k >= H) break;
#pragma unroll
      for (int j = 0; j < kV; ++j) {
        if (kStage) *reinterpret_cast<uint4*>(stage + (n0 + j) * ld + k) = u[i][j];
        float f[8];
        unpack8<T>(u[i][j], f);
#pragma unroll
        for (int e = 0; e < 8; ++e) ss[j] = fmaf(f[e], f[e], ss[j]);
      }
    }
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
// a thread's pieces in k order, then the warp's fixed shuffle tree. With `stage` (B rows of ld
// elements), x is also copied there raw for PrologueNorm. Staging is a template
// flag, not a test per piece: as a runtime test, its stores held registers in the four-vector pass
// of every launch and the attention block's GQA-4 kernel spilled (ptxas -v, 0 -> 16 bytes).
template <typename T, int kThreads, bool kStage>
__device__ __forceinline__ void sum_squares_passes(const T* x, int B, int H, float* red, T* stage, int ld) {
  int n0 = 0;
  for (; n0 + 4 <= B; n0 += 4) sum_squares_pass<4, T, kThreads, kStage>(x, n0, H, red, stage, ld);
  for (; n0 < B; ++n0) sum_squares_pass<1, T, kThreads, kStage>(x, n0, H, red, stage, ld);
}

template <typename T, int kThreads>
__device__ __forceinline__ void block_sum_squares(const T* x, int B, int H, float* red, T* stage = nullptr,
                                                  int ld = 0) {
  if (stage)
    sum_squares_passes<T, kThreads, true>(x, B, H, red, stage, ld);
  else
    sum_squares_passes<T, kThreads, false>(x, B, H, red, stage, ld);
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

// Hugging Face LlamaRMSNorm's rounding of one piece of 8: T(w · T(x · rstd)), packed.
template <typename T>
__device__ __forceinline__ uint4 norm_piece(const uint4& x, const uint4& w, float rstd) {
  float xf[8], wf[8];
  unpack8<T>(x, xf);
  unpack8<T>(w, wf);
#pragma unroll
  for (int i = 0; i < 8; ++i) xf[i] = wf[i] * round_to<T>(xf[i] * rstd);
  return pack8<T>(xf);
}

// xs[n][k - k0] = T(w[k] · T(x[n][k] · rstd[n])) for k in [k0, k0 + kc). All threads, 8 elements
// each; no barrier. Unrolled so that several pieces' loads are in flight at once (a batch of 16
// gives each thread up to 64 pieces).
template <typename T, int kThreads>
__device__ __forceinline__ void normed_to_smem(const T* x, const T* w, const float* rstd, int B, int H, int k0,
                                               int kc, T* xs, int ld) {
#pragma unroll 4
  for (int e = threadIdx.x; e < B * (kc / 8); e += kThreads) {
    const int n = e / (kc / 8), k = (e - n * (kc / 8)) * 8;
    *reinterpret_cast<uint4*>(xs + n * ld + k) =
        norm_piece<T>(*reinterpret_cast<const uint4*>(x + (size_t)n * H + k0 + k),
                      *reinterpret_cast<const uint4*>(w + k0 + k), rstd[n]);
  }
}

// A fused block's prologue norm that reads x once: block_sum_squares stages x raw into the GEMV's
// buffer xs while the norm weights of the same pieces (k = 8 · (threadIdx.x + j · kThreads)) load
// beside it into registers, so that their latency is shared with the sums' instead of following
// rstd; finish() then normalizes xs in place, each thread only the pieces it staged (no barrier
// beyond rstd's; the caller's barrier before the GEMV publishes xs). Off (`staged` false: x is
// chunked, or H > kMaxHidden, or the caller's A/B switch): the sums alone, and the caller fills xs
// with normed_to_smem after finish().
template <typename T, int kThreads, int kMaxHidden>
struct PrologueNorm {
  static constexpr int kPieces = kMaxHidden / (8 * kThreads);
  bool staged;
  uint4 w[kPieces];

  // The sums of squares into red (block_sum_squares); no barrier.
  __device__ __forceinline__ void start(bool stage, const T* x, const T* norm_w, int B, int H, float* red, T* xs,
                                        int ld) {
    staged = stage && H <= kMaxHidden;
    if (staged) {
#pragma unroll
      for (int j = 0; j < kPieces; ++j) {
        const int k = (threadIdx.x + j * kThreads) * 8;
        if (k < H) w[j] = *reinterpret_cast<const uint4*>(norm_w + k);
      }
    }
    block_sum_squares<T, kThreads>(x, B, H, red, staged ? xs : nullptr, ld);
  }

  // rstd (finish_rstd, with its barriers), then xs[n][k] = T(w[k] · T(x[n][k] · rstd[n])) in place
  // if staged: normed_to_smem's rounding.
  __device__ __forceinline__ void finish(const float* red, int B, int H, float eps, float* rstd, T* xs, int ld) const {
    finish_rstd<kThreads>(red, B, H, eps, rstd);
    if (!staged) return;
#pragma unroll
    for (int j = 0; j < kPieces; ++j) {
      const int k = (threadIdx.x + j * kThreads) * 8;
      if (k >= H) break;
      for (int n = 0; n < B; ++n) {
        uint4* piece = reinterpret_cast<uint4*>(xs + n * ld + k);
        *piece = norm_piece<T>(*piece, w[j], rstd[n]);
      }
    }
  }
};

}  // namespace clusterfuse::norm
