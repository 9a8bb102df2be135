// clusterfuse/mla/block_phases.cuh — phases of the fused MLA decode block (DeepSeek-V2 multi-head
// latent attention, absorbed form; kernels/mla/mla_block.cu) as device functions. They build on the
// attention block's phases and primitives (attention/block_phases.cuh: key_range, SeqInfo,
// load_rope_angles, o_projection; attention/split_kv.cuh: KvLayout; gemv.cuh; rms_norm.cuh) and
// add what MLA has that Llama attention has not: the absorption of q into K's up-projection, the
// latent row (RMSNorm of c, interleaved RoPE of k_pe) appended to the latent cache, one shared
// "KV head" of 576-wide keys whose first 512 entries are the values, attended by all heads at
// once, and the absorbed V up-projection. Every function is block-collective unless it says
// otherwise.
//
// Dimensions (template parameter D): D::kHeads query heads, latent rank D::kRank, rope dims D::kRope,
// nope dims D::kNope, value dims D::kV. A latent row is [c (kRank) | k_pe (kRope)]; the absorbed
// query of head h is [W_UK_h^T q_nope_h (kRank) | RoPE(q_pe_h) (kRope)], pre-scaled by the softmax
// scale, so that score(h, j) = q_abs_h · row_j and out_h = W_UV_h Σ_j p(h, j) c_j.
//
// Softmax states are records [m, l, o_0 .. o_{kRank-1}] per head in natural-log units (the
// SoftmaxMergeOp<kRank> records of cluster_reduce.cuh), so ClusterReduce merges them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#include <stdint.h>

#include "clusterfuse/attention/block_phases.cuh"
#include "clusterfuse/attention/split_kv.cuh"
#include "clusterfuse/elements.cuh"

