/* clusterfuse/abi/mla_block.h — the C ABI of the fused MLA decode block's library
 * (kernels/mla/mla_block.cu): one struct per entry point, mirrored once in Python
 * (clusterfuse/ops/kernel_abi.py; tests/test_kernel_abi.py checks every offset against this file).
 *
 *   cf_mla_block_spec(&spec)                  what the library was built for
 *   cf_mla_block_plan(&shape, &plan)          grid, shared memory, k splits, key splits (per device)
 *   cf_mla_block_launch(&args, &plan, stream)
 * Each returns 0, a cudaError_t, or a negative code (cf_mla_block_error). */
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The build's specialisation (its -D macros): dtype 0 bf16 / 1 fp16, the MLA dimensions, the
 * largest batch, the cluster size, the block size and the key loop (0 CUDA cores, 1 tensor cores). */
typedef struct CfMlaBlockSpec {
  int32_t dtype, heads, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, max_batch, cluster, threads,
      key_mma;
} CfMlaBlockSpec;

/* One launch configuration: batch and hidden size (the rest is the build's). */
typedef struct CfMlaBlockShape {
  int32_t batch, hidden;
} CfMlaBlockShape;

/* What cf_mla_block_plan decides for a shape on the current device. */
typedef struct CfMlaBlockPlan {
  int32_t num_clusters;   /* grid = num_clusters x cluster blocks, all co-resident (grid barriers) */
  int32_t smem_bytes;     /* dynamic shared memory per block */
  int32_t key_splits;     /* clusters per sequence in the attention phase (items = batch x key_splits) */
  int32_t ksplit_proj;    /* k split of the q / KV-down GEMV */
  int32_t ksplit_o;       /* k split of the O-projection GEMV */
  int32_t partial_floats; /* floats of the GEMVs' k-split partial buffer */
} CfMlaBlockPlan;

/* One launch: tensors (device pointers), workspaces sized from the plan, options. */
typedef struct CfMlaBlockArgs {
  CfMlaBlockShape shape;
  const void* hidden;      /* [B, H] */
  const void* norm_w;      /* [H] */
  const void* w_qa;        /* [heads*(nope+rope) + rank + rope, H]: q_proj rows, then kv_a_proj_with_mqa rows */
  const void* kv_norm_w;   /* [rank] kv_a_layernorm */
  const void* w_uk;        /* [heads, nope, rank]: kv_b_proj's key rows per head */
  const void* w_uv;        /* [heads, v, rank]: kv_b_proj's value rows per head */
  const void* w_o;         /* [H, heads*v] */
  const float* cos;        /* [max_pos, rope/2] */
  const float* sin;
  const void* positions;   /* [B] int32 or int64 */
  void* cache;             /* latent rows [c | k_pe]: contiguous [B, cap, rank+rope] or paged [pages, page, rank+rope] */
  const int32_t* cache_lens;   /* [B] */
  const int32_t* block_table;  /* [B, max_pages] or NULL */
  const void* residual;    /* [B, H] or NULL */
  void* out;               /* [B, H]: hidden's dtype with residual, else fp32 */
  float* ws_proj;          /* [B, w_qa rows] */
  float* ws_q;             /* [B, heads, rank+rope] */
  float* ws_state;         /* [B * key_splits, heads, rank + 2] */
  void* ws_v;              /* [B, heads*v] hidden's dtype */
  float* ws_y;             /* [B, H] */
  uint32_t* counter;       /* grid barrier counter: zero once, self-resetting */
  int32_t* error;          /* set to 1 when a sequence's length / position / page is out of range */
  int32_t max_pos, positions_int64, page_size, max_pages, num_pages;
  float eps, softmax_scale;
} CfMlaBlockArgs;

void cf_mla_block_spec(CfMlaBlockSpec* spec);
int cf_mla_block_plan(const CfMlaBlockShape* shape, CfMlaBlockPlan* plan);
int cf_mla_block_launch(const CfMlaBlockArgs* args, const CfMlaBlockPlan* plan, void* stream);
const char* cf_mla_block_error(int rc);

#ifdef __cplusplus
}
#endif
