// Fused Llama-family attention block for small-batch decoding on Hopper, one kernel per layer:
//
//   x      = RMSNorm(hidden) * norm_weight                       every block (x is tiny)
//   q,k,v  = x · W_qkv^T (+ b_qkv)                               phase 1 (row-split GEMV)
//   q,k    = RMSNorm per head (q_norm_w, k_norm_w)               every block, CF_ATTN_QK_NORM builds
//   q,k    = RoPE(q, k)                                          every block, on chip
//   cache[cache_lens[b]] <- k, v                                 one block per sequence
//   o      = softmax(q·K^T / sqrt(hd)) V over cache_lens[b] + 1  phase 2 (split-KV)
//            keys (CF_ATTN_WINDOW builds: the last p.window of them)
//   y      = o · W_o^T                                           phase 3, fp32 partial per cluster
//   out    = Σ_clusters y  (fp32)  |  residual + Σ y  (hidden's dtype)
//
// Partition (every weight and KV byte is read from HBM once per step):
//   * One cluster per KV head group `cid` (its G = nh/nkv query heads share K/V weights and the KV
//     cache), C blocks per cluster. The cluster's Q/K/V rows ((G+2)·hd of W_qkv) are split in
//     16-row units across its blocks (phase 1, one GEMV over the block's rows); each block pushes
//     its rows of q,k,v for all sequences into every block's shared memory (st.async, each receiver
//     waiting on its own mbarrier: no cluster barrier, whose release fence would wait for the KV
//     prefetches in flight; see the exchange below) or through a global workspace (the
//     "global" ablation, then a barrier of the group).
//   * Phase 2: every sequence's cached keys [0, len) (with a window: from the 16-key tile of its
//     first row, at::window_key_range) are split in C contiguous ranges, one per block; inside a block, each warp folds 16-key tiles with tensor-core mma (split_kv_mma.cuh;
//     K and V rows in 16-byte loads straight into registers).
//     The blocks' (m, l, acc) states are merged by reduce-scatter then all-gather: block r merges
//     its slice of o from every block's state and pushes it into every block (a fixed butterfly
//     order: deterministic, identical in all blocks; st.async again). The new token (key `len`)
//     enters there as one more state, from the q, k, v every block holds (not re-read from the
//     cache row the same kernel writes).
//   * Phase 3: block `rank` owns H/C rows of W_o restricted to the cluster's G·hd columns, so the
//     cluster produces one fp32 partial [B, H]. Partials are summed in cluster order: after a
//     grid barrier when the whole grid is co-resident (checked on the host), else by the last
//     block of each row range to arrive (arrival counter). No atomics on outputs.
// Residency: clusters must sit inside one GPC, so at one block per SM an H100 holds only 30
// clusters of 4 (16 of 8): 32 KV heads would run in two waves. Blocks of 128 threads with room for
// two per SM make every grid of <= 132 x 2 blocks co-resident; an SM alone keeps 32 KB of weight
// loads in flight with 4 warps, and a doubled SM still has bandwidth to spare (~22 GB/s per SM is
// all an SM gets when HBM is saturated).
// Weights load straight into registers (gemv.cuh), with L2 bulk prefetches of the next weights'
// first steps issued before each wait; the first keys of each block's range are prefetched into
// L2 before the q,k,v exchange. (A per-warp ring of shared-memory weight tiles filled by TMA, one
// schedule for the block's Q/K/V rows and W_o slice, was 20-27% slower on the H100 in every
// measurement and was removed: bench/results/ring_kv_prefetch_async_exchange_h100.md.)
//
// Specialised at build time (JIT, -D): dtype, head dim, GQA ratio, batch tiles, block size and the
// model features QK-norm and sliding window; defaults below so the file compiles with no flags.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stddef.h>

#include "clusterfuse/abi/attention_block.h"
#include "clusterfuse/attention/block_params.cuh"
#include "clusterfuse/attention/block_program.cuh"
#include "clusterfuse/attention/block_phases.cuh"
#include "clusterfuse/attention/split_kv.cuh"
#include "clusterfuse/attention/split_kv_mma.cuh"
#include "clusterfuse/cluster_common.cuh"
#include "clusterfuse/dsm.cuh"
#include "clusterfuse/gemv.cuh"
#include "clusterfuse/grid_sync.cuh"
#include "clusterfuse/launch.cuh"
#include "clusterfuse/pdl.cuh"
#include "clusterfuse/rms_norm.cuh"
#include "clusterfuse/split_range.cuh"