namespace clusterfuse {
namespace mla {

using attention::KvLayout;
using clusterfuse::from_f;
using clusterfuse::round_to;
using clusterfuse::to_f;
using clusterfuse::unpack8;

// DeepSeek-V2(-Lite)'s MLA dimensions; a build may name others through its own struct.
template <int kHeads_, int kRank_, int kRope_, int kNope_, int kV_>
struct Dims {
  static constexpr int kHeads = kHeads_, kRank = kRank_, kRope = kRope_, kNope = kNope_, kV = kV_;
  static constexpr int kQHead = kNope + kRope;          // q_proj rows per head
  static constexpr int kQRows = kHeads * kQHead;        // q_proj rows
  static constexpr int kLat = kRank + kRope;            // a latent row (and an absorbed query)
  static constexpr int kProjRows = kQRows + kLat;       // the fused q / KV-down GEMV's rows
  static constexpr int kRec = kRank + 2;                // a softmax state record [m, l, o]
  static_assert(kRank % 256 == 0 && kRope % 16 == 0 && kNope % 8 == 0 && kV % 16 == 0, "MLA dimensions");
};

// ---------------------------------------------------------------------------------------------
// Absorption: q_abs[n][h][c] = scale · Σ_k q_nope[n][h][k] · W_UK[h][k][c] for c < kRank, fp32, from
// the q rows of the projection workspace (proj [B][kProjRows], written by other blocks: read
// through L2). W_UK is kv_b_proj's key rows per head [kHeads][kNope][kRank] as stored, read in
// 16-byte pieces along c. Work: (head, 32-column group) units over the grid's warps (gw of nw);
// lane = (column piece cq = lane % 4, k residue kq = lane / 4 of 8): 32 k per lane, summed over the
// 8 residues by a fixed shuffle tree (deterministic). Sequences in groups of 4 (registers). fp32
// throughout: the reference absorbs in fp32, and rounding q_nope to the weights' dtype would cost
// ~8 mantissa bits of every score. No barrier.
template <typename T, class D>
__device__ __forceinline__ void absorb_q(const T* w_uk, const float* proj, int B, float scale, int gw, int nw,
                                         float* q_abs) {
  constexpr int kGroups = D::kRank / 32, kPerLane = D::kNope / 8;
  const int lane = threadIdx.x & 31, cq = lane & 3, kq = lane >> 2;
  for (int u = gw; u < D::kHeads * kGroups; u += nw) {
    const int h = u / kGroups, c0 = (u - h * kGroups) * 32 + cq * 8;
    const T* w = w_uk + (size_t)h * D::kNope * D::kRank + c0;
    for (int n0 = 0; n0 < B; n0 += 4) {
      float acc[4][8];
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[j][e] = 0.f;
      // Half of the lane's k at a time (registers: the whole of it spilled); the second group of
      // sequences re-reads the pieces from L2.
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        constexpr int kHalf = kPerLane / 2;
        uint4 wr[kHalf];
#pragma unroll
        for (int i = 0; i < kHalf; ++i) wr[i] = __ldcg(reinterpret_cast<const uint4*>(w + (size_t)(kq + 8 * (half * kHalf + i)) * D::kRank));
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float* q = proj + (size_t)min(n0 + j, B - 1) * D::kProjRows + h * D::kQHead;  // past B: never stored
#pragma unroll
          for (int i = 0; i < kHalf; ++i) {
            const float qv = __ldcg(q + kq + 8 * (half * kHalf + i));
            float wf[8];
            unpack8<T>(wr[i], wf);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[j][e] = fmaf(qv, wf[e], acc[j][e]);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 8; ++e)
#pragma unroll
          for (int o = 4; o < 32; o <<= 1) acc[j][e] += __shfl_xor_sync(0xffffffffu, acc[j][e], o);
      if (kq == 0)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int n = n0 + j;
          if (n >= B) break;
          float4* dst = reinterpret_cast<float4*>(q_abs + ((size_t)n * D::kHeads + h) * D::kLat + c0);
          dst[0] = make_float4(acc[j][0] * scale, acc[j][1] * scale, acc[j][2] * scale, acc[j][3] * scale);
          dst[1] = make_float4(acc[j][4] * scale, acc[j][5] * scale, acc[j][6] * scale, acc[j][7] * scale);
        }
    }
  }
}

// The new latent row of sequence n and its queries' rope parts, by the one block that owns n:
//   row[c]            = T(kv_norm[c] · T(c · rstd)),  rstd = 1/sqrt(mean(c²) + latent_eps)   (c < kRank)
//   row[kRank + ..]   = RoPE(k_pe), interleaved pairs (2i, 2i+1), rounded to T
//   q_abs[n][h][kRank + ..] = scale · RoPE(q_pe_h)                                         (fp32)
// The row goes to cache row len[n] of sequence n (kv: the latent cache, one KV head). Angles
// come from at::load_rope_angles<kRope> (thread t holds pairs e = t + j·kThreads < B·kRope/2, e =
// i·B + n). `red`: kThreads/32 floats of scratch. Ends with a block barrier.
template <typename T, class D, int kThreads, int kPairs>
__device__ __forceinline__ void latent_row_and_q_rope(const float* proj, const T* kv_norm, int n, int len,
                                                      float latent_eps, float scale, const float (&rope_cos)[kPairs],
                                                      const float (&rope_sin)[kPairs], int B, const KvLayout& kv,
                                                      T* cache, float* red, float* q_abs) {
  const float* p = proj + (size_t)n * D::kProjRows;
  const float* c = p + D::kQRows;
  T* row = cache + kv.row<D::kLat>(n, 0, len);
  constexpr int kPer = D::kRank / kThreads > 0 ? D::kRank / kThreads : 1;
  float cv[kPer];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = threadIdx.x + i * kThreads;
    cv[i] = d < D::kRank ? __ldcg(c + d) : 0.f;
    ss = fmaf(cv[i], cv[i], ss);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
  // RoPE of k_pe and of every head's q_pe at this thread's pairs of sequence n.
#pragma unroll
  for (int t = 0; t < kPairs; ++t) {
    const int e = threadIdx.x + t * kThreads;
    if (e >= B * (D::kRope / 2)) break;
    if (e % B != n) continue;
    const int i = e / B;
    const float cs = rope_cos[t], sn = rope_sin[t];
    const float x1 = __ldcg(c + D::kRank + 2 * i), x2 = __ldcg(c + D::kRank + 2 * i + 1);
    row[D::kRank + 2 * i] = from_f<T>(x1 * cs - x2 * sn);
    row[D::kRank + 2 * i + 1] = from_f<T>(x1 * sn + x2 * cs);
    for (int h = 0; h < D::kHeads; ++h) {
      const float* q = p + h * D::kQHead + D::kNope + 2 * i;
      const float y1 = __ldcg(q), y2 = __ldcg(q + 1);
      float* dst = q_abs + ((size_t)n * D::kHeads + h) * D::kLat + D::kRank + 2 * i;
      dst[0] = (y1 * cs - y2 * sn) * scale;
      dst[1] = (y1 * sn + y2 * cs) * scale;
    }
  }
  __syncthreads();
  float tot = 0.f;
  for (int w = 0; w < kThreads / 32; ++w) tot += red[w];  // warp order: deterministic
  const float rstd = rsqrtf(tot / (float)D::kRank + latent_eps);
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = threadIdx.x + i * kThreads;
    if (d < D::kRank) row[d] = from_f<T>(to_f(kv_norm[d]) * round_to<T>(cv[i] * rstd));
  }
  __syncthreads();  // red is free again
}

