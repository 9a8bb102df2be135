/* clusterfuse/abi/attention_block.h — the C ABI of the fused attention block's library
 * (kernels/attention/attention_block.cu): one struct per entry point, mirrored once in Python
 * (clusterfuse/ops/kernel_abi.py; tests/test_kernel_abi.py checks every offset against this file).
 * Plain C: fixed-width fields, no padding surprises between compilers.
 *
 *   cf_attention_block_spec(&spec)                 what this build was specialised for
 *   cf_attention_block_plan(&shape, &plan)         grid, shared memory, k splits (per device)
 *   cf_attention_block_launch(&args, &plan, stream)
 * Each returns 0, a cudaError_t, or a negative code (cf_attention_block_error). */
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { CF_ATTENTION_BLOCK_MAX_CLUSTER = 16 };

/* Compile-time shape of the library. */
typedef struct CfAttentionBlockSpec {
  int32_t dtype;           /* 0 bf16, 1 fp16 */
  int32_t head_dim;        /* 64 or 128 */
  int32_t gqa;             /* query heads per KV head */
  int32_t max_batch;       /* 8 per batch tile */
  int32_t timeline_slots;  /* per block; 0 unless built with CF_ATTN_TIMELINE=1 */
  int32_t threads;         /* per block */
  int32_t qk_norm;         /* 1: built with CF_ATTN_QK_NORM (per-head RMSNorm of q and k before RoPE) */
  int32_t window;          /* 1: built with CF_ATTN_WINDOW (sliding-window attention, args.window) */
} CfAttentionBlockSpec;

/* One launch configuration. exchange: 0 global workspace, 1 DSM, 2 flat (no hardware cluster). */
typedef struct CfAttentionBlockShape {
  int32_t batch, hidden, heads, kv_heads, cluster, exchange;
} CfAttentionBlockShape;

/* What cf_attention_block_plan decides for a shape on the current device. */
typedef struct CfAttentionBlockPlan {
  int32_t smem_bytes;       /* dynamic shared memory per block */
  int32_t k_chunk;          /* k chunk of the Q/K/V GEMV (multiple of 128) */
  int32_t ksplit_o;         /* k split of the O-projection GEMV */
  int32_t coresident;       /* the whole grid is resident: partials reduced after a grid barrier */
  int32_t active_clusters;  /* clusters (flat: blocks) the device holds at once */
  int32_t partial_floats;   /* floats of the GEMVs' k-split partial buffer */
  int32_t ksplit_qkv[CF_ATTENTION_BLOCK_MAX_CLUSTER]; /* per rank: k split of its Q/K/V GEMV */
} CfAttentionBlockPlan;

/* One launch: tensors (device pointers), sizes and options. */
typedef struct CfAttentionBlockArgs {
  CfAttentionBlockShape shape;
  const void* hidden;          /* [B, H] */
  const void* norm_w;          /* [H] */
  const void* w_qkv;           /* [(nh + 2 nkv) hd, H] */
  const void* b_qkv;           /* [(nh + 2 nkv) hd] or NULL */
  const void* w_o;             /* [H, nh hd] */
  const float* cos;            /* [max_pos, hd/2] */
  const float* sin;            /* [max_pos, hd/2] */
  const void* positions;       /* [B] int32 or int64 (positions_int64) */
  void* k_cache;               /* contiguous [B, nkv, cap, hd] or paged [pages, nkv, page, hd] */
  void* v_cache;
  const int32_t* cache_lens;   /* [B] */
  const int32_t* block_table;  /* [B, max_pages] or NULL (contiguous) */
  const void* residual;        /* [B, H] or NULL */
  void* out;                   /* [B, H]: fp32, or hidden's dtype with residual */
  float* partials;             /* [nkv, B, H] */
  float* ws_qkv;               /* [nkv, rows, B] (global / flat exchange) or NULL */
  float* ws_attn;              /* [nkv, C, state floats] (global / flat exchange) or NULL */
  uint32_t* counters;          /* [1 + max cluster], zero once; self-resetting */
  uint32_t* group_counters;    /* [256] (flat exchange), zero once; self-resetting */
  int32_t* error;              /* set to 1 when a sequence's length / position / page is out of range */
  uint64_t* timeline;          /* [grid, timeline_slots] (timeline builds) or NULL */
  int32_t max_pos;             /* rows of cos / sin */
  int32_t positions_int64;
  int32_t page_size;           /* paged: rows per page; contiguous: capacity */
  int32_t max_pages;           /* paged: block_table row length; contiguous: 1 */
  int32_t num_pages;           /* paged: pages in the caches; contiguous: B */
  int32_t kv_prefetch_keys;    /* keys per sequence prefetched into L2 per block */
  int32_t launch_mode;         /* 0 ordered, 1 successor starts at exit, 2 before the grid barrier (pdl.cuh) */
  float eps;
  const void* q_norm_w;        /* [hd] (qk_norm builds) or NULL */
  const void* k_norm_w;        /* [hd] (qk_norm builds) or NULL */
  int32_t window;              /* window builds: attend to the last `window` keys (new token included); 0 none */
} CfAttentionBlockArgs;

void cf_attention_block_spec(CfAttentionBlockSpec* spec);
int cf_attention_block_plan(const CfAttentionBlockShape* shape, CfAttentionBlockPlan* plan);
int cf_attention_block_launch(const CfAttentionBlockArgs* args, const CfAttentionBlockPlan* plan, void* stream);
const char* cf_attention_block_error(int rc);

#ifdef __cplusplus
}
#endif