#ifndef CF_ATTN_DTYPE  // 0: bf16, 1: fp16
#define CF_ATTN_DTYPE 0
#endif
#ifndef CF_ATTN_HEAD_DIM  // 64 or 128
#define CF_ATTN_HEAD_DIM 128
#endif
#ifndef CF_ATTN_GQA  // query heads per KV head, 1..8
#define CF_ATTN_GQA 1
#endif
#ifndef CF_ATTN_NT  // 8-sequence batch tiles of the mma GEMVs: 1 (batch <= 8) or 2 (<= 16)
#define CF_ATTN_NT 1
#endif
// 128 threads x 2 blocks/SM: a cluster of C fits where C SMs do not (see below). 256 (the op's
// second build, block_threads): one block per SM (the registers), twice the loads in flight per
// block; the tuner picks per shape (clusterfuse/ops/attention_block.py, BLOCK_THREADS).
#ifndef CF_ATTN_THREADS
#define CF_ATTN_THREADS 128
#endif
#ifndef CF_ATTN_TIMELINE  // 1: thread 0 of each block records the phase boundaries (bench/attention_timeline.py)
#define CF_ATTN_TIMELINE 0
#endif
// Model features, each a switch so that a build without it keeps its machine code
// (tools/compare_machine_code.sh):
#ifndef CF_ATTN_QK_NORM  // 1: per-head RMSNorm of q and k before RoPE (Qwen3; weights p.q_norm_w, p.k_norm_w)
#define CF_ATTN_QK_NORM 0
#endif
#ifndef CF_ATTN_WINDOW  // 1: sliding-window attention over the last p.window keys (Mistral-v0.1; 0: all)
#define CF_ATTN_WINDOW 0
#endif

namespace cg = cooperative_groups;
namespace gv = clusterfuse::gemv;
namespace at = clusterfuse::attention;