// ---------------------------------------------------------------------------------------------
// Split-KV attention of all kHeads heads of one sequence over its cached rows [k0, k1) (the new
// row included: written before the grid barrier that precedes this phase), into the block's
// state records st [kHeads][kRec]. qs: the absorbed query [kHeads][kLat] fp32 in shared memory;
// kt: a staging tile of kKeyTile rows [kKeyTile][kKtLd] of T. Warp w owns heads 2w, 2w+1 (kHeads
// = 2 × warps): lane j scores key j of the tile for both heads (576-wide dot products against the
// staged rows), the warp keeps its heads' online softmax (max, sum) and accumulates o for its two
// heads over kRank dims, 16 per lane (dims 8·lane.. and 256 + 8·lane.. per 256), with p broadcast
// from lane j. fp32 CUDA-core arithmetic; fixed order (deterministic). Reads the cache through L2
// (__ldcg: the new row was written by another block in this launch, so no non-coherent loads).
// Ends with a block barrier (st written).
constexpr int kKeyTile = 32;

template <class D>
__host__ __device__ constexpr int key_tile_ld() { return D::kLat + 8; }  // 16-byte rows, 4-bank skew per row

// Rows j0 .. j0 + valid - 1 of sequence n into the staging tile kt [kKeyTile][key_tile_ld] (rows
// past `valid` zero), every thread's loads issued before its first store. Begins with a block
// barrier (after the loads: the previous tile may be read until then) and ends with one.
template <typename T, class D, int kThreads>
__device__ __forceinline__ void stage_key_tile(const T* cache, const KvLayout& kv, int n, int j0, int valid, T* kt) {
  constexpr int kRowPieces = D::kLat / 8, kLoads = (kKeyTile * kRowPieces + kThreads - 1) / kThreads;
  uint4 buf[kLoads];
#pragma unroll
  for (int i = 0; i < kLoads; ++i) {
    const int e = threadIdx.x + i * kThreads, r = e / kRowPieces, pc = e - r * kRowPieces;
    buf[i] = (e < kKeyTile * kRowPieces && r < valid)
                 ? __ldcg(reinterpret_cast<const uint4*>(cache + kv.row<D::kLat>(n, 0, j0 + r)) + pc)
                 : make_uint4(0, 0, 0, 0);
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kLoads; ++i) {
    const int e = threadIdx.x + i * kThreads, r = e / kRowPieces, pc = e - r * kRowPieces;
    if (e < kKeyTile * kRowPieces) *reinterpret_cast<uint4*>(kt + r * key_tile_ld<D>() + pc * 8) = buf[i];
  }
  __syncthreads();
}

