// Fused MoE block (DeepSeek-V2 style: routed SwiGLU experts chosen per token, plus always-on
// shared experts) for small-batch decoding on Hopper, one kernel:
//
//   n      = RMSNorm(x) * norm_weight                        every block, x is tiny
//   logits = n · W_router^T                                   router phase, split over the grid
//   ---- grid barrier ----
//   ids, w = top-k of softmax(logits) (group-limited)         every block, the same bits
//   y      = Σ_e w_e · down_e(silu(gate_e(n)) · up_e(n))      over the chosen experts' union,
//            + down_s(silu(gate_s(n)) · up_s(n))               and the shared experts
//   ---- grid barrier ----
//   out    = y (fp32)  |  residual + y (x's dtype)
//
// Why one launch with two grid barriers: the router's 256 KB (DeepSeek-V2-Lite) read once by
// the grid, then one barrier (about a microsecond when every block has equal work), costs less than
// a second launch and its prologue; the routing itself (softmax and top-k of B × E scores) is
// repeated in every block rather than exchanged, because each block needs all of it to find its
// columns and it takes less time than a second barrier would.
//
// Partition (every weight byte that is read is read from HBM once; unchosen experts not at all):
//   * The columns of the launch's experts are laid end to end: the shared experts' Is, then the
//     I of each chosen routed expert in expert order (the union over the batch). Cluster c owns
//     the c-th of NC near-equal runs of them (cut at multiples of 8), and walks its run in
//     pieces that each lie inside one expert and are at most piece_max long.
//   * Per piece, as in the FFN block: block `rank` computes a contiguous share of the piece's gate
//     and up rows (full K = H) and silu(g)·u; a ClusterGather over DSM gives every block the
//     piece's whole activation; block `rank` then owns H/C rows of W_down restricted to the
//     piece's columns and adds w_e[n] times its result to the cluster's fp32 partial y_c [B, H]
//     (w = 1 for the shared experts; 0 for a sequence that did not choose e).
//   * The NC partials are summed in cluster order after the grid barrier (all blocks
//     co-resident, checked on the host): deterministic, no atomics on floats.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "clusterfuse/abi/moe_block.h"
#include "clusterfuse/cluster_gather.cuh"
#include "clusterfuse/elements.cuh"
#include "clusterfuse/ffn/block_phases.cuh"
#include "clusterfuse/ffn/block_program.cuh"
#include "clusterfuse/gemv.cuh"
#include "clusterfuse/grid_sync.cuh"
#include "clusterfuse/launch.cuh"
#include "clusterfuse/moe/block_phases.cuh"
#include "clusterfuse/pdl.cuh"
#include "clusterfuse/split_range.cuh"

#ifndef CF_MOE_DTYPE
#define CF_MOE_DTYPE 0  // 0 bf16, 1 fp16
#endif
#ifndef CF_MOE_NT
#define CF_MOE_NT 1  // batch tiles of 8 sequences: 1 (batch <= 8) or 2 (batch <= 16)
#endif

namespace gv = clusterfuse::gemv;
namespace moe = clusterfuse::moe;

namespace {

using T = std::conditional_t<CF_MOE_DTYPE == 1, __half, __nv_bfloat16>;
constexpr int kNT = CF_MOE_NT;
static_assert(kNT == 1 || kNT == 2, "CF_MOE_NT must be 1 or 2");
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kGemvDepth = 3;        // register pipeline depth of the GEMVs (as the FFN block)
constexpr int kL2PrefetchSteps = 4;  // W_down steps per warp prefetched into L2 before the exchange
constexpr int kMaxBatch = 8 * kNT;

// Error codes below 0 are ours; >= 0 are cudaError_t.
enum : int {
  kErrArgs = -1,         // shapes / cluster size / routing settings out of range
  kErrSmem = -2,         // batch × hidden does not fit in shared memory
  kErrNotResident = -3,  // this cluster size cannot be scheduled (0 active clusters)
  kErrBuild = -4,        // dtype or batch not this build's (CF_MOE_DTYPE, CF_MOE_NT)
};

using clusterfuse::from_f;
using clusterfuse::Pack8;
using clusterfuse::split_range;
using clusterfuse::to_f;
using moe::MoeParams;

// The activation exchange, one call per piece, with one output stage: a block sends its next
// share to a peer once that peer has entered the same gather (so is done with the last one),
// about when the peer's own share would arrive anyway (cluster_gather.cuh). A second stage would
// double the scratch and, at batch 16, halve the longest piece that fits in shared memory (more
// pieces, each a pipeline refill).
template <int N>
using ActGather = clusterfuse::ClusterGather<N, T, clusterfuse::Exchange::kDsm, 1>;

// Its scratch is the FFN block's (the same gather of 2-byte elements).
static_assert(sizeof(T) == 2, "ffn::act_gather_scratch_bytes sizes the scratch for 2-byte elements");
using clusterfuse::ffn::act_gather_scratch_bytes;

__host__ __device__ constexpr int align16(int bytes) { return (bytes + 15) & ~15; }

// Shared-memory layout, identical on host and device. The GEMV partial buffer comes last: only
// the host knows its size (from the k splits), the kernel only needs where it starts.
struct Layout {
  int ld1, ld2;   // row strides (elements) of the normed x and of a piece's activation
  int rows_max;   // gate/up rows of one block in one piece, at most (multiple of 8)
  int off_act, off_res, off_tile, off_gather, off_scores, off_ids, off_wts, off_list, off_used, off_count,
      off_scale, off_part;  // the normed x starts at 0

