// clusterfuse/attention/split_kv.cuh — split-KV (flash-decoding) attention for one decode token,
// as used inside the fused attention block: a block attends the G query heads of one KV head
// group to a contiguous range of cached keys, keeping an online-softmax state per query head, and
// the per-block states are merged afterwards (in the block, then across the cluster).
//
// Key layout: a key row is HD contiguous 2-byte elements, read as HD/8 16-byte pieces by HD/8
// consecutive lanes (a "key group"); a warp holds 32/(HD/8) key groups, so consecutive keys of a
// warp are contiguous in memory (contiguous cache) or in the same page (paged cache). Each lane
// issues 2·U independent 16-byte loads (U keys of K and V) before their first use, which with 8
// warps keeps 2·U·4 KB = 32 KB per SM in flight for U = 4.
//
// Softmax runs in base 2: q is pre-scaled by head_dim^-0.5 · log2(e), so p = exp2(s - m).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#include <stdint.h>

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

  // Rows j0 .. j0+15 of sequence b, KV head g (pages hold >= 16 rows, so at most two pages): the
  // first `split` rows start at element base0, the rest at base1 (the next page's first row).
  // Pages clamped as in row(); a contiguous cache never needs base1 below its capacity.
  template <int HD>
  __device__ __forceinline__ void tile(int b, int g, int j0, size_t& base0, size_t& base1, int& split) const {
    int page = b, slot = j0, next = b;
    if (block_table) {
      const int pi = j0 / page_size;
      slot = j0 - pi * page_size;
      const int* rowp = block_table + (size_t)b * max_pages;
      page = min(max(__ldg(rowp + pi), 0), num_pages - 1);
      next = page;
      if (slot + 16 > page_size && pi + 1 < max_pages) next = min(max(__ldg(rowp + pi + 1), 0), num_pages - 1);
    }
    base0 = ((size_t)(page * nkv + g) * page_size + slot) * HD;
    base1 = (size_t)(next * nkv + g) * page_size * HD;
    split = page_size - slot;
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
// The key loop of one block: keys [k0, k1) of sequence b (all read from the cache), G query
// heads `q` (this lane's 8 dims, pre-scaled), spread over all warps of the block. Warp-uniform
// trip count (shuffles inside), so lanes past the end are masked rather than branched away.
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

  for (int base = 0; warp_first + base < k1; base += U * kGroups) {
    uint4 kr[U], vr[U];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = k0 + base + u * kGroups + grp;
      ok[u] = j < k1;
      if (ok[u]) {
        const size_t off = kv.row<HD>(b, g_kv, j) + sub * 8;
        kr[u] = gemv::ld_stream(kc + off);
        vr[u] = gemv::ld_stream(vc + off);
      } else {
        kr[u] = vr[u] = make_uint4(0, 0, 0, 0);
      }
    }
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
      unpack8<T>(vr[u], v[u]);
    }
    st.template update<U>(s, v);
  }
}

}  // namespace attention
}  // namespace clusterfuse
