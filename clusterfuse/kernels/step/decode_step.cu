// Persistent decode step for the Llama family on Hopper: every layer of one decode step (the fused
// attention block, then the fused FFN block) in ONE launch whose clusters all stay resident:
//
//   for each layer l:                                  x = hidden (l = 0) or the previous layer's output
//     attention groups g = c, c + K, ... < nkv          (c: this cluster, K: the grid's clusters)
//       the attention block's program of group g   ->  fp32 partial g   (group_program_body.cuh)
//     L2 prefetch of this cluster's first FFN weights;  grid barrier
//     mid = x + Σ_g partial g  (cluster order)          every block its slice of [B, H]
//     grid barrier
//     FFN slices s = c, c + K, ... < NC
//       the FFN block's program of slice s         ->  fp32 partial s   (ffn group_program_body.cuh)
//     L2 prefetch of the next layer's first W_qkv rows; grid barrier
//     out_l = mid + Σ_s partial s  (slice order)
//     grid barrier (not after the last layer)
//
// Each phase is the per-block kernels' own code (include/clusterfuse/step/layer_programs.cuh), with
// their partitions: a KV head group's C blocks split its Q/K/V rows, keys and W_o rows as the
// attention kernel's cluster does, and the FFN's NC slices, k chunks and k splits are the FFN
// kernel's plan for the same cluster size (the host passes both plans in), so the step's output is
// bit-identical to the per-block kernels' (attention at 256 threads, DSM or global exchange) with
// those plans. Where there are more groups (or slices) than resident clusters, a cluster runs
// several in turn before the barrier; their partials and sums are the same. Deterministic: fp32
// partials summed in a fixed order, no atomics but the barrier's counter.
//
// Residency: the grid barriers need every block resident at once. The plan asks the occupancy API
// how many clusters of this size the device holds with this kernel's shared memory and launches at
// most that many (cf_decode_step_plan refuses a device that holds none, and a caller's cap of 0),
// and the launch is cooperative, so the driver refuses a grid it cannot hold at once (another
// process under MPS) instead of starting part of it; the ops wrapper falls back to the per-block
// kernels when refused.
//
// One block size for the whole program: 256 threads, one block per SM (the attention kernel's
// 256-thread build and the FFN kernel's size). Shared memory: the larger of the two blocks'
// layouts, each at offset 0 (their lifetimes do not overlap: a cluster wait separates them).
//
// Specialised at build time (JIT, -D): dtype, head dim, GQA ratio, batch tiles, QK-norm, sliding
// window, and the profiling timeline (step/timeline.cuh; its stamps change no result); defaults
// below so the file compiles with no flags.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "clusterfuse/abi/decode_step.h"
#include "clusterfuse/attention/block_program.cuh"
#include "clusterfuse/dsm.cuh"
#include "clusterfuse/ffn/block_phases.cuh"
#include "clusterfuse/ffn/block_program.cuh"
#include "clusterfuse/gemv.cuh"
#include "clusterfuse/grid_sync.cuh"
#include "clusterfuse/launch.cuh"
#include "clusterfuse/split_range.cuh"
#include "clusterfuse/step/layer_programs.cuh"
#include "clusterfuse/step/timeline.cuh"

#ifndef CF_STEP_DTYPE  // 0: bf16, 1: fp16
#define CF_STEP_DTYPE 0
#endif
#ifndef CF_STEP_HEAD_DIM  // 64 or 128
#define CF_STEP_HEAD_DIM 128
#endif
#ifndef CF_STEP_GQA  // query heads per KV head, 1..8
#define CF_STEP_GQA 1
#endif
#ifndef CF_STEP_NT  // 8-sequence batch tiles: 1 (batch <= 8) or 2 (9..16), as the per-block ops choose
#define CF_STEP_NT 1
#endif
#ifndef CF_STEP_QK_NORM  // 1: per-head RMSNorm of q and k before RoPE (Qwen3)
#define CF_STEP_QK_NORM 0
#endif
#ifndef CF_STEP_WINDOW  // 1: sliding-window attention (Mistral-v0.1)
#define CF_STEP_WINDOW 0
#endif
#ifndef CF_STEP_TIMELINE  // 1: the profiling timeline (step/timeline.cuh, bench/step_timeline.py)
#define CF_STEP_TIMELINE 0
#endif

