// clusterfuse/attention/split_kv.cuh — what split-KV (flash-decoding) attention for one decode
// token shares between its phases inside the fused attention block: KV cache addressing (a
// contiguous cache is the paged one with one page per sequence) and the weight of a partial
// online-softmax state in a merge. A block attends the G query heads of one KV head group to a
// contiguous range of cached keys (the key loop: split_kv_mma.cuh), keeping an online-softmax state
// per query head, and the per-block states are merged afterwards (in the block, then across the
// cluster: the attention kernel's merge).
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

// Weight of a partial state (m_i, l_i) in a merge whose running max is `mx` (0 for empty parts).
__device__ __forceinline__ float merge_weight(float m_i, float mx) {
  return mx == -CUDART_INF_F ? 0.f : exp2f(m_i - mx);
}

}  // namespace attention
}  // namespace clusterfuse
