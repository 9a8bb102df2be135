// clusterfuse/attention/split_kv.cuh — split-KV (flash-decoding) attention for one decode token,
// as used inside the fused attention block: a block attends the G query heads of one KV head
// group to a contiguous range of cached keys, keeping an online-softmax state per query head, and
// the per-block states are merged afterwards (in the block, then across the cluster).
//
// Key layout: a key row is HD contiguous 2-byte elements, read as HD/8 16-byte pieces by HD/8
// consecutive lanes (a "key group"); a warp holds 32/(HD/8) key groups, so consecutive keys of a
// warp are contiguous in memory (contiguous cache) or in the same page (paged cache). Each lane
// reads U keys of K and V per iteration: into registers (attend_cached_keys: 2·U·16 bytes per
// lane in flight, then none while it computes), or through a shared-memory pipeline of S stages
// (attend_cached_keys_staged: S - 1 iterations in flight all the time, held by shared memory).
//
// Softmax runs in base 2: q is pre-scaled by head_dim^-0.5 · log2(e), so p = exp2(s - m).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#include <stdint.h>

#include "clusterfuse/async_copy.cuh"
#include "clusterfuse/elements.cuh"
#include "clusterfuse/gemv.cuh"

namespace clusterfuse {
namespace attention {

// 2-byte element helpers (elements.cuh), under the names this file's users know.
using clusterfuse::from_f;
using clusterfuse::pack8;
using clusterfuse::round_to;
using clusterfuse::to_f;
using clusterfuse::unpack8;

// ---------------------------------------------------------------------------------------------
// KV cache addressing. A contiguous cache [B, nkv, cap, HD] is the paged layout with one page of
// `cap` rows per sequence (page = b), so both share one formula.
// ---------------------------------------------------------------------------------------------
struct KvLayout {
  const int* block_table;  // [B, max_pages] or nullptr (contiguous)
  int page_size;           // rows per page (contiguous: capacity)
  int max_pages;           // block_table row length (contiguous: 1)
  int num_pages;           // pages in the cache tensors (contiguous: B)
  int nkv;                 // KV heads

  // Element offset of row `j` of sequence `b`, KV head `g`. A page index outside the cache is
  // clamped: a corrupt block table (validated on the host in eager mode) must not read or write
  // outside the cache tensors.
  template <int HD>
  __device__ __forceinline__ size_t row(int b, int g, int j) const {
    int page = b, slot = j;
    if (block_table) {
      const int pi = j / page_size;
      slot = j - pi * page_size;
      page = __ldg(block_table + (size_t)b * max_pages + pi);
      page = min(max(page, 0), num_pages - 1);
    }
    return ((size_t)(page * nkv + g) * page_size + slot) * HD;
  }
};

// ---------------------------------------------------------------------------------------------
// Online-softmax state of one key group for G query heads; lanes of the group each hold 8 of the
// HD output dimensions (dims sub*8 .. sub*8+7).
// ---------------------------------------------------------------------------------------------
template <int HD, int G>
struct SoftmaxState {
  static constexpr int kLanesPerKey = HD / 8;
  static constexpr int kKeysPerWarp = 32 / kLanesPerKey;

  float m[G], l[G], acc[G][8];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      m[g] = -CUDART_INF_F, l[g] = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
    }
  }

  // Sum of a per-lane partial over the lanes of a key group (fixed xor tree: deterministic).
  static __device__ __forceinline__ float group_sum(float x) {
#pragma unroll
    for (int o = kLanesPerKey / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
  }

  // Fold NU keys into the state. s[u][g]: base-2 scores (−inf for a masked key); v[u]: this
  // lane's 8 value dims of key u. One max and one rescale per NU keys.
  template <int NU>
  __device__ __forceinline__ void update(const float (&s)[NU][G], const float (&v)[NU][8]) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < NU; ++u) mx = fmaxf(mx, s[u][g]);
      if (mx == -CUDART_INF_F) continue;  // nothing seen yet and every key masked
      const float corr = exp2f(m[g] - mx);  // 0 when m was −inf
      l[g] *= corr;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] *= corr;