// A warp's online-softmax statistics of two heads (natural log units) over a tile whose key
// `lane` scores s0, s1 (live: the key exists). step() returns the key's weights p = exp(s - m')
// and the factors a = exp(m - m') that rescale what was accumulated before, m' the new maxima.
struct TwoHeadSoftmax {
  float m0, m1, l0, l1;

  __device__ __forceinline__ TwoHeadSoftmax() {
    m0 = m1 = -CUDART_INF_F;
    l0 = l1 = 0.f;
  }

  __device__ __forceinline__ void step(float s0, float s1, bool live, float& p0, float& p1, float& a0, float& a1) {
    if (!live) s0 = s1 = -CUDART_INF_F;
    float t0 = s0, t1 = s1;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      t0 = fmaxf(t0, __shfl_xor_sync(0xffffffffu, t0, o));
      t1 = fmaxf(t1, __shfl_xor_sync(0xffffffffu, t1, o));
    }
    const float mn0 = fmaxf(m0, t0), mn1 = fmaxf(m1, t1);  // finite: a tile has a live key
    a0 = m0 == -CUDART_INF_F ? 0.f : expf(m0 - mn0), a1 = m1 == -CUDART_INF_F ? 0.f : expf(m1 - mn1);
    p0 = live ? expf(s0 - mn0) : 0.f, p1 = live ? expf(s1 - mn1) : 0.f;
    float z0 = p0, z1 = p1;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      z0 += __shfl_xor_sync(0xffffffffu, z0, o);
      z1 += __shfl_xor_sync(0xffffffffu, z1, o);
    }
    l0 = fmaf(l0, a0, z0), l1 = fmaf(l1, a1, z1);
    m0 = mn0, m1 = mn1;
  }
  // The heads' (m, l) into their records (lane 0).
  __device__ __forceinline__ void store(float* r0, float* r1) const {
    if ((threadIdx.x & 31) == 0) r0[0] = m0, r0[1] = l0, r1[0] = m1, r1[1] = l1;
  }
};