namespace {

#if CF_ATTN_DTYPE == 0
using T = __nv_bfloat16;
#else
using T = __half;
#endif
// The build's shape and features (at::BlockConfig); the names below are its, for the host side.
using Cfg = at::BlockConfig<T, CF_ATTN_HEAD_DIM, CF_ATTN_GQA, CF_ATTN_NT, CF_ATTN_THREADS, CF_ATTN_QK_NORM != 0,
                            CF_ATTN_WINDOW != 0, CF_ATTN_TIMELINE != 0>;
constexpr int HD = Cfg::HD;
constexpr int G = Cfg::G;
constexpr int NT = Cfg::NT;
constexpr int kThreads = Cfg::kThreads;
constexpr int kWarps = Cfg::kWarps;
constexpr int kMaxBatch = Cfg::kMaxBatch;
constexpr int kMaxCluster = Cfg::kMaxCluster;
constexpr int kMinBlocksPerSm = kThreads <= 128 ? 2 : 1;  // blocks per SM the register budget must allow
constexpr int kRows = Cfg::kRows;  // the cluster's Q, K, V rows of W_qkv
constexpr int kSmemLimit = 227 * 1024;
constexpr int kXsBudget = 48 * 1024;  // normed-x staging; larger batch x hidden is cut in k chunks
// Two blocks per SM (what makes every grid co-resident, see above) when a block needs at most this
// (228 KB per SM, 1 KB of it reserved per block).
constexpr int kSmemTwoPerSm = (228 * 1024) / 2 - 1024;
// More than half an SM's shared memory even before its 1 KB reservation: one block per SM.
constexpr int kSmemOnePerSm = (228 * 1024) / 2 + 16;

using at::kExDsm;
using at::kExFlat;
using at::kExGlobal;
constexpr int kMaxGroups = 256;  // KV head groups the flat exchange has counters for

enum : int {
  kErrArgs = -1,         // shapes / cluster size out of range for this specialisation
  kErrSmem = -2,         // does not fit in shared memory
  kErrNotResident = -3,  // no cluster of this size can be resident
};

using Params = Cfg::Params;
using Layout = at::BlockLayout<Cfg>;
using SeqInfo = Cfg::SeqInfo;
using at::Piece;
using at::qkv_pieces;
using at::region_row;
using at::kTimelineSlots;
// The group program's (group_program_body.cuh) compile-time names beside those above.
constexpr int kQkvGemvDepth = Cfg::kQkvGemvDepth;
constexpr int kOGemvDepth = Cfg::kOGemvDepth;
constexpr int kL2PrefetchSteps = Cfg::kL2PrefetchSteps;
constexpr bool kQkNorm = Cfg::kQkNorm, kWindow = Cfg::kWindow;

__device__ __forceinline__ void stamp(unsigned long long* timeline, at::Stamp s) { at::stamp<Cfg::kTimeline>(timeline, s); }

using clusterfuse::detail::max_int;
using clusterfuse::split_range;

// Split cluster barrier halves (dsm.cuh): a relaxed arrive (no fence: loads and prefetches in
// flight stay in flight) and the acquire wait (barrier.cluster.wait's default semantics).
using clusterfuse::dsm::cluster_arrive_relaxed;
using clusterfuse::dsm::cluster_wait;

template <int kEx>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    attention_block_kernel(const __grid_constant__ Params p) {
  constexpr bool kDsm = kEx == kExDsm, kFlat = kEx == kExFlat;
  extern __shared__ __align__(16) unsigned char smem[];
  cg::cluster_group cluster = cg::this_cluster();
  const int B = p.B, H = p.H, C = p.C, nkv = p.kv.nkv;
  const int rank = kFlat ? (int)(blockIdx.x % C) : (int)cluster.block_rank(), cid = blockIdx.x / C;
  // The group's barrier on the exchanges through global memory (block-collective).
  auto group_sync = [&] {
    if constexpr (kFlat)
      clusterfuse::grid::group_barrier(p.group_counters + cid, C, rank == 0);
    else
      cluster.sync();
  };
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  // The DSM exchanges' mbarriers: [0] q,k,v, [1] o, each completing once per launch (phase 0).
  // Peers store into them only after the cluster wait that follows phase 0's arrival, which
  // publishes the init.
  __shared__ uint64_t ex_bars[2];
  constexpr uint32_t parity = 0;
  constexpr bool kAsyncEx = kDsm;
  if (kAsyncEx && threadIdx.x == 0) {
    clusterfuse::dsm::mbar_init(&ex_bars[0], 1);
    clusterfuse::dsm::mbar_init(&ex_bars[1], 1);
    clusterfuse::dsm::fence_mbarrier_init();
  }

  stamp(p.timeline, at::kStart);
  // The prefetches before it are hints, so they may run before the previous kernel has finished
  // (programmatic launch, pdl.cuh); what follows reads that kernel's outputs.
  auto wait_inputs = [&] {
    clusterfuse::pdl::wait_prior_grid();
    stamp(p.timeline, at::kWaited);
  };
  // ---- phases 0-3: this cluster's fp32 partial of the O projection ---------------------------
#include "clusterfuse/attention/group_program_body.cuh"

  // The next kernel (FFN) may start placing its blocks from here on, on SMs this grid leaves free,
  // while the partials are summed (pdl.cuh); else when this grid's blocks exit.
  if (p.pdl_early) clusterfuse::pdl::launch_dependents();
  // ---- cross-cluster sum in cluster order (+ residual) ---------------------------------------
  auto write_out = [&](int e, float4 s) {
    if (p.residual) {
      T* out = static_cast<T*>(p.out);
      const float v[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) out[e + i] = at::from_f<T>(at::to_f(p.residual[e + i]) + v[i]);
    } else {
      *reinterpret_cast<float4*>(static_cast<float*>(p.out) + e) = s;
    }
  };
  if (p.coresident) {
    clusterfuse::grid::barrier(p.counters);
    stamp(p.timeline, at::kBarrier);
    int e0, e1;
    split_range(B * H / 4, gridDim.x, blockIdx.x, 4, e0, e1);
    clusterfuse::grid::reduce_partials(p.partials, nkv, (size_t)B * H, e0, e1, write_out);
  } else {
    // Last block of this row range to arrive (over all clusters) sums it.
    __shared__ int s_last;
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();
      const unsigned int old = atomicAdd(p.counters + 1 + rank, 1u);
      s_last = old == (unsigned int)(nkv - 1);
      if (s_last) {
        p.counters[1 + rank] = 0;  // ready for the next launch (stream-ordered)
        __threadfence();
      }
    }
    __syncthreads();
    stamp(p.timeline, at::kBarrier);
    if (s_last)
      for (int n = 0; n < B; ++n)
        clusterfuse::grid::reduce_partials(p.partials, nkv, (size_t)B * H, n * H + h0, n * H + h1, write_out);
  }
  if constexpr (kAsyncEx) cluster_wait();  // no peer still reads this block's state (see the merge)
  stamp(p.timeline, at::kEnd);
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
using KernelFn = void (*)(Params);
KernelFn kernel_for(int ex) {
  return ex == kExDsm ? attention_block_kernel<kExDsm> : ex == kExFlat ? attention_block_kernel<kExFlat>
                                                                        : attention_block_kernel<kExGlobal>;
}

int make_plan(int B, int H, int nh, int nkv, int C, int ex, CfAttentionBlockPlan* plan) {
  if (B < 1 || B > kMaxBatch || H < 16 || H % 16 || nkv < 1 || nh != nkv * G ||
      !(C == 1 || C == 2 || C == 4 || C == 8 || C == 16) || ex < kExGlobal || ex > kExFlat ||
      (ex == kExFlat && nkv > kMaxGroups))
    return kErrArgs;
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device)) return e;
  KernelFn fn = kernel_for(ex);
  // Occupancy is asked for the hardware cluster the launch uses: one block with the flat exchange,
  // and then "active clusters" counts blocks.
  const int hw_cluster = ex == kExFlat ? 1 : C, needed = ex == kExFlat ? nkv * C : nkv;

  // k chunk: the whole hidden size unless B x H of normed x would crowd shared memory.
  int chunks = 1, kc = H;
  while (B * gv::smem_ld(kc) * 2 > kXsBudget) {
    ++chunks;
    kc = 128 * ((H + 128 * chunks - 1) / (128 * chunks));
  }

  // k splits of every GEMV (ks[r]: rank r's Q/K/V GEMV, all its pieces; ks[kMaxCluster]: W_o), their
  // partials taking whatever shared memory the SM has left.
  int ks[kMaxCluster + 1], part = 0;
  const int budget = (kSmemLimit - Layout(B, kc, 0).bytes) / 4;
  if (budget < 0) return kErrSmem;
  for (int i = 0; i < kMaxCluster; ++i) ks[i] = 1;  // ranks >= C: defined, unused
  for (int r = 0; r < C; ++r) {
    int lo, hi;
    split_range(kRows / 16, C, r, 16, lo, hi);
    const int rt = (hi - lo) / 16;
    ks[r] = gv::choose_ksplit<NT>(rt, kc, kWarps, budget);
    part = max_int(part, gv::partial_floats<NT>(rt, ks[r]));
  }
  const int rt_o = (4 * ((H / 4 + C - 1) / C) + 15) / 16;
  ks[kMaxCluster] = gv::choose_ksplit<NT>(rt_o, G * HD, kWarps, budget);
  part = max_int(part, gv::partial_floats<NT>(rt_o, ks[kMaxCluster]));
  for (int i = 0; i < kMaxCluster; ++i) plan->ksplit_qkv[i] = ks[i];
  const int ks_o = ks[kMaxCluster];
  const Layout lay(B, kc, part);
  if (lay.bytes > kSmemLimit) return kErrSmem;

  // A grid of at most half as many blocks as the GPU has SMs gets an SM per block, by asking for
  // more than half an SM's shared memory: where two fit, the cluster scheduler packs two blocks of
  // a cluster onto one SM and halves their bandwidth (H100, Llama-3-8B batch 16 at cluster 8, 64
  // blocks: decode step 14.5 -> 16.4 ms once the layout shrank to two per SM;
  // bench/results/layout_share_h100.md). Kept only where the whole grid stays co-resident.
  int sms = 0, active = 0, bytes = lay.bytes;
  if (cudaError_t e = clusterfuse::max_active_clusters(fn, dim3(kThreads), hw_cluster, bytes, &active)) return e;
  if (cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) return e;
  if (nkv * C * 2 <= sms && bytes <= kSmemTwoPerSm) {
    int spread_active = 0;
    if (cudaError_t e =
            clusterfuse::max_active_clusters(fn, dim3(kThreads), hw_cluster, kSmemOnePerSm, &spread_active))
      return e;
    if (spread_active >= needed) bytes = kSmemOnePerSm, active = spread_active;
  }
  // The flat exchange's barriers spin on blocks of the group: all of them must be resident.
  if (active < 1 || (ex == kExFlat && active < needed)) return kErrNotResident;
  plan->smem_bytes = bytes, plan->k_chunk = kc, plan->ksplit_o = ks_o, plan->coresident = active >= needed;
  plan->active_clusters = active, plan->partial_floats = part;
  return 0;
}

}  // namespace

