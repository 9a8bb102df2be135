/* clusterfuse/abi/moe_block.h — the C ABI of the fused MoE block's library
 * (kernels/moe/moe_block.cu, one build per dtype and batch tile: CF_MOE_DTYPE, CF_MOE_NT), mirrored
 * once in Python (clusterfuse/ops/kernel_abi.py; tests/test_kernel_abi.py checks every offset).
 *
 *   cf_moe_block_plan(&shape, &plan)          grid, shared memory, k splits, piece length (per device)
 *   cf_moe_block_launch(&args, &plan, stream)
 * Each returns 0, a cudaError_t, or a negative code (cf_moe_block_error). */
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CF_MOE_BLOCK_MAX_EXPERTS 256
#define CF_MOE_BLOCK_MAX_TOP_K 16
#define CF_MOE_BLOCK_MAX_GROUPS 32

/* One launch configuration. dtype: 0 bf16, 1 fp16 (must be the build's); intermediate: one routed
 * expert's width; shared_intermediate: the shared experts' width together (0: none). */
typedef struct CfMoeBlockShape {
  int32_t dtype, batch, hidden, intermediate, shared_intermediate, experts, top_k, cluster;
} CfMoeBlockShape;

/* What cf_moe_block_plan decides for a shape on the current device. */
typedef struct CfMoeBlockPlan {
  int32_t num_clusters;   /* grid = num_clusters x cluster blocks */
  int32_t smem_bytes;     /* dynamic shared memory per block */
  int32_t piece_max;      /* longest run of one expert's columns a cluster handles at once (multiple of 8) */
  int32_t router_kparts;  /* the router GEMV's k parts (partial logits) */
  int32_t router_kchunk;  /* k of one router part (multiple of 128) */
  int32_t ksplit_router;  /* in-block k split of the router GEMV */
  int32_t ksplit1;        /* k split of the gate/up GEMV */
  int32_t ksplit2;        /* k split of the down GEMV */
} CfMoeBlockPlan;

/* One launch: tensors (device pointers), workspaces sized from the plan, routing settings. */
typedef struct CfMoeBlockArgs {
  CfMoeBlockShape shape;
  const void* x;                 /* [B, H] */
  const void* norm_w;            /* [H] */
  const void* w_router;          /* [E, H] */
  const void* w_gate_up;         /* [E, 2I, H]: each expert's gate rows, then up rows */
  const void* w_down;            /* [E, H, I] */
  const void* w_shared_gate_up;  /* [2Is, H] or NULL (shared_intermediate 0) */
  const void* w_shared_down;     /* [H, Is] or NULL */
  const void* residual;          /* [B, H] or NULL */
  void* out;                     /* [B, H]: x's dtype with residual, else fp32 */
  float* partials;               /* [num_clusters, B, H] */
  float* logits_ws;              /* [router_kparts, B, E] */
  int32_t* topk_ids;             /* [B, top_k] or NULL: the chosen experts, best first */
  float* topk_weights;           /* [B, top_k] or NULL: their weights (after scaling / normalising) */
  uint32_t* counter;             /* grid barrier counter: zero once, self-resetting */
  int32_t n_group;               /* group-limited routing: groups (dividing experts), or 0 for greedy */
  int32_t topk_group;            /* groups kept (1..n_group) when n_group > 0 */
  int32_t norm_topk_prob;        /* 1: weights normalised to sum 1 (top_k > 1); 0: times routed_scaling_factor */
  int32_t launch_mode;           /* 0 ordered, 1 successor starts at exit, 2 before the last grid barrier */
  float eps;
  float routed_scaling_factor;
} CfMoeBlockArgs;

int cf_moe_block_plan(const CfMoeBlockShape* shape, CfMoeBlockPlan* plan);
int cf_moe_block_launch(const CfMoeBlockArgs* args, const CfMoeBlockPlan* plan, void* stream);
const char* cf_moe_block_error(int rc);

#ifdef __cplusplus
}
#endif