template <typename T, class D, int kThreads>
__device__ __forceinline__ void attend_latent(const T* cache, const KvLayout& kv, int n, int k0, int k1,
                                              const float* qs, T* kt, float* st) {
  constexpr int kWarps = kThreads / 32, kLd = key_tile_ld<D>();
  static_assert(D::kHeads == 2 * kWarps, "attend_latent: two heads per warp");
  constexpr int kDimPieces = D::kRank / 256;  // 16-byte pieces of o per lane and head
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int h0 = 2 * warp, h1 = h0 + 1;
  TwoHeadSoftmax sm;
  float o0[kDimPieces][8], o1[kDimPieces][8];
#pragma unroll
  for (int q = 0; q < kDimPieces; ++q)
#pragma unroll
    for (int e = 0; e < 8; ++e) o0[q][e] = o1[q][e] = 0.f;

  for (int j0 = k0; j0 < k1; j0 += kKeyTile) {
    const int valid = min(kKeyTile, k1 - j0);
    stage_key_tile<T, D, kThreads>(cache, kv, n, j0, valid, kt);
    // Scores of key `lane` for heads h0, h1.
    float s0 = 0.f, s1 = 0.f;
    {
      const T* krow = kt + lane * kLd;
      const float* q0 = qs + h0 * D::kLat;
      const float* q1 = qs + h1 * D::kLat;
#pragma unroll 4
      for (int d = 0; d < D::kLat; d += 8) {
        float kf[8];
        unpack8<T>(*reinterpret_cast<const uint4*>(krow + d), kf);
        const float4 a0 = *reinterpret_cast<const float4*>(q0 + d), a1 = *reinterpret_cast<const float4*>(q0 + d + 4);
        const float4 b0 = *reinterpret_cast<const float4*>(q1 + d), b1 = *reinterpret_cast<const float4*>(q1 + d + 4);
        s0 = fmaf(a0.x, kf[0], s0), s0 = fmaf(a0.y, kf[1], s0), s0 = fmaf(a0.z, kf[2], s0), s0 = fmaf(a0.w, kf[3], s0);
        s0 = fmaf(a1.x, kf[4], s0), s0 = fmaf(a1.y, kf[5], s0), s0 = fmaf(a1.z, kf[6], s0), s0 = fmaf(a1.w, kf[7], s0);
        s1 = fmaf(b0.x, kf[0], s1), s1 = fmaf(b0.y, kf[1], s1), s1 = fmaf(b0.z, kf[2], s1), s1 = fmaf(b0.w, kf[3], s1);
        s1 = fmaf(b1.x, kf[4], s1), s1 = fmaf(b1.y, kf[5], s1), s1 = fmaf(b1.z, kf[6], s1), s1 = fmaf(b1.w, kf[7], s1);
      }
    }
    float p0, p1, a0, a1;
    sm.step(s0, s1, lane < valid, p0, p1, a0, a1);
#pragma unroll
    for (int q = 0; q < kDimPieces; ++q)
#pragma unroll
      for (int e = 0; e < 8; ++e) o0[q][e] *= a0, o1[q][e] *= a1;
    for (int j = 0; j < valid; ++j) {
      const float pj0 = __shfl_sync(0xffffffffu, p0, j), pj1 = __shfl_sync(0xffffffffu, p1, j);
#pragma unroll
      for (int q = 0; q < kDimPieces; ++q) {
        float vf[8];
        unpack8<T>(*reinterpret_cast<const uint4*>(kt + j * kLd + q * 256 + lane * 8), vf);
#pragma unroll
        for (int e = 0; e < 8; ++e) o0[q][e] = fmaf(pj0, vf[e], o0[q][e]), o1[q][e] = fmaf(pj1, vf[e], o1[q][e]);
      }
    }
  }
  // The records: [m, l, o] per head (an empty range: -inf, 0, 0, the merge's identity).
  float* r0 = st + h0 * D::kRec;
  float* r1 = st + h1 * D::kRec;
  sm.store(r0, r1);
#pragma unroll
  for (int q = 0; q < kDimPieces; ++q)
#pragma unroll
    for (int e = 0; e < 8; ++e) r0[2 + q * 256 + lane * 8 + e] = o0[q][e], r1[2 + q * 256 + lane * 8 + e] = o1[q][e];
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// The same attention on tensor cores (mma.m16n8k16; builds with CF_MLA_KEY_MMA=1): the 16 heads
// are the mma's 16 rows, so no row is wasted at any batch. Per 32-key tile:
//   scores  S[16 x 32] = Q[16 x 576] · K^T    warp w: keys 8·(w%4).., dims of half w/4, 18 k-steps;
//                                             the two halves summed in a fixed order in `sp`
//   softmax as attend_latent (warp w: heads 2w, 2w+1, lane = key), p and the rescale factors to smem
//   values  O[16 x 512] += P[16 x 32] · V     warp w: dims 64w .. 64w+63 (8 n-tiles, 32 registers)
// q and p enter as two 2-byte parts each, x = hi + lo (hi = x rounded to T, lo = the rounding
// error rounded), one mma per part: ~16 mantissa bits, as split_kv_mma.cuh (whose measurements
// showed one rounding of q or p too coarse). K fragments are 32-bit loads of the staged rows; V
// fragments ldmatrix.trans of them. Fragment layouts (PTX ISA, m16n8k16, lane = 4g + t):
//   A: a0 (row g, cols 2t, 2t+1)  a1 (row g+8, same)  a2 (row g, cols 2t+8, 2t+9)  a3 (row g+8, same)
//   B: b0 (rows 2t, 2t+1, col g)  b1 (rows 2t+8, 2t+9, col g)      C: c0,c1 (row g) c2,c3 (row g+8), cols 2t, 2t+1
// Row strides of every staged array are ≡ 16 bytes (mod 128) apart per row: conflict-free fragment
// loads. q_abs: this sequence's absorbed query [kHeads][kLat] fp32 in global memory (another
// block's writes: through L2). Ends with a block barrier (st written).
template <class D>
struct MmaAttendLayout {  // byte offsets inside the region the kernel gives attend_latent_mma
  static constexpr int kQLd = D::kLat + 8;     // qh / ql rows (elements)
  static constexpr int kSLd = kKeyTile + 1;    // score partial rows (floats)
  static constexpr int kPLd = kKeyTile + 8;    // ph / pl rows (elements): 80 bytes
  static constexpr int off_ql = D::kHeads * kQLd * 2;
  static constexpr int off_kt = 2 * off_ql;
  static constexpr int off_sp = off_kt + kKeyTile * (D::kLat + 8) * 2;
  static constexpr int off_ph = off_sp + ((2 * D::kHeads * kSLd * 4 + 15) & ~15);
  static constexpr int off_pl = off_ph + D::kHeads * kPLd * 2;
  static constexpr int off_alpha = off_pl + D::kHeads * kPLd * 2;
  static constexpr int bytes = off_alpha + D::kHeads * 4;
  static_assert(off_ql % 16 == 0 && off_kt % 16 == 0 && off_ph % 16 == 0 && off_pl % 16 == 0, "alignment");
};

__device__ __forceinline__ uint32_t ld_pair(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(p))));
}