  __host__ __device__ Layout(int B, int H, int E, int K, int piece_max, int cluster) {
    ld1 = gv::smem_ld(H);
    ld2 = gv::smem_ld(piece_max);
    rows_max = 8 * ((piece_max / 8 + cluster - 1) / cluster);
    off_act = align16(B * ld1 * 2);
    off_res = off_act + align16(B * ld2 * 2);
    off_tile = off_res + 2 * rows_max * B * 4;  // res: gate then up rows [2·rows_max][B] fp32
    off_gather = off_tile + align16(B * rows_max * 2);
    off_scores = off_gather + align16(act_gather_scratch_bytes(cluster, B * rows_max));
    off_ids = off_scores + align16(B * E * 4);
    off_wts = off_ids + align16(B * K * 4);
    off_list = off_wts + align16(B * K * 4);
    off_used = off_list + align16(E * 4);
    off_count = off_used + moe::kMaxExperts / 8;
    off_scale = off_count + 16;
    off_part = off_scale + align16(B * 4);
  }
  __host__ __device__ int bytes(int part_floats) const { return off_part + part_floats * 4; }
};

template <int C>
__global__ void __launch_bounds__(kThreads, 1) moe_block_kernel(const MoeParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int B = p.B, H = p.H, E = p.E, K = p.K;
  const int rank = blockIdx.x % C, cid = blockIdx.x / C, NC = gridDim.x / C;
  const int warp = threadIdx.x >> 5;
  const Layout lay(B, H, E, K, p.piece_max, C);

  T* xs = reinterpret_cast<T*>(smem);
  T* act = reinterpret_cast<T*>(smem + lay.off_act);
  float* res = reinterpret_cast<float*>(smem + lay.off_res);
  T* tile = reinterpret_cast<T*>(smem + lay.off_tile);
  float* scores = reinterpret_cast<float*>(smem + lay.off_scores);
  int* ids = reinterpret_cast<int*>(smem + lay.off_ids);
  float* wts = reinterpret_cast<float*>(smem + lay.off_wts);
  int* list = reinterpret_cast<int*>(smem + lay.off_list);
  unsigned* used = reinterpret_cast<unsigned*>(smem + lay.off_used);
  int* count = reinterpret_cast<int*>(smem + lay.off_count);
  float* scale = reinterpret_cast<float*>(smem + lay.off_scale);
  float* part = reinterpret_cast<float*>(smem + lay.off_part);

  // The gather's mbarriers, published to the peers by a cluster arrival now and the matching
  // wait before the first gather (release after a proxy fence: peers' bulk copies may land as
  // soon as they pass the wait).
  const int gather_elems = B * lay.rows_max;
  ActGather<C> gather(smem + lay.off_gather, gather_elems);
  gather.init_local();
  clusterfuse::dsm::fence_proxy_async_shared();
  clusterfuse::dsm::cluster_arrive();

  // ---- phase 0: RMSNorm (x is the previous kernel's output: after the programmatic wait) -------
  clusterfuse::pdl::wait_prior_grid();
  static_assert(kWarps + 1 <= 16, "the norm's scratch must fit in res");
  clusterfuse::ffn::norm_x<T, kThreads>(static_cast<const T*>(p.x), static_cast<const T*>(p.norm_w), B, H, p.eps, res,
                                        xs, lay.ld1);
  __syncthreads();

  // ---- router: the grid's blocks share the (row tile, k part) items of the logits ------------
  const int router_items = (E + gv::kTileRows - 1) / gv::kTileRows * p.router_kparts;
  for (int item = blockIdx.x; item < router_items; item += gridDim.x) {
    moe::router_partial_gemv<T, kNT, kGemvDepth>(p, item, xs, lay.ld1, part);
    __syncthreads();  // the partial buffer is reused by the next item
  }
  clusterfuse::grid::barrier(p.counter);

  // ---- routing, in every block: logits = Σ k parts in order, then softmax and top-k ----------
  for (int i = threadIdx.x; i < B * E; i += kThreads) {
    float s = 0.f;
    for (int kp = 0; kp < p.router_kparts; ++kp) s += __ldcg(p.logits_ws + (size_t)kp * B * E + i);
    scores[i] = s;
  }
  __syncthreads();
  for (int n = warp; n < B; n += kWarps) moe::route_token(p, scores + n * E, ids + n * K, wts + n * K);
  __syncthreads();
  if (blockIdx.x == 0 && p.topk_ids)
    for (int i = threadIdx.x; i < B * K; i += kThreads) p.topk_ids[i] = ids[i], p.topk_weights[i] = wts[i];
  const int chosen = moe::expert_union<kThreads>(ids, B * K, E, used, list, count);

  // ---- experts: this cluster's run of the laid-out columns, piece by piece --------------------
  int v0, v1, h0, h1;
  moe::cluster_run(p.Is, p.I, chosen, NC, cid, v0, v1);
  split_range(H, C, rank, 1, h0, h1);  // this block's rows of W_down
  float* yc = p.partials + (size_t)cid * B * H;
  clusterfuse::dsm::cluster_wait();  // every peer's gather mbarriers are initialised
  bool first = true;
  for (int v = v0; v < v1; first = false) {
    const moe::Piece pc = moe::piece_at(v, v1, p.Is, p.I, list, p.piece_max);
    v += pc.len;
    const bool shared = pc.expert < 0;
    const int width = shared ? p.Is : p.I;
    const T* wgu = shared ? static_cast<const T*>(p.w_shared_gate_up)
                          : static_cast<const T*>(p.w_gate_up) + (size_t)pc.expert * 2 * p.I * H;
    const T* wd = shared ? static_cast<const T*>(p.w_shared_down)
                         : static_cast<const T*>(p.w_down) + (size_t)pc.expert * H * p.I;
    int r0, r1;
    split_range(pc.len / 8, C, rank, 8, r0, r1);  // this block's gate/up rows of the piece
    const int rows1 = r1 - r0;
    const gv::WeightRows<T> w1{{wgu + (size_t)(pc.c0 + r0) * H, wgu + (size_t)(width + pc.c0 + r0) * H, nullptr,
                                nullptr},
                               2, rows1, H, H};
    const gv::WeightRows<T> w2{{wd + (size_t)h0 * width + pc.c0, nullptr, nullptr, nullptr}, 1, h1 - h0, width,
                               pc.len};
    __syncthreads();  // the previous piece's readers of part and scale are done
    if (threadIdx.x < B) {
      float s = shared ? 1.f : 0.f;
      for (int k = 0; k < K && !shared; ++k) s = ids[threadIdx.x * K + k] == pc.expert ? wts[threadIdx.x * K + k] : s;
      scale[threadIdx.x] = s;
    }

    clusterfuse::ffn::gate_up_gemv<T, kNT, kGemvDepth>(w1, p.ksplit1, xs, lay.ld1, B, part, res);
    gv::warp_prefetch_first(w2, p.ksplit2, warp, kL2PrefetchSteps);
    __syncthreads();

    // act piece = silu(g)·u for this block's rows, 8 consecutive rows (16 bytes) per thread
    for (int e = threadIdx.x; e < (rows1 / 8) * B; e += kThreads) {
      const int n = e / (rows1 / 8), r = (e - n * (rows1 / 8)) * 8;
      Pack8 o;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float g = res[(r + i) * B + n], u = res[(rows1 + r + i) * B + n];
        o.at<T>(i) = from_f<T>(g / (1.f + __expf(-g)) * u);
      }
      *reinterpret_cast<uint4*>(tile + n * lay.rows_max + r) = o.u;
    }
    const T* all = gather.all_gather(tile, gather_elems);
    const int per_seq = lay.rows_max / 8;  // 16-byte chunks of one sequence's share
    for (int e = threadIdx.x; e < C * B * per_seq; e += kThreads) {
      const int q = e / (B * per_seq), n = (e / per_seq) % B, r = (e % per_seq) * 8;
      int q0, q1;
      split_range(pc.len / 8, C, q, 8, q0, q1);  // block q's rows of the piece
      if (r < q1 - q0)
        *reinterpret_cast<uint4*>(act + n * lay.ld2 + q0 + r) =
            *reinterpret_cast<const uint4*>(all + (size_t)q * ActGather<C>::stride(gather_elems) + n * lay.rows_max + r);
    }
    __syncthreads();

    clusterfuse::ffn::down_gemv_scaled_accumulate<T, kNT, kGemvDepth>(w2, p.ksplit2, act, lay.ld2, B, H, h0, scale,
                                                                     first, part, yc);
  }
  if (first)  // a run with no columns (more clusters than 8-column units): a zero partial
    for (int e = threadIdx.x; e < B * (h1 - h0); e += kThreads) yc[(size_t)(e / (h1 - h0)) * H + h0 + e % (h1 - h0)] = 0.f;
  // Peers may still be receiving our bulk copies: the matching wait is at the very end.
  clusterfuse::dsm::cluster_arrive();

