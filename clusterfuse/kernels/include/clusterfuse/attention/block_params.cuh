// clusterfuse/attention/block_params.cuh — the fused attention block kernel's parameters
// (kernels/attention/attention_block.cu), filled by cf_attention_block_launch from the C ABI's
// CfAttentionBlockArgs and plan (clusterfuse/abi/attention_block.h). T: the build's element type;
// kMaxCluster: CF_ATTENTION_BLOCK_MAX_CLUSTER. B: batch, H: hidden size, nh: query heads, C:
// blocks per KV head group; kRows = (G + 2)·hd, the group's Q/K/V rows.
#pragma once

#include "clusterfuse/attention/split_kv.cuh"

namespace clusterfuse {
namespace attention {

template <typename T, int kMaxCluster>
struct BlockParams {
  const T* hidden;        // [B, H]
  const T* norm_w;        // [H]
  const T* w_qkv;         // [(nh + 2 nkv) hd, H]
  const T* b_qkv;         // [(nh + 2 nkv) hd] or nullptr
  const T* w_o;           // [H, nh hd]
  const float* cos;       // [max_pos, hd/2]
  const float* sin;       // [max_pos, hd/2]
  const void* positions;  // [B] int32 or int64
  T* k_cache;             // contiguous [B, nkv, cap, hd] or paged [pages, nkv, page, hd]
  T* v_cache;
  const int* cache_lens;  // [B]
  const T* residual;      // [B, H] or nullptr
  void* out;              // [B, H]: fp32, or hidden's dtype with residual
  float* partials;        // [nkv, B, H]
  float* ws_qkv;          // [nkv, kRows, B] (global exchange)
  float* ws_attn;         // [nkv, C, B, G, hd + 2] (global exchange)
  unsigned int* counters; // [1 + kMaxCluster], zero once; self-resetting
  unsigned int* group_counters;  // [groups] (flat exchange), zero once; self-resetting
  int* error;             // set to 1 when a sequence's length / position / page is out of range
  unsigned long long* timeline;  // [grid][kTimelineSlots] (CF_ATTN_TIMELINE builds) or nullptr
  KvLayout kv;
  int B, H, nh, C, max_pos, pos64;
  int kc;                 // k chunk of the QKV GEMV (multiple of 128)
  int ks_o;               // k split of the O-projection GEMV
  int part_floats;        // floats of the GEMVs' k-split partial buffer (the plan's, for Layout)
  int coresident;         // whole grid resident: reduce partials after a grid barrier
  int kv_prefetch_keys;   // keys per sequence prefetched into L2 per block: the first tiles of the warps' runs
  int pdl_early;          // programmatic launch: let the next kernel start before the grid barrier
  float eps;
  signed char ks_qkv[kMaxCluster];  // k split per rank of the QKV GEMV (all of the rank's pieces)
  // Last, so that the fields above keep their offsets in builds that do not read these:
  const T* q_norm_w;      // [hd] (CF_ATTN_QK_NORM builds)
  const T* k_norm_w;      // [hd] (CF_ATTN_QK_NORM builds)
  int window;             // keys attended, the new token's included; 0: all (CF_ATTN_WINDOW builds)
};

}  // namespace attention
}  // namespace clusterfuse
