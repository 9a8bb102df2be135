/* clusterfuse/abi/ffn_block.h — the C ABI of the fused FFN block's library
 * (kernels/ffn/ffn_block.cu): one struct per entry point, mirrored once in Python
 * (clusterfuse/ops/kernel_abi.py; tests/test_kernel_abi.py checks every offset against this file).
 *
 *   cf_ffn_block_plan(&shape, &plan)          grid, shared memory, k splits (per device)
 *   cf_ffn_block_launch(&args, &plan, stream)
 * Each returns 0, a cudaError_t, or a negative code (cf_ffn_block_error). */
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* One launch configuration. dtype: 0 bf16, 1 fp16; dsm: 1 DSM exchange, 0 global workspace. */
typedef struct CfFfnBlockShape {
  int32_t dtype, batch, hidden, intermediate, cluster, dsm;
} CfFfnBlockShape;

/* What cf_ffn_block_plan decides for a shape on the current device. */
typedef struct CfFfnBlockPlan {
  int32_t num_clusters;  /* grid = num_clusters x cluster blocks */
  int32_t smem_bytes;    /* dynamic shared memory per block */
  int32_t lmax;          /* longest cluster slice of the intermediate size (multiple of 8) */
  int32_t ksplit1;       /* k split of the gate/up GEMV */
  int32_t ksplit2;       /* k split of the down GEMV */
} CfFfnBlockPlan;

/* One launch: tensors (device pointers), workspaces sized from the plan, options. */
typedef struct CfFfnBlockArgs {
  CfFfnBlockShape shape;
  const void* x;           /* [B, H] */
  const void* norm_w;      /* [H] */
  const void* w_gate_up;   /* [2I, H] */
  const void* w_down;      /* [H, I] */
  const void* residual;    /* [B, H] or NULL */
  void* out;               /* [B, H]: x's dtype with residual, else fp32 */
  float* partials;         /* [num_clusters, B, H] */
  void* act_ws;            /* [num_clusters, B, lmax] x's dtype (global exchange) or NULL */
  uint32_t* counter;       /* grid barrier counter: zero once, self-resetting */
  int32_t launch_mode;     /* 0 ordered, 1 successor starts at exit, 2 before the grid barrier (pdl.cuh) */
  float eps;
} CfFfnBlockArgs;

int cf_ffn_block_plan(const CfFfnBlockShape* shape, CfFfnBlockPlan* plan);
int cf_ffn_block_launch(const CfFfnBlockArgs* args, const CfFfnBlockPlan* plan, void* stream);
const char* cf_ffn_block_error(int rc);

#ifdef __cplusplus
}
#endif