  // The next kernel may start placing its blocks from here on (pdl.cuh); else when ours exit.
  if (p.pdl_early) clusterfuse::pdl::launch_dependents();
  // ---- cross-cluster sum in cluster order, + residual -----------------------------------------
  clusterfuse::grid::barrier(p.counter);
  clusterfuse::ffn::sum_partials<T>(p.partials, NC, B, H, p.residual, p.out);
  clusterfuse::dsm::cluster_wait();  // no block leaves while peers use its memory
}

// ------------------------------------------------------------------------------------------------
// Host side: plan (grid, k splits, piece length, shared memory) and launch.
// ------------------------------------------------------------------------------------------------
using KernelFn = void (*)(MoeParams);

KernelFn select_kernel(int cluster) {
  switch (cluster) {
    case 1: return moe_block_kernel<1>;
    case 2: return moe_block_kernel<2>;
    case 4: return moe_block_kernel<4>;
    case 8: return moe_block_kernel<8>;
    default: return moe_block_kernel<16>;
  }
}

constexpr int kSmemLimit = 227 * 1024;
int ceil_div(int a, int b) { return (a + b - 1) / b; }

// The plan for a grid of nc clusters: the router's k parts, then the longest piece whose
// buffers fit in shared memory (from the longest run a cluster can get, halved until it fits).
int plan_for_grid(const CfMoeBlockShape& s, int nc, CfMoeBlockPlan* out) {
  const int B = s.batch, H = s.hidden, C = s.cluster;
  const int steps = ceil_div(H, gv::kStepK), row_tiles = ceil_div(s.experts, gv::kTileRows);
  int kparts = nc * C / row_tiles;
  kparts = kparts < 1 ? 1 : kparts > 8 ? 8 : kparts;
  kparts = kparts > steps ? steps : kparts;
  const int chunk_steps = ceil_div(steps, kparts);
  kparts = ceil_div(steps, chunk_steps);  // no empty part

  const int chosen_max = s.experts < B * s.top_k ? s.experts : B * s.top_k;
  const int widest = s.intermediate > s.shared_intermediate ? s.intermediate : s.shared_intermediate;
  const int longest_run = 8 * ceil_div((s.shared_intermediate + chosen_max * s.intermediate) / 8, nc);
  for (int pm = longest_run < widest ? longest_run : widest; pm >= 8; pm = 8 * ceil_div(pm / 8, 2)) {
    const Layout lay(B, H, s.experts, s.top_k, pm, C);
    const int budget = (kSmemLimit - lay.bytes(0)) / 4;  // floats left for the GEMV partials
    if (budget >= 0) {
      const int rt1 = 2 * ceil_div(lay.rows_max, gv::kTileRows), rt2 = ceil_div(ceil_div(H, C), gv::kTileRows);
      const int ksr = gv::choose_ksplit<kNT>(1, chunk_steps * gv::kStepK, kWarps, budget);
      const int ks1 = gv::choose_ksplit<kNT>(rt1, H, kWarps, budget);
      const int ks2 = gv::choose_ksplit<kNT>(rt2, pm, kWarps, budget);
      int pf = gv::partial_floats<kNT>(1, ksr);
      pf = pf > gv::partial_floats<kNT>(rt1, ks1) ? pf : gv::partial_floats<kNT>(rt1, ks1);
      pf = pf > gv::partial_floats<kNT>(rt2, ks2) ? pf : gv::partial_floats<kNT>(rt2, ks2);
      *out = CfMoeBlockPlan{nc, lay.bytes(pf), pm, kparts, chunk_steps * gv::kStepK, ksr, ks1, ks2};
      return 0;
    }
    if (pm == 8) break;
  }
  return kErrSmem;
}