#pragma unroll
      for (int u = 0; u < NU; ++u) {
        const float p = exp2f(s[u][g] - mx);
        l[g] += p;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(p, v[u][e], acc[g][e]);
      }
      m[g] = mx;
    }
  }

  // Merge the states of the key groups of a warp into every lane (xor over the group bits).
  __device__ __forceinline__ void merge_warp() {
#pragma unroll
    for (int o = kLanesPerKey; o < 32; o <<= 1) {
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m[g], o);
        const float l2 = __shfl_xor_sync(0xffffffffu, l[g], o);
        const float mx = fmaxf(m[g], m2);
        const float a = mx == -CUDART_INF_F ? 0.f : exp2f(m[g] - mx);
        const float b = mx == -CUDART_INF_F ? 0.f : exp2f(m2 - mx);
        l[g] = l[g] * a + l2 * b;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float a2 = __shfl_xor_sync(0xffffffffu, acc[g][e], o);
          acc[g][e] = acc[g][e] * a + a2 * b;
        }
        m[g] = mx;
      }
    }
  }
};

// Weight of a partial state (m_i, l_i) in a merge whose running max is `mx` (0 for empty parts).
__device__ __forceinline__ float merge_weight(float m_i, float mx) {
  return mx == -CUDART_INF_F ? 0.f : exp2f(m_i - mx);
}

// ---------------------------------------------------------------------------------------------
// Fold U keys, whose K and V pieces (this lane's 16 bytes of each) are in kr, vr, into the state;
// ok[u] false: key u is past the range (its pieces may hold anything, even NaN bit patterns).
// ---------------------------------------------------------------------------------------------
template <typename T, int HD, int G, int U>
__device__ __forceinline__ void fold_keys(SoftmaxState<HD, G>& st, const float (&q)[G][8], const uint4 (&kr)[U],
                                          const uint4 (&vr)[U], const bool (&ok)[U]) {
  using St = SoftmaxState<HD, G>;
  float s[U][G], v[U][8];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    float kf[8];
    unpack8<T>(kr[u], kf);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float d = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) d = fmaf(q[g][e], kf[e], d);
      d = St::group_sum(d);
      s[u][g] = ok[u] ? d : -CUDART_INF_F;
    }
    unpack8<T>(ok[u] ? vr[u] : make_uint4(0, 0, 0, 0), v[u]);  // p = 0 must not meet a NaN
  }
  st.template update<U>(s, v);
}

// Key j of iteration `it`, unroll slot u, key group grp of a block's loop over [k0, k1).
template <int U, int kGroups>
__device__ __forceinline__ int loop_key(int k0, int it, int u, int grp) {
  return k0 + it * U * kGroups + u * kGroups + grp;
}

// ---------------------------------------------------------------------------------------------
// The key loop of one block: keys [k0, k1) of sequence b (all read from the cache), G query
// heads `q` (this lane's 8 dims, pre-scaled), spread over all warps of the block. Warp-uniform
// trip count (shuffles inside), so lanes past the end are masked rather than branched away.
//
// Register path (this function): each iteration loads U keys of K and V into registers, then
// computes on them; nothing is in flight while it computes.
// ---------------------------------------------------------------------------------------------
template <typename T, int HD, int G, int U, int kWarps>
__device__ __forceinline__ void attend_cached_keys(SoftmaxState<HD, G>& st, const float (&q)[G][8], const T* kc,
                                                   const T* vc, const KvLayout& kv, int b, int g_kv, int k0,
                                                   int k1) {
  using St = SoftmaxState<HD, G>;
  constexpr int kGroups = kWarps * St::kKeysPerWarp;  // key groups in the block
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane % St::kLanesPerKey;
  const int grp = warp * St::kKeysPerWarp + lane / St::kLanesPerKey;
  const int warp_first = k0 + warp * St::kKeysPerWarp;

  for (int it = 0; warp_first + it * U * kGroups < k1; ++it) {
    uint4 kr[U], vr[U];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = loop_key<U, kGroups>(k0, it, u, grp);
      ok[u] = j < k1;
      if (ok[u]) {
        const size_t off = kv.row<HD>(b, g_kv, j) + sub * 8;
        kr[u] = gemv::ld_stream(kc + off);
        vr[u] = gemv::ld_stream(vc + off);
      } else {
        kr[u] = vr[u] = make_uint4(0, 0, 0, 0);
      }
    }
    fold_keys<T, HD, G, U>(st, q, kr, vr, ok);
  }
}