namespace cg = cooperative_groups;
namespace at = clusterfuse::attention;
namespace gv = clusterfuse::gemv;
namespace st = clusterfuse::step;

namespace {

#if CF_STEP_DTYPE == 0
using T = __nv_bfloat16;
#else
using T = __half;
#endif
constexpr int kThreads = clusterfuse::ffn::kBlockThreads;  // 256, the attention block's second build too
using Cfg = at::BlockConfig<T, CF_STEP_HEAD_DIM, CF_STEP_GQA, CF_STEP_NT, kThreads, CF_STEP_QK_NORM != 0,
                            CF_STEP_WINDOW != 0, false>;
constexpr int NT = Cfg::NT;
constexpr int kMaxBatch = Cfg::kMaxBatch;
constexpr int kMaxCluster = Cfg::kMaxCluster;
constexpr int kSmemLimit = 227 * 1024;  // dynamic + static shared memory of one block
constexpr bool kTimeline = CF_STEP_TIMELINE != 0;
using AttnParams = Cfg::Params;
using clusterfuse::ffn::FfnParams;
using clusterfuse::split_range;

enum : int {
  kErrArgs = -1,         // shapes / cluster size / arguments out of range for this specialisation
  kErrSmem = -2,         // the blocks' layouts do not fit in shared memory
  kErrNotResident = -3,  // no cluster of this size can be resident (or the caller's cap is 0)
  kErrPlans = -4,        // the per-block plans in the shape do not match it
};

// The kernel's parameters: what every layer shares, in the per-block kernels' parameter structs
// (each layer's copy in shared memory gets the layer's weights, caches and activations), and the
// step's own.
struct StepParams {
  AttnParams attn;
  FfnParams ffn;
  const CfDecodeStepLayer* layers;  // [num_layers], device memory
  const T* hidden;                  // [B, H], layer 0's input
  T* mid;                           // [B, H], the attention block's output of every layer
  T* tmp;                           // [B, H]
  T* out;                           // [B, H], the last layer's output
  unsigned int* counter;            // the grid barrier's
  int num_layers;
  int ffn_slices;                   // NC: the FFN's slices of the intermediate dimension
#if CF_STEP_TIMELINE
  unsigned long long* timeline;     // [grid][kTimelineHead + num_layers * kLayerStamps]
#endif
};

// Layer l's output: `out` for the last layer, alternating with `tmp` before it.
__device__ __forceinline__ T* layer_out(const StepParams& sp, int l) {
  return ((sp.num_layers - 1 - l) & 1) ? sp.tmp : sp.out;
}

// Timeline builds: this block's row (l < 0) or layer l's stamps in it; nullptr in other builds.
__device__ __forceinline__ unsigned long long* timeline_row(const StepParams& sp, int l) {
#if CF_STEP_TIMELINE
  unsigned long long* row = sp.timeline + (size_t)blockIdx.x * (st::kTimelineHead + sp.num_layers * st::kLayerStamps);
  return l < 0 ? row : row + st::kTimelineHead + l * st::kLayerStamps;
#else
  (void)sp, (void)l;
  return nullptr;
#endif
}

__global__ void __launch_bounds__(kThreads, 1) decode_step_kernel(const __grid_constant__ StepParams sp) {
  // This layer's parameters for the two programs (written by thread 0, read by all after a barrier).
  __shared__ AttnParams ap;
  __shared__ FfnParams fp;
  // The attention exchanges' mbarriers: each completes once per attention group run, so the
  // parity flips per run. Published to the peers as in the per-block kernel: by the first run's
  // relaxed arrival after the norm and the cluster wait before the first exchange.
  __shared__ uint64_t ex_bars[2];
  extern __shared__ __align__(16) unsigned char smem[];  // the programs' (each lays it out from 0)
  cg::cluster_group cluster = cg::this_cluster();
  const int C = sp.attn.C, rank = (int)cluster.block_rank();
  const int cluster_id = blockIdx.x / C, clusters = gridDim.x / C;
  const int B = sp.attn.B, H = sp.attn.H, nkv = sp.attn.kv.nkv, NC = sp.ffn_slices, I = sp.ffn.I;
  const int warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) {
    clusterfuse::dsm::mbar_init(&ex_bars[0], 1);
    clusterfuse::dsm::mbar_init(&ex_bars[1], 1);
    clusterfuse::dsm::fence_mbarrier_init();
    // What every layer shares, once; each layer rewrites only its own fields below.
    ap = sp.attn;
    fp = sp.ffn;
  }
  st::stamp_kernel<kTimeline>(timeline_row(sp, -1), true);
  uint32_t parity = 0;
  for (int l = 0; l < sp.num_layers; ++l) {
    unsigned long long* stamps = timeline_row(sp, l);
    const CfDecodeStepLayer& w = sp.layers[l];
    const T* x = l == 0 ? sp.hidden : layer_out(sp, l - 1);
    T* y = layer_out(sp, l);
    if (threadIdx.x == 0) {  // the layer's own fields (the previous layer's readers are past a barrier)
      ap.hidden = x, ap.residual = x, ap.out = sp.mid;
      ap.norm_w = static_cast<const T*>(w.attn_norm_w);
      ap.w_qkv = static_cast<const T*>(w.w_qkv);
      ap.b_qkv = static_cast<const T*>(w.b_qkv);
      ap.w_o = static_cast<const T*>(w.w_o);
      ap.q_norm_w = static_cast<const T*>(w.q_norm_w);
      ap.k_norm_w = static_cast<const T*>(w.k_norm_w);
      ap.k_cache = static_cast<T*>(w.k_cache);
      ap.v_cache = static_cast<T*>(w.v_cache);
      fp.x = sp.mid, fp.residual = sp.mid, fp.out = y;
      fp.norm_w = w.ffn_norm_w;
      fp.w_gate_up = w.w_gate_up;
      fp.w_down = w.w_down;
    }
    __syncthreads();

    // ---- attention: this cluster's KV head groups -> their fp32 partials -----------------------
    for (int g = cluster_id; g < nkv; g += clusters) {
      st::attention_group<Cfg, kTimeline>(ap, ex_bars, rank, g, parity, g == cluster_id ? stamps : nullptr);
      parity ^= 1u;
      clusterfuse::dsm::cluster_wait();  // no peer still reads this block's attention state
    }
    st::stamp<kTimeline>(stamps, st::kAttnDone);
    // The FFN's first gate/up rows of this cluster's first slice into L2 while the grid meets.
    if (cluster_id < NC)
      gv::warp_prefetch_first(clusterfuse::step::ffn_first_weights(static_cast<const T*>(w.w_gate_up), rank, C,
                                                                    cluster_id, NC, H, I),
                              fp.ksplit1, warp, Cfg::kL2PrefetchSteps);
    clusterfuse::grid::barrier(sp.counter);
    st::stamp<kTimeline>(stamps, st::kMidBarrier);
    clusterfuse::ffn::sum_partials<T>(sp.attn.partials, nkv, B, H, x, sp.mid);  // mid = x + Σ partials
    st::stamp<kTimeline>(stamps, st::kMidSum);
    clusterfuse::grid::barrier(sp.counter);
    st::stamp<kTimeline>(stamps, st::kMidSumBarrier);

    // ---- FFN: this cluster's slices -> their fp32 partials -------------------------------------
    for (int s = cluster_id; s < NC; s += clusters) {
      st::ffn_group<T, NT, kTimeline>(fp, rank, s, NC, s == cluster_id ? stamps : nullptr);
      clusterfuse::dsm::cluster_wait();  // every peer has received this block's activation piece
      clusterfuse::ffn::invalidate_gather_barriers<T>(smem);
    }
    st::stamp<kTimeline>(stamps, st::kFfnDone);
    // The next layer's first Q/K/V rows of this cluster's first group into L2 while the grid meets.
    if (l + 1 < sp.num_layers && cluster_id < nkv)
      gv::warp_prefetch_first(clusterfuse::step::attention_first_weights<Cfg>(
                                  static_cast<const T*>(sp.layers[l + 1].w_qkv), rank, C, cluster_id, sp.attn.nh,
                                  nkv, H, sp.attn.kc),
                              sp.attn.ks_qkv[rank], warp, Cfg::kL2PrefetchSteps);
    clusterfuse::grid::barrier(sp.counter);
    st::stamp<kTimeline>(stamps, st::kOutBarrier);
    clusterfuse::ffn::sum_partials<T>(sp.attn.partials, NC, B, H, sp.mid, y);  // y = mid + Σ partials
    st::stamp<kTimeline>(stamps, st::kOutSum);
    if (l + 1 < sp.num_layers) clusterfuse::grid::barrier(sp.counter);
    st::stamp<kTimeline>(stamps, st::kLayerEnd);
  }
  st::stamp_kernel<kTimeline>(timeline_row(sp, -1), false);
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
bool valid_cluster(int c) { return c == 1 || c == 2 || c == 4 || c == 8 || c == 16; }

// Dynamic shared memory of the two programs (each at offset 0): the attention block's layout for
// its plan's k chunk and partials, the FFN block's for its plan's slices and k splits (as
// ffn_block.cu's plan_for_grid sizes it). kErrPlans where a plan does not fit the shape.
int step_smem_bytes(const CfDecodeStepShape& s, int* bytes) {
  const CfAttentionBlockPlan& a = s.attention;
  const CfFfnBlockPlan& f = s.ffn;
  const int B = s.batch, H = s.hidden, C = s.cluster;
  // The attention plan's k chunk: the whole hidden size, or a multiple of 128 below it (attention_block.cu).
  const bool chunk_ok = a.k_chunk == H || (a.k_chunk >= 128 && a.k_chunk < H && a.k_chunk % 128 == 0);
  if (!chunk_ok || a.ksplit_o < 1 || a.ksplit_o > 8 || a.partial_floats < 0) return kErrPlans;
  for (int r = 0; r < C; ++r)
    if (a.ksplit_qkv[r] < 1 || a.ksplit_qkv[r] > 8) return kErrPlans;
  if (f.num_clusters < 1 || f.num_clusters > s.intermediate / 8 || f.ksplit1 < 1 || f.ksplit1 > 8 ||
      f.ksplit2 < 1 || f.ksplit2 > 8 || f.lmax != 8 * ((s.intermediate / 8 + f.num_clusters - 1) / f.num_clusters))
    return kErrPlans;
  const int attn_bytes = at::BlockLayout<Cfg>(B, a.k_chunk, a.partial_floats).bytes;
  const clusterfuse::ffn::BlockLayout ffn_lay(B, H, f.lmax, C);
  const int rows_max = 8 * ((f.lmax / 8 + C - 1) / C);
  const int rt1 = 2 * gv::Plan::ceil_div(rows_max, 16), rt2 = gv::Plan::ceil_div(gv::Plan::ceil_div(H, C), 16);
  const int pf1 = gv::partial_floats<NT>(rt1, f.ksplit1), pf2 = gv::partial_floats<NT>(rt2, f.ksplit2);
  const int ffn_bytes = ffn_lay.bytes(pf1 > pf2 ? pf1 : pf2);
  *bytes = attn_bytes > ffn_bytes ? attn_bytes : ffn_bytes;
  return 0;
}

int make_plan(const CfDecodeStepShape& s, CfDecodeStepPlan* plan) {
  const int B = s.batch, H = s.hidden, C = s.cluster;
  // The batch tiles the per-block ops would pick for this batch (their plans assume them).
  if (B < 1 || B > kMaxBatch || B <= 8 * (NT - 1) || H < 16 || H % 16 || s.kv_heads < 1 ||
      s.heads != s.kv_heads * Cfg::G || s.intermediate < 8 || s.intermediate % 8 || s.layers < 1 ||
      !valid_cluster(C) || s.max_clusters < -1)
    return kErrArgs;
  int bytes = 0;
  if (int rc = step_smem_bytes(s, &bytes)) return rc;
  cudaFuncAttributes attr{};
  if (cudaError_t e = cudaFuncGetAttributes(&attr, decode_step_kernel)) return e;
  if (bytes + (int)attr.sharedSizeBytes > kSmemLimit) return kErrSmem;
  int active = 0;
  if (cudaError_t e = clusterfuse::max_active_clusters(decode_step_kernel, dim3(kThreads), C, bytes, &active)) return e;
  const int cap = s.max_clusters < 0 ? active : (s.max_clusters < active ? s.max_clusters : active);
  if (cap < 1) return kErrNotResident;
  const int work = s.kv_heads > s.ffn.num_clusters ? s.kv_heads : s.ffn.num_clusters;
  plan->smem_bytes = bytes;
  plan->clusters = cap < work ? cap : work;
  plan->active_clusters = active;
  plan->partial_floats = work * B * H;
  return 0;
}

}  // namespace