extern "C" {

void cf_attention_block_spec(CfAttentionBlockSpec* spec) {
  spec->dtype = CF_ATTN_DTYPE, spec->head_dim = HD, spec->gqa = G, spec->max_batch = kMaxBatch;
  spec->timeline_slots = CF_ATTN_TIMELINE ? kTimelineSlots : 0;
  spec->threads = kThreads;
  spec->qk_norm = CF_ATTN_QK_NORM, spec->window = CF_ATTN_WINDOW;
}

int cf_attention_block_plan(const CfAttentionBlockShape* s, CfAttentionBlockPlan* plan) {
  return make_plan(s->batch, s->hidden, s->heads, s->kv_heads, s->cluster, s->exchange, plan);
}

const char* cf_attention_block_error(int rc) {
  switch (rc) {
    case kErrArgs: return "attention_block: unsupported shape or cluster size for this kernel";
    case kErrSmem: return "attention_block: batch x hidden x heads does not fit in shared memory";
    case kErrNotResident: return "attention_block: no cluster of this size can be resident on this GPU";
    default: return cudaGetErrorString(static_cast<cudaError_t>(rc));
  }
}

int cf_attention_block_launch(const CfAttentionBlockArgs* a, const CfAttentionBlockPlan* plan, void* stream) {
  const CfAttentionBlockShape& s = a->shape;
  if (a->kv_prefetch_keys < 0 || a->launch_mode < 0 || a->launch_mode > 2 || s.exchange < kExGlobal ||
      s.exchange > kExFlat)
    return kErrArgs;
  // A feature's arguments only in the build that does it, and there always (never silently ignored).
  if (CF_ATTN_QK_NORM ? !a->q_norm_w || !a->k_norm_w : a->q_norm_w || a->k_norm_w) return kErrArgs;
  if (((uintptr_t)a->q_norm_w | (uintptr_t)a->k_norm_w) % 16) return kErrArgs;  // their L2 prefetch's alignment
  if (a->window < 0 || (!CF_ATTN_WINDOW && a->window)) return kErrArgs;
  Params p{};
  p.hidden = static_cast<const T*>(a->hidden);
  p.norm_w = static_cast<const T*>(a->norm_w);
  p.w_qkv = static_cast<const T*>(a->w_qkv);
  p.b_qkv = static_cast<const T*>(a->b_qkv);
  p.w_o = static_cast<const T*>(a->w_o);
  p.cos = a->cos;
  p.sin = a->sin;
  p.positions = a->positions;
  p.k_cache = static_cast<T*>(a->k_cache);
  p.v_cache = static_cast<T*>(a->v_cache);
  p.cache_lens = a->cache_lens;
  p.kv.block_table = a->block_table;
  p.residual = static_cast<const T*>(a->residual);
  p.out = a->out;
  p.partials = a->partials;
  p.ws_qkv = a->ws_qkv;
  p.ws_attn = a->ws_attn;
  p.counters = a->counters;
  p.group_counters = a->group_counters;
  p.error = a->error;
  p.timeline = reinterpret_cast<unsigned long long*>(a->timeline);
  p.B = s.batch, p.H = s.hidden, p.nh = s.heads, p.kv.nkv = s.kv_heads, p.C = s.cluster;
  p.max_pos = a->max_pos, p.pos64 = a->positions_int64;
  p.kv.page_size = a->page_size, p.kv.max_pages = a->max_pages, p.kv.num_pages = a->num_pages;
  p.kv_prefetch_keys = a->kv_prefetch_keys;
  p.pdl_early = a->launch_mode == 2;
  p.kc = plan->k_chunk, p.ks_o = plan->ksplit_o, p.coresident = plan->coresident;
  p.part_floats = plan->partial_floats;
  p.eps = a->eps;
  for (int r = 0; r < kMaxCluster; ++r) p.ks_qkv[r] = (signed char)plan->ksplit_qkv[r];
  p.q_norm_w = static_cast<const T*>(a->q_norm_w);
  p.k_norm_w = static_cast<const T*>(a->k_norm_w);
  p.window = a->window;
  clusterfuse::LaunchOptions opts;
  opts.programmatic = a->launch_mode != 0;
  return clusterfuse::launch_cluster_with(opts, kernel_for(s.exchange), dim3(p.kv.nkv * p.C), dim3(kThreads),
                                          s.exchange == kExFlat ? 1 : p.C, plan->smem_bytes,
                                          static_cast<cudaStream_t>(stream), p);
}

}  // extern "C"