template <typename T, class D, int kThreads>
__device__ __forceinline__ void attend_latent_mma(const T* cache, const KvLayout& kv, int n, int k0, int k1,
                                                  const float* q_abs, unsigned char* region, float* st) {
  using L = MmaAttendLayout<D>;
  using Mma = gemv::Mma<T>;
  constexpr int kWarps = kThreads / 32, kLd = key_tile_ld<D>();
  static_assert(D::kHeads == 16 && kWarps == 8 && kKeyTile == 32 && D::kRank == 64 * kWarps && D::kLat % 32 == 0,
                "attend_latent_mma: 16 heads, 8 warps, 32-key tiles, 64 value dims per warp");
  T* qh = reinterpret_cast<T*>(region);
  T* ql = reinterpret_cast<T*>(region + L::off_ql);
  T* kt = reinterpret_cast<T*>(region + L::off_kt);
  float* sp = reinterpret_cast<float*>(region + L::off_sp);
  T* ph = reinterpret_cast<T*>(region + L::off_ph);
  T* pl = reinterpret_cast<T*>(region + L::off_pl);
  float* alpha = reinterpret_cast<float*>(region + L::off_alpha);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  // q = hi + lo, rounded to T (the tile loop's first barrier comes before any read).
  for (int e = threadIdx.x; e < D::kHeads * D::kLat / 4; e += kThreads) {
    const float4 v = __ldcg(reinterpret_cast<const float4*>(q_abs) + e);
    const int h = e * 4 / D::kLat, d = e * 4 - h * D::kLat;
    const float f[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const T hi = from_f<T>(f[i]);
      qh[h * L::kQLd + d + i] = hi;
      ql[h * L::kQLd + d + i] = from_f<T>(f[i] - to_f(hi));
    }
  }
  const int h0 = 2 * warp, h1 = h0 + 1;  // the heads whose softmax statistics this warp keeps
  TwoHeadSoftmax sm;
  float acc[8][4];  // O rows g, g+8 (heads), columns 64·warp + 8j + 2t, +1 (dims)
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

  for (int j0 = k0; j0 < k1; j0 += kKeyTile) {
    const int valid = min(kKeyTile, k1 - j0);
    stage_key_tile<T, D, kThreads>(cache, kv, n, j0, valid, kt);  // kt, sp, ph, pl of the last tile are read by now
    {  // scores: keys 8·nt + .., dims of half kh
      const int nt = warp & 3, kh = warp >> 2;
      constexpr int kSteps = D::kLat / 32;  // k-steps of 16 per half
      float c_hi[4] = {0.f, 0.f, 0.f, 0.f}, c_lo[4] = {0.f, 0.f, 0.f, 0.f};
      const T* brow = kt + (nt * 8 + g) * kLd + 2 * t;
      const T* a_hi = qh + g * L::kQLd + 2 * t;
      const T* a_lo = ql + g * L::kQLd + 2 * t;
#pragma unroll 6
      for (int s = 0; s < kSteps; ++s) {
        const int kk = (kh * kSteps + s) * 16;
        const uint32_t b0 = ld_pair(brow + kk), b1 = ld_pair(brow + kk + 8);
        Mma::run(c_hi, ld_pair(a_hi + kk), ld_pair(a_hi + 8 * L::kQLd + kk), ld_pair(a_hi + kk + 8),
                 ld_pair(a_hi + 8 * L::kQLd + kk + 8), b0, b1);
        Mma::run(c_lo, ld_pair(a_lo + kk), ld_pair(a_lo + 8 * L::kQLd + kk), ld_pair(a_lo + kk + 8),
                 ld_pair(a_lo + 8 * L::kQLd + kk + 8), b0, b1);
      }
      float* out = sp + kh * D::kHeads * L::kSLd + nt * 8 + 2 * t;
      out[g * L::kSLd] = c_hi[0] + c_lo[0], out[g * L::kSLd + 1] = c_hi[1] + c_lo[1];
      out[(g + 8) * L::kSLd] = c_hi[2] + c_lo[2], out[(g + 8) * L::kSLd + 1] = c_hi[3] + c_lo[3];
    }
    __syncthreads();
    {  // online softmax of heads h0, h1 over the tile's keys (lane = key)
      const bool live = lane < valid;
      const float* half0 = sp;                        // the scores' sums over dims of half 0
      const float* half1 = sp + D::kHeads * L::kSLd;  // and of half 1
      const float s0 = half0[h0 * L::kSLd + lane] + half1[h0 * L::kSLd + lane];
      const float s1 = half0[h1 * L::kSLd + lane] + half1[h1 * L::kSLd + lane];
      float p0, p1, a0, a1;
      sm.step(s0, s1, live, p0, p1, a0, a1);
      const T p0h = from_f<T>(p0), p1h = from_f<T>(p1);
      ph[h0 * L::kPLd + lane] = p0h, pl[h0 * L::kPLd + lane] = from_f<T>(p0 - to_f(p0h));
      ph[h1 * L::kPLd + lane] = p1h, pl[h1 * L::kPLd + lane] = from_f<T>(p1 - to_f(p1h));
      if (lane == 0) alpha[h0] = a0, alpha[h1] = a1;
    }
    __syncthreads();
    {  // values: this warp's 64 dims of O for all heads
      const float ag = alpha[g], ag8 = alpha[g + 8];
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j][0] *= ag, acc[j][1] *= ag, acc[j][2] *= ag8, acc[j][3] *= ag8;
#pragma unroll
      for (int kk = 0; kk < kKeyTile / 16; ++kk) {
        const T* r_hi = ph + g * L::kPLd + 16 * kk + 2 * t;
        const T* r_lo = pl + g * L::kPLd + 16 * kk + 2 * t;
        const uint32_t h_0 = ld_pair(r_hi), h_1 = ld_pair(r_hi + 8 * L::kPLd), h_2 = ld_pair(r_hi + 8),
                       h_3 = ld_pair(r_hi + 8 * L::kPLd + 8);
        const uint32_t q_0 = ld_pair(r_lo), q_1 = ld_pair(r_lo + 8 * L::kPLd), q_2 = ld_pair(r_lo + 8),
                       q_3 = ld_pair(r_lo + 8 * L::kPLd + 8);
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          // Lanes 8i .. 8i+7 address matrix i: keys 16kk + (lane & 15), dims 64·warp + 16jj + 8·(lane >> 4).
          uint32_t b[4];
          ldmatrix_x4_trans(b, kt + (16 * kk + (lane & 15)) * kLd + 64 * warp + 16 * jj + 8 * (lane >> 4));
          Mma::run(acc[2 * jj], h_0, h_1, h_2, h_3, b[0], b[1]);
          Mma::run(acc[2 * jj], q_0, q_1, q_2, q_3, b[0], b[1]);
          Mma::run(acc[2 * jj + 1], h_0, h_1, h_2, h_3, b[2], b[3]);
          Mma::run(acc[2 * jj + 1], q_0, q_1, q_2, q_3, b[2], b[3]);
        }
      }
    }
  }
  // The records: [m, l, o] per head (an empty range: -inf, 0, 0, the merge's identity).
  sm.store(st + h0 * D::kRec, st + h1 * D::kRec);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int d = 2 + 64 * warp + 8 * j + 2 * t;
    st[g * D::kRec + d] = acc[j][0], st[g * D::kRec + d + 1] = acc[j][1];
    st[(g + 8) * D::kRec + d] = acc[j][2], st[(g + 8) * D::kRec + d + 1] = acc[j][3];
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Merge of the key splits' states and the absorbed V up-projection for this block's rows
// [r0, r1) of the value output (rows h·kV + v, a 16-row multiple): per head h those rows touch,
// o_lat[n] = Σ_s w_s o_s / Σ_s w_s l_s over the `splits` records of sequence n (w_s = exp(m_s - m),
// s in order: deterministic) into ol [B][kRank] fp32 (shared memory), then, a warp per row,
// vout[n][row] = T(Σ_c W_UV[h][v][c] · o_lat[n][c]) (fp32 dot, fixed shuffle tree). A sequence
// whose checks failed (ok[n] == 0) gets NaN. states: [B·splits][kHeads][kRec] (other blocks'
// writes: read through L2). Ends with a block barrier.
template <typename T, class D, int kThreads>
__device__ __forceinline__ void merge_and_up_project(const float* states, int splits, const int* ok, int B,
                                                     const T* w_uv, int r0, int r1, float* ol, T* vout) {
  constexpr int kWarps = kThreads / 32, kPieces = D::kRank / 256;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int h = r0 / D::kV; r0 < r1 && h * D::kV < r1; ++h) {
    for (int e = threadIdx.x; e < B * D::kRank; e += kThreads) {
      const int n = e / D::kRank, c = e - n * D::kRank;
      const float* rec = states + ((size_t)n * splits * D::kHeads + h) * D::kRec;
      const size_t stride = (size_t)D::kHeads * D::kRec;
      float mx = -CUDART_INF_F;
      for (int s = 0; s < splits; ++s) mx = fmaxf(mx, __ldcg(rec + s * stride));
      float l = 0.f, a = 0.f;
      for (int s = 0; s < splits; ++s) {
        const float m = __ldcg(rec + s * stride);
        const float w = m == -CUDART_INF_F ? 0.f : expf(m - mx);
        l = fmaf(__ldcg(rec + s * stride + 1), w, l);
        a = fmaf(__ldcg(rec + s * stride + 2 + c), w, a);
      }
      ol[e] = ok[n] ? a / l : CUDART_NAN_F;
    }
    __syncthreads();
    const int lo = max(r0, h * D::kV), hi = min(r1, (h + 1) * D::kV);
    for (int r = lo + warp; r < hi; r += kWarps) {
      const T* w = w_uv + (size_t)r * D::kRank;  // rows h·kV + v are consecutive
      float wf[kPieces][8];
#pragma unroll
      for (int q = 0; q < kPieces; ++q) unpack8<T>(gemv::ld_stream(w + q * 256 + lane * 8), wf[q]);
      for (int n = 0; n < B; ++n) {
        float s = 0.f;
#pragma unroll
        for (int q = 0; q < kPieces; ++q) {
          const float4 x0 = *reinterpret_cast<const float4*>(ol + n * D::kRank + q * 256 + lane * 8);
          const float4 x1 = *reinterpret_cast<const float4*>(ol + n * D::kRank + q * 256 + lane * 8 + 4);
          s = fmaf(wf[q][0], x0.x, s), s = fmaf(wf[q][1], x0.y, s), s = fmaf(wf[q][2], x0.z, s);
          s = fmaf(wf[q][3], x0.w, s), s = fmaf(wf[q][4], x1.x, s), s = fmaf(wf[q][5], x1.y, s);
          s = fmaf(wf[q][6], x1.z, s), s = fmaf(wf[q][7], x1.w, s);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) vout[(size_t)n * D::kHeads * D::kV + r] = from_f<T>(s);
      }
    }
    __syncthreads();  // ol is rewritten for the next head
  }
}

}  // namespace mla
}  // namespace clusterfuse