int check_shape(const CfMoeBlockShape& s) {
  if (s.dtype != CF_MOE_DTYPE || s.batch < 1 || s.batch > kMaxBatch) return kErrBuild;
  const bool ok = s.hidden >= 8 && s.hidden % 8 == 0 && s.intermediate >= 8 && s.intermediate % 8 == 0 &&
                  s.shared_intermediate >= 0 && s.shared_intermediate % 8 == 0 && s.experts >= 1 &&
                  s.experts <= moe::kMaxExperts && s.top_k >= 1 && s.top_k <= moe::kMaxTopK &&
                  s.top_k <= s.experts &&
                  (s.cluster == 1 || s.cluster == 2 || s.cluster == 4 || s.cluster == 8 || s.cluster == 16);
  return ok ? 0 : kErrArgs;
}

int make_plan(const CfMoeBlockShape& s, int device, CfMoeBlockPlan* out) {
  if (int rc = check_shape(s)) return rc;
  KernelFn fn = select_kernel(s.cluster);
  int sms = 0;
  if (cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) return e;
  // Grid: at most one block per SM; shrink it until every cluster can be resident at once (the
  // grid barriers need that).
  const int nc = sms / s.cluster > 0 ? sms / s.cluster : 1;
  return clusterfuse::plan_resident_grid(fn, dim3(kThreads), s.cluster, nc, kErrNotResident,
                                         [&](int n, CfMoeBlockPlan* pl) { return plan_for_grid(s, n, pl); }, out);
}

}  // namespace