// Shared memory of the staged key loop: `stages` x U x (K, V) 16-byte slots per thread, laid out
// [stage][u][K | V][thread] so that a warp's slots are 512 contiguous bytes (no bank conflicts).
template <int U, int kThreads>
struct KvStaging {
  static constexpr int kStageSlots = U * 2 * kThreads;
  static constexpr int kStageBytes = kStageSlots * 16;
};

// The same loop, staged (kv_stages >= 2): every thread copies its pieces of iteration it + S - 1
// into shared memory (cp.async) before computing on iteration it, so S - 1 iterations of K and V
// are in flight while it computes, with no registers held by them. Same keys per lane in the same
// order as the register path: the two give bit-identical states. `staging` (16-byte aligned)
// holds KvStaging<U, kThreads>::kStageBytes x `stages`; on return no copy is in flight.
template <typename T, int HD, int G, int U, int kWarps>
__device__ __forceinline__ void attend_cached_keys_staged(SoftmaxState<HD, G>& st, const float (&q)[G][8],
                                                          const T* kc, const T* vc, const KvLayout& kv, int b,
                                                          int g_kv, int k0, int k1, uint4* staging, int stages) {
  using St = SoftmaxState<HD, G>;
  using Stg = KvStaging<U, kWarps * 32>;
  constexpr int kThreads = kWarps * 32;
  constexpr int kGroups = kWarps * St::kKeysPerWarp;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane % St::kLanesPerKey;
  const int grp = warp * St::kKeysPerWarp + lane / St::kLanesPerKey;
  const int warp_first = k0 + warp * St::kKeysPerWarp;
  const int step = U * kGroups;
  const int iters = warp_first < k1 ? (k1 - warp_first + step - 1) / step : 0;  // warp-uniform
  uint4* mine = staging + threadIdx.x;

  // One commit group per iteration (empty past the end), so that "iteration it has landed" is
  // "at most stages - 1 groups pending" after iteration it + stages - 1 was issued.
  auto issue = [&](int it, int stage) {
    if (it < iters) {
      uint4* slot = mine + stage * Stg::kStageSlots;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = loop_key<U, kGroups>(k0, it, u, grp);
        if (j < k1) {
          const size_t off = kv.row<HD>(b, g_kv, j) + sub * 8;
          async_copy::copy16(slot + (2 * u) * kThreads, kc + off);
          async_copy::copy16(slot + (2 * u + 1) * kThreads, vc + off);
        }
      }
    }
    async_copy::commit();
  };
  for (int s = 0; s < stages - 1; ++s) issue(s, s);
  int read_stage = 0, write_stage = stages - 1;
  for (int it = 0; it < iters; ++it) {
    issue(it + stages - 1, write_stage);  // into the stage iteration it - 1 read
    async_copy::wait_pending(stages - 1);
    const uint4* slot = mine + read_stage * Stg::kStageSlots;
    uint4 kr[U], vr[U];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      ok[u] = loop_key<U, kGroups>(k0, it, u, grp) < k1;
      kr[u] = slot[(2 * u) * kThreads];
      vr[u] = slot[(2 * u + 1) * kThreads];
    }
    fold_keys<T, HD, G, U>(st, q, kr, vr, ok);
    read_stage = read_stage + 1 == stages ? 0 : read_stage + 1;
    write_stage = write_stage + 1 == stages ? 0 : write_stage + 1;
  }
  async_copy::wait_pending(0);  // only empty groups remain; the caller may reuse `staging`
}

}  // namespace attention
}  // namespace clusterfuse
