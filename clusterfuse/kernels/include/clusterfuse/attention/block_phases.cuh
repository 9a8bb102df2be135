// clusterfuse/attention/block_phases.cuh — phases of the fused attention block as device functions,
// one implementation each, for the per-block kernel (kernels/attention/attention_block.cu) and the
// persistent decode program to compose: key ranges (with or without a sliding window), the
// per-sequence info, RoPE's angles, QK-norm, RoPE + rounding, KV append, the new token's scores
// and the O projection so far. The kernel's other phases move here the same way, each only when
// tools/compare_machine_code.sh shows unchanged machine code; until then both callers run them as
// the shared statements of attention/group_program_body.cuh. Every function is block-collective
// (all threads of the block call it) unless it says otherwise.
//
// The q,k,v rows live in shared memory as `res [(G + 2) * HD][B]` fp32: rows g*HD.. of query head
// g (g < G), then the KV head's k row (G*HD..) and v row ((G+1)*HD..), sequence-fastest.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "clusterfuse/attention/split_kv.cuh"
#include "clusterfuse/attention/split_kv_mma.cuh"
#include "clusterfuse/gemv.cuh"
#include "clusterfuse/split_range.cuh"

namespace clusterfuse {
namespace attention {

// Per sequence, in shared memory (kMaxBatch: the build's largest batch). The prologue's checks write
// ok / len / pos (a bad sequence: len and pos 0), so that the later phases never wait on the
// global arrays again, and this block's work list (WorkList: k0, k_end, first).
template <int kMaxBatch>
struct SeqInfo {
  int ok[kMaxBatch], len[kMaxBatch], pos[kMaxBatch];
  int k0[kMaxBatch], k_end[kMaxBatch], first[kMaxBatch + 1];  // WorkList's order
  __device__ __forceinline__ WorkList work_list() const { return WorkList{k0, kMaxBatch}; }
};

// Cached keys [k0, k1) of a sequence with `len` of them that block `rank` of C attends: near-equal
// runs of whole 16-key tiles (the last run ends at len). Tiles then start at multiples of 16, so
// in a paged cache whose pages hold a multiple of 16 rows no tile spans two pages, and the key
// loop loads every full tile at fixed offsets (split_kv_mma.cuh). The new token (key len) is not
// in any range: every block holds its k and v after the q,k,v exchange, and the merge adds its
// state to the blocks'. In the key loop, as a one-key tile of the block whose range ended at len,
// it made that block's attention phase 0.8-1.5 µs longer at batch 1 and 2.5-5 at 16, and the
// cluster waited for it in the merge (H100, bench/results/new_token_in_merge_h100.md).
__device__ __forceinline__ void key_range(int len, int C, int rank, int& k0, int& k1) {
  constexpr int kTile = kTileKeys;
  clusterfuse::split_range((len + kTile - 1) / kTile, C, rank, kTile, k0, k1);
  k1 = min(k1, len);
}

// key_range with a sliding window (CF_ATTN_WINDOW builds): the new token, at row len, sees the last
// `window` rows len - window + 1 .. len (the reference's causal_attention: a key is hidden when
// key <= row - window), so the cached keys [lo, len) with lo = max(0, len + 1 - window). They are
// split as key_range splits [0, len - a) from the tile boundary a = window_tile_start(lo) <= lo,
// shifted by a, so that the tiles stay at multiples of 16 (in a paged cache whose pages hold a
// multiple of 16 rows, every whole tile is one bulk load, as without a window). The block whose
// range starts at a gets k0 = lo: the key loop masks its first tile's keys a .. lo - 1
// (split_kv_mma.cuh, Segment::skip). Ranges stay ordered (k0 <= k1); an empty one has no tiles
// (window_tiles). window 0: no window (key_range's [0, len)). Before, the ranges started at lo, so
// their tiles straddled pages and loaded row by row.
__device__ __forceinline__ void window_key_range(int len, int window, int C, int rank, int& k0, int& k1) {
  const int lo = window > 0 ? max(0, len + 1 - window) : 0;
  const int a = window_tile_start(lo);
  key_range(len - a, C, rank, k0, k1);
  k0 += a, k1 += a;
  k0 = min(max(k0, lo), k1);
}

// RoPE's cos/sin for this thread's (sequence, rotation pair)s e = t + i·kThreads < B·HD/2 (as
// rope_and_round walks them), from the tables [max_pos][HD/2] at each sequence's position pos[n],
// into registers: loaded before the q,k,v exchange so that they arrive during it (loaded in the
// RoPE loop, each waited for in turn: 11-15 µs at batch 16). No barrier.
template <int HD, int kThreads, int kPairs>
__device__ __forceinline__ void load_rope_angles(const float* cos, const float* sin, const int* pos, int B,
                                                 float (&rope_cos)[kPairs], float (&rope_sin)[kPairs]) {
#pragma unroll
  for (int t = 0; t < kPairs; ++t) {
    const int e = threadIdx.x + t * kThreads;
    if (e >= B * (HD / 2)) break;
    const int n = e % B, i = e / B;
    rope_cos[t] = cos[(size_t)pos[n] * (HD / 2) + i];
    rope_sin[t] = sin[(size_t)pos[n] * (HD / 2) + i];
  }
}

// QK-norm (Qwen3, CF_ATTN_QK_NORM builds): each of the G query heads and the k head in `res`
// RMSNormed over its HD dims in place, after the projection (and its bias) and before RoPE, rounded
// as the reference's rms_norm of the stored q (Hugging Face's Qwen3RMSNorm):
//   x = T(q);  q <- T(w · T(x · rsqrt(mean(x²) + eps)))    w: q_norm_w / k_norm_w [HD] in T.
// Every block normalises all G + 1 rows after the q,k,v exchange (as RoPE runs in every block), so
// the blocks hold identical values. L lanes per (head, sequence) row, the rows sequence-fastest
// across a warp's lanes so that neighbouring lanes read neighbouring words of res (as in
// new_token_scores); each lane sums dims sub, sub + L, ... in order, then a fixed butterfly over
// the row's lanes (deterministic). Ends with a block barrier (RoPE reads other threads' dims).
template <typename T, int HD, int G, int kThreads>
__device__ __forceinline__ void qk_norm(float* res, int B, const T* q_norm_w, const T* k_norm_w, float eps) {
  constexpr int kWarps = kThreads / 32;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rows = (G + 1) * B;  // row head·B + n: head (G: the k head) of sequence n
  int L = 32;
  while (L > 1 && L * rows > kThreads) L >>= 1;
  const int P = 32 / L, sub = lane / P;  // lanes p, p + P, ... of a warp hold its row p
  for (int base = warp * P; base < rows; base += kWarps * P) {  // warp-uniform (the shuffles)
    const int row = base + lane % P, head = row / B, n = row - head * B;
    const bool mine = row < rows;
    float* r = res + head * HD * B + n;
    float ss = 0.f;
    if (mine)
#pragma unroll 4
      for (int d = sub; d < HD; d += L) {
        const float x = round_to<T>(r[d * B]);
        ss = fmaf(x, x, ss);
      }
    for (int o = P; o < 32; o <<= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (mine) {
      const float rstd = rsqrtf(ss / (float)HD + eps);
      const T* w = head < G ? q_norm_w : k_norm_w;
#pragma unroll 4
      for (int d = sub; d < HD; d += L) r[d * B] = round_to<T>(to_f(w[d]) * round_to<T>(round_to<T>(r[d * B]) * rstd));
    }
  }
  __syncthreads();
}

// RoPE (rotate-half) of the G query heads and the k head in `res`, and rounding of the new k and v
// to the cache dtype T (the cache holds them rounded; the merge uses the same values). Thread t
// handles the (sequence, rotation pair)s e = t + i·kThreads < B·HD/2 with cos/sin preloaded into
// registers (rope_cos / rope_sin [kPairs]: loaded before the exchange, so that they arrive during
// it). Ends with a block barrier.
template <typename T, int HD, int G, int kThreads, int kPairs>
__device__ __forceinline__ void rope_and_round(float* res, int B, const float (&rope_cos)[kPairs],
                                               const float (&rope_sin)[kPairs]) {
#pragma unroll
  for (int t = 0; t < kPairs; ++t) {
    const int e = threadIdx.x + t * kThreads;
    if (e >= B * (HD / 2)) break;
    const int n = e % B, i = e / B;
    const float cs = rope_cos[t], sn = rope_sin[t];
#pragma unroll
    for (int head = 0; head < G + 2; ++head) {
      float* r1 = res + (head * HD + i) * B + n;
      float* r2 = r1 + (HD / 2) * B;
      if (head <= G) {  // q heads 0..G-1, k head G
        const float x1 = *r1, x2 = *r2;
        float y1 = x1 * cs - x2 * sn, y2 = x2 * cs + x1 * sn;
        if (head == G) y1 = round_to<T>(y1), y2 = round_to<T>(y2);
        *r1 = y1, *r2 = y2;
      } else {
        *r1 = round_to<T>(*r1), *r2 = round_to<T>(*r2);
      }
    }
  }
  __syncthreads();
}

// KV append: the new k and v rows of `res` written at row len[n] of each sequence n this block
// owns (n = rank, rank + C, ...: one block per sequence), none for a sequence whose checks failed
// (ok[n] == 0). No barrier.
template <typename T, int HD, int G, int kThreads>
__device__ __forceinline__ void append_kv(const float* res, int B, int rank, int C, const int* ok, const int* len,
                                          const KvLayout& kv, int g_kv, T* k_cache, T* v_cache) {
  for (int n = rank; n < B; n += C) {
    if (!ok[n]) continue;
    const size_t off = kv.row<HD>(n, g_kv, len[n]);
    for (int d = threadIdx.x; d < HD; d += kThreads) {
      k_cache[off + d] = from_f<T>(res[(G * HD + d) * B + n]);
      v_cache[off + d] = from_f<T>(res[((G + 1) * HD + d) * B + n]);
    }
  }
}

// The new token's score per (sequence, head), for the merge, which adds it as one more state:
// q (rotated) · k (rotated, rounded) in fp32 from `res`, times qscale, into snew [B][G]. One pass:
// L lanes per (sequence, head) pair, as many as the block has for them, each summing dims sub,
// sub + L, ... in order, then a fixed butterfly (deterministic). The pairs go sequence-fastest
// across a warp's lanes, so that neighbouring lanes read neighbouring words of res; one pair per 8
// lanes with 16 consecutive dims each made every lane of a warp hit one bank at batch 16 (+4.6 µs,
// Llama-3-8B). No barrier.
template <int HD, int G, int kThreads>
__device__ __forceinline__ void new_token_scores(const float* res, int B, float qscale, float* snew) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int pairs = B * G;
  int L = 32;
  while (L > 1 && L * pairs > kThreads) L >>= 1;
  const int P = 32 / L, sub = lane / P;  // lanes p, p + P, ... of a warp hold its pair p
  const int pair = warp * P + lane % P, g = pair / B, n = pair - g * B;
  float s = 0.f;
  if (pair < pairs)
#pragma unroll 4
    for (int d = sub; d < HD; d += L) s = fmaf(res[(g * HD + d) * B + n], res[(G * HD + d) * B + n], s);
  for (int o = P; o < 32; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (pair < pairs && sub == 0) snew[n * G + g] = s * qscale;
}

// Phase 3, the O projection: o (xo [B][ld], this cluster's G·HD columns, in every block after the
// state merge) times this block's rows h0.. of W_o restricted to those columns (wo_rows) into the
// cluster's fp32 partial y [B][H] (yc = partials + cluster·B·H, rows h0.. of each sequence).
// part: the GEMV's k-split partials. No barrier after it (the cross-cluster reduction starts with
// its own).
template <typename T, int NT, int kDepth>
__device__ __forceinline__ void o_projection(const gemv::WeightRows<T>& wo_rows, int ks, const T* xo, int ld, int B,
                                             int H, int h0, float* part, float* yc) {
  auto epi_o = [&](int row, int n, float v) { yc[(size_t)n * H + h0 + row] = v; };
  gemv::block_gemv<T, NT, kDepth>(wo_rows, ks, xo, ld, B, part, epi_o);
}

}  // namespace attention
}  // namespace clusterfuse