extern "C" {

void cf_decode_step_spec(CfDecodeStepSpec* spec) {
  spec->dtype = CF_STEP_DTYPE, spec->head_dim = Cfg::HD, spec->gqa = Cfg::G, spec->max_batch = kMaxBatch;
  spec->threads = kThreads, spec->qk_norm = CF_STEP_QK_NORM, spec->window = CF_STEP_WINDOW;
  spec->timeline_head = kTimeline ? st::kTimelineHead : 0;
  spec->timeline_layer_slots = kTimeline ? st::kLayerStamps : 0;
}

int cf_decode_step_plan(const CfDecodeStepShape* s, CfDecodeStepPlan* plan) { return make_plan(*s, plan); }

const char* cf_decode_step_error(int rc) {
  switch (rc) {
    case kErrArgs: return "decode_step: unsupported shape, cluster size or argument for this kernel";
    case kErrSmem: return "decode_step: the attention or FFN block's layout does not fit in shared memory";
    case kErrNotResident: return "decode_step: no cluster of this size can be resident on this GPU (or the cap is 0)";
    case kErrPlans: return "decode_step: the per-block plans do not match the shape";
    default: return cudaGetErrorString(static_cast<cudaError_t>(rc));
  }
}

int cf_decode_step_launch(const CfDecodeStepArgs* a, const CfDecodeStepPlan* plan, void* stream) {
  const CfDecodeStepShape& s = a->shape;
  const CfAttentionBlockPlan& ab = s.attention;
  const CfFfnBlockPlan& fb = s.ffn;
  if (!a->layers || !a->hidden || !a->mid || !a->tmp || !a->out || !a->partials || !a->counter || !a->error ||
      a->kv_prefetch_keys < 0 || a->window < 0 || (!CF_STEP_WINDOW && a->window) || plan->clusters < 1 ||
      (kTimeline != (a->timeline != nullptr)) ||
      !valid_cluster(s.cluster) || s.layers < 1)
    return kErrArgs;
  StepParams sp{};
  AttnParams& p = sp.attn;  // every layer's common fields; per-layer ones are set in the kernel
  p.cos = a->cos;
  p.sin = a->sin;
  p.positions = a->positions;
  p.cache_lens = a->cache_lens;
  p.kv.block_table = a->block_table;
  p.partials = a->partials;
  p.error = a->error;
  p.B = s.batch, p.H = s.hidden, p.nh = s.heads, p.kv.nkv = s.kv_heads, p.C = s.cluster;
  p.max_pos = a->max_pos, p.pos64 = a->positions_int64;
  p.kv.page_size = a->page_size, p.kv.max_pages = a->max_pages, p.kv.num_pages = a->num_pages;
  p.kv_prefetch_keys = a->kv_prefetch_keys;
  p.kc = ab.k_chunk, p.ks_o = ab.ksplit_o, p.coresident = 1, p.part_floats = ab.partial_floats;
  p.eps = a->eps;
  for (int r = 0; r < kMaxCluster; ++r) p.ks_qkv[r] = (signed char)ab.ksplit_qkv[r];
  p.window = a->window;
  FfnParams& f = sp.ffn;
  f.partials = a->partials;
  f.B = s.batch, f.H = s.hidden, f.I = s.intermediate, f.cluster = s.cluster;
  f.lmax = fb.lmax, f.ksplit1 = fb.ksplit1, f.ksplit2 = fb.ksplit2, f.eps = a->eps;
  sp.layers = a->layers;
  sp.hidden = static_cast<const T*>(a->hidden);
  sp.mid = static_cast<T*>(a->mid);
  sp.tmp = static_cast<T*>(a->tmp);
  sp.out = static_cast<T*>(a->out);
  sp.counter = a->counter;
  sp.num_layers = s.layers;
  sp.ffn_slices = fb.num_clusters;
#if CF_STEP_TIMELINE
  sp.timeline = static_cast<unsigned long long*>(a->timeline);
#endif
  // Cooperative: the grid barriers need every block resident, which the plan's occupancy query
  // can promise only for an idle device; the driver refuses a grid it cannot hold at once.
  clusterfuse::LaunchOptions opts;
  opts.cooperative = true;
  return clusterfuse::launch_cluster_with(opts, decode_step_kernel, dim3(plan->clusters * s.cluster), dim3(kThreads),
                                          s.cluster, plan->smem_bytes, static_cast<cudaStream_t>(stream), sp);
}

}  // extern "C"