extern "C" {

int cf_moe_block_plan(const CfMoeBlockShape* s, CfMoeBlockPlan* plan) {
  if (int rc = check_shape(*s)) return rc;  // before any CUDA call
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device)) return e;
  return make_plan(*s, device, plan);
}

const char* cf_moe_block_error(int rc) {
  switch (rc) {
    case kErrArgs: return "moe_block: unsupported shape, cluster size or routing settings";
    case kErrSmem: return "moe_block: batch x hidden does not fit in shared memory";
    case kErrNotResident: return "moe_block: no cluster of this size can be resident on this GPU";
    case kErrBuild: return "moe_block: dtype or batch is not this library build's";
    default: return cudaGetErrorString(static_cast<cudaError_t>(rc));
  }
}

// Launch with a plan from cf_moe_block_plan and workspaces sized from it: partials =
// num_clusters*batch*hidden fp32, logits_ws = router_kparts*batch*experts fp32, counter = one
// zero-initialised uint32 owned by this stream.
int cf_moe_block_launch(const CfMoeBlockArgs* a, const CfMoeBlockPlan* plan, void* stream) {
  const CfMoeBlockShape& s = a->shape;
  if (int rc = check_shape(s)) return rc;
  const bool grouped = a->n_group > 0;
  if (a->launch_mode < 0 || a->launch_mode > 2 || a->n_group < 0 || a->n_group > moe::kMaxGroups ||
      (grouped && (s.experts % a->n_group || a->topk_group < 1 || a->topk_group > a->n_group)) ||
      (s.shared_intermediate > 0) != (a->w_shared_gate_up != nullptr && a->w_shared_down != nullptr) ||
      (a->topk_ids == nullptr) != (a->topk_weights == nullptr))
    return kErrArgs;
  MoeParams p{a->x, a->norm_w, a->w_router, a->w_gate_up, a->w_down, a->w_shared_gate_up, a->w_shared_down,
              a->residual, a->out, a->partials, a->logits_ws, a->topk_ids, a->topk_weights, a->counter,
              s.batch, s.hidden, s.intermediate, s.shared_intermediate, s.experts, s.top_k, s.cluster,
              a->n_group, grouped ? a->topk_group : 0, a->norm_topk_prob, a->routed_scaling_factor, a->eps,
              plan->piece_max, plan->router_kparts, plan->router_kchunk, plan->ksplit_router, plan->ksplit1,
              plan->ksplit2, a->launch_mode == 2};
  clusterfuse::LaunchOptions opts;
  opts.programmatic = a->launch_mode != 0;
  return clusterfuse::launch_cluster_with(opts, select_kernel(s.cluster), dim3(plan->num_clusters * s.cluster),
                                          dim3(kThreads), s.cluster, plan->smem_bytes,
                                          static_cast<cudaStream_t>(stream), p);
}

}  // extern "C"
