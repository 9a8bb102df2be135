/* clusterfuse/abi/decode_step.h — the C ABI of the persistent decode step's library
 * (kernels/step/decode_step.cu): every layer of a Llama-family decode step (attention block, then
 * FFN block) in one launch of resident clusters. One struct per entry point, mirrored once in
 * Python (clusterfuse/ops/kernel_abi.py; tests/test_kernel_abi.py checks every offset).
 *
 *   cf_decode_step_spec(&spec)                 what this build was specialised for
 *   cf_decode_step_plan(&shape, &plan)         shared memory, grid, residency (per device)
 *   cf_decode_step_launch(&args, &plan, stream)
 * Each returns 0, a cudaError_t, or a negative code (cf_decode_step_error).
 *
 * The step keeps the per-block kernels' partitions: the shape carries their plans for the same
 * cluster size (cf_attention_block_plan with 256 threads and the DSM exchange, cf_ffn_block_plan),
 * whose k chunks, k splits, FFN slices and partial buffers the step uses as they are, so that its
 * output is bit-identical to theirs. */
#pragma once
#include <stdint.h>

#include "clusterfuse/abi/attention_block.h"
#include "clusterfuse/abi/ffn_block.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Compile-time shape of the library (the attention block's; the FFN's sizes are run-time). */
typedef struct CfDecodeStepSpec {
  int32_t dtype;      /* 0 bf16, 1 fp16 */
  int32_t head_dim;   /* 64 or 128 */
  int32_t gqa;        /* query heads per KV head */
  int32_t max_batch;  /* 8 per batch tile */
  int32_t threads;    /* per block (256) */
  int32_t qk_norm;    /* 1: per-head RMSNorm of q and k before RoPE (layer.q_norm_w, layer.k_norm_w) */
  int32_t window;     /* 1: sliding-window attention (args.window) */
  int32_t timeline_head;         /* timeline builds (profiling): slots before the layers' in a block's row; 0 otherwise */
  int32_t timeline_layer_slots;  /* timeline builds: clock64 stamps per layer in a block's row; 0 otherwise */
} CfDecodeStepSpec;

/* One step configuration: sizes, the hardware cluster size of the whole program, and the
 * per-block plans whose partitions it keeps. max_clusters caps the clusters the step may hold
 * resident (-1: as many as the device holds; 0 refuses the step, as a device with no room would:
 * how tests force the fallback). */
typedef struct CfDecodeStepShape {
  int32_t batch, hidden, heads, kv_heads, intermediate, layers, cluster, max_clusters;
  CfAttentionBlockPlan attention;  /* cf_attention_block_plan(batch, hidden, heads, kv_heads, cluster, DSM), 256 threads */
  CfFfnBlockPlan ffn;              /* cf_ffn_block_plan(dtype, batch, hidden, intermediate, cluster, DSM) */
} CfDecodeStepShape;

/* What cf_decode_step_plan decides for a shape on the current device. */
typedef struct CfDecodeStepPlan {
  int32_t smem_bytes;       /* dynamic shared memory per block: the larger of the two blocks' layouts */
  int32_t clusters;         /* grid = clusters x cluster blocks, all resident; each loops over the
                               attention's KV head groups and the FFN's slices (virtual clusters) */
  int32_t active_clusters;  /* clusters of this size the device holds at once (before max_clusters) */
  int32_t partial_floats;   /* fp32 partials workspace: max(kv_heads, FFN slices) x batch x hidden */
} CfDecodeStepPlan;

/* One layer's tensors (device pointers), an array of them on the device (args.layers). */
typedef struct CfDecodeStepLayer {
  const void* attn_norm_w;  /* [H] */
  const void* w_qkv;        /* [(nh + 2 nkv) hd, H] */
  const void* b_qkv;        /* [(nh + 2 nkv) hd] or NULL */
  const void* w_o;          /* [H, nh hd] */
  const void* q_norm_w;     /* [hd] (qk_norm builds) or NULL */
  const void* k_norm_w;     /* [hd] (qk_norm builds) or NULL */
  void* k_cache;            /* paged [pages, nkv, page, hd] or contiguous [B, nkv, cap, hd] */
  void* v_cache;
  const void* ffn_norm_w;   /* [H] */
  const void* w_gate_up;    /* [2I, H] */
  const void* w_down;       /* [H, I] */
} CfDecodeStepLayer;

/* One launch. Layer l's attention reads its input (hidden for l = 0) and writes `mid`; its FFN
 * reads `mid` and writes the layer's output: `out` for the last layer, the layers before it
 * alternating between `tmp` and `out` so that the last one lands in `out` (hidden is only read). */
typedef struct CfDecodeStepArgs {
  CfDecodeStepShape shape;
  const CfDecodeStepLayer* layers;  /* [layers] in device memory */
  const void* hidden;          /* [B, H] */
  void* mid;                   /* [B, H] */
  void* tmp;                   /* [B, H] */
  void* out;                   /* [B, H] */
  const float* cos;            /* [max_pos, hd/2] */
  const float* sin;            /* [max_pos, hd/2] */
  const void* positions;       /* [B] int32 or int64 (positions_int64) */
  const int32_t* cache_lens;   /* [B] */
  const int32_t* block_table;  /* [B, max_pages] or NULL (contiguous) */
  float* partials;             /* [plan.partial_floats] */
  uint32_t* counter;           /* grid barrier counter: zero once, self-resetting */
  int32_t* error;              /* set to 1 when a sequence's length / position / page is out of range */
  int32_t max_pos;             /* rows of cos / sin */
  int32_t positions_int64;
  int32_t page_size;           /* paged: rows per page; contiguous: capacity */
  int32_t max_pages;           /* paged: block_table row length; contiguous: 1 */
  int32_t num_pages;           /* paged: pages in the caches; contiguous: B */
  int32_t kv_prefetch_keys;    /* keys per sequence prefetched into L2 per block */
  int32_t window;              /* window builds: attend to the last `window` keys (new token included); 0 none */
  float eps;                   /* every RMSNorm's */
  void* timeline;              /* timeline builds: int64 [grid blocks, timeline_head + layers x timeline_layer_slots],
                                  zeroed (a stamp of a phase a block did not run stays 0); NULL otherwise */
} CfDecodeStepArgs;

void cf_decode_step_spec(CfDecodeStepSpec* spec);
int cf_decode_step_plan(const CfDecodeStepShape* shape, CfDecodeStepPlan* plan);
int cf_decode_step_launch(const CfDecodeStepArgs* args, const CfDecodeStepPlan* plan, void* stream);
const char* cf_decode_step_error(int rc);

#ifdef __cplusplus
}
#endif
