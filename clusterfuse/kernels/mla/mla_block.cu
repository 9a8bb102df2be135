// Fused MLA decode block of DeepSeek-V2(-Lite), absorbed form, one launch per layer:
//
//   x        = RMSNorm(hidden) * norm_w                                     every block
//   q, kv_a  = x · [W_q ; W_kv_a]^T                 phase A: row-split GEMV over the grid → ws_proj
//   ---- grid barrier ----
//   q_abs    = scale · [W_UK_h^T q_nope_h | RoPE(q_pe_h)]   phase B: absorption over the grid's warps → ws_q
//   cache[len] <- [T(kv_norm · T(c · rstd)) | RoPE(k_pe)]   phase B: the block owning the sequence
//   ---- grid barrier ----
//   state    = softmax(q_abs · rows) over rows [0, len]     phase C: split-KV over the latent cache
//              (keys split across clusters and the blocks of a cluster; the blocks' states merged
//              with ClusterReduce<SoftmaxMergeOp>, the cluster's record → ws_state)
//   ---- grid barrier ----
//   v_out    = W_UV_h · (merged o_lat_h)                    phase D: the split records merged, row-split → ws_v
//   ---- grid barrier ----
//   out      = residual + v_out · W_o^T                      phase E: row-split GEMV (no partials: K whole)
//
// Why one launch with grid barriers: every phase's work is spread over the whole grid (at batch 1
// the attention phase over the latent cache must be too: the published kernel gave each head a
// cluster, which re-read the whole cache once per head), and each phase needs the whole previous
// phase's result, so the boundaries are grid-wide. Grid barriers (grid_sync.cuh, ~1 µs) cost less
// than launches under a CUDA graph (~2-4 µs each with their prologue), and the grid is sized to be
// co-resident (the plan asks cudaOccupancyMaxActiveClusters). The latent is one KV head shared by
// all heads, so the new row is appended before the attention phase reads rows [0, len] from the
// cache (the reference also attends the row it stored, rounded to the cache dtype).
//
// Partition of the attention phase: items (sequence n, key split s < key_splits) go to clusters in
// turn; an item's keys (key_range over key_splits, then over the cluster's C blocks) are attended
// by all 16 heads at once (attend_latent), the C block states of the item are reduced into the
// cluster's rank 0 by ClusterReduce (ring: the 33 KB record tile moves in C-1 + C-1 steps of 33/C
// KB; the tree's per-round messages of the whole tile would not fit shared memory), which writes
// the item's record; phase D merges the key splits of a sequence. key_splits = clusters / batch
// (at least 1): at batch 1 every cluster shares the one sequence, at batch 16 each has ~2 items.
//
// Specialised at build time (JIT, -D): dtype, batch tiles, cluster size (ClusterReduce's N), the
// key loop (CF_MLA_KEY_MMA: fp32 CUDA cores, or tensor cores); the MLA dimensions are
// DeepSeek-V2-Lite's (heads 16: two per warp for the softmax statistics, the mma's 16 rows).
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stddef.h>

#include "clusterfuse/abi/mla_block.h"
#include "clusterfuse/attention/block_phases.cuh"
#include "clusterfuse/attention/split_kv.cuh"
#include "clusterfuse/cluster_common.cuh"
#include "clusterfuse/cluster_reduce.cuh"
#include "clusterfuse/dsm.cuh"
#include "clusterfuse/gemv.cuh"
#include "clusterfuse/grid_sync.cuh"
#include "clusterfuse/launch.cuh"
#include "clusterfuse/mla/block_phases.cuh"
#include "clusterfuse/rms_norm.cuh"
#include "clusterfuse/split_range.cuh"

#ifndef CF_MLA_DTYPE  // 0: bf16, 1: fp16
#define CF_MLA_DTYPE 0
#endif
#ifndef CF_MLA_NT  // 8-sequence batch tiles of the mma GEMVs: 1 (batch <= 8) or 2 (<= 16)
#define CF_MLA_NT 1
#endif
#ifndef CF_MLA_CLUSTER  // blocks per cluster: 1, 2, 4, 8 or 16
#define CF_MLA_CLUSTER 4
#endif
#ifndef CF_MLA_KEY_MMA  // the attention phase's key loop: 0 CUDA cores (attend_latent), 1 tensor cores
#define CF_MLA_KEY_MMA 0
#endif

namespace cg = cooperative_groups;
namespace gv = clusterfuse::gemv;
namespace at = clusterfuse::attention;
namespace ml = clusterfuse::mla;

namespace {

#if CF_MLA_DTYPE == 0
using T = __nv_bfloat16;
#else
using T = __half;
#endif
using D = ml::Dims<16, 512, 64, 128, 128>;  // DeepSeek-V2-Lite: heads, kv_lora_rank, rope, nope, v
constexpr int NT = CF_MLA_NT;
constexpr int C = CF_MLA_CLUSTER;
constexpr int kThreads = 256;  // 8 warps: two heads each in the attention phase
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBatch = 8 * NT;
constexpr int kGemvDepth = 2;  // as the attention block (its measurements: attention_block.cu)
constexpr int kSmemLimit = 227 * 1024;
constexpr int kVRows = D::kHeads * D::kV;  // rows of the value output, columns of W_o
// The GEMVs' k-split partials: room for 4 row tiles x 8 k parts (a block of a grid of >= 57 blocks
// has at most 4 tiles of the 228 q / KV-down tiles); the plan's k splits keep within it.
constexpr int kPartFloats = 4 * 8 * gv::kTileRows * 8 * NT;  // gv::partial_floats<NT>(4, 8)
constexpr int kRopePairs = (kMaxBatch * (D::kRope / 2) + kThreads - 1) / kThreads;

static_assert(C == 1 || C == 2 || C == 4 || C == 8 || C == 16, "cluster size must be 1, 2, 4, 8 or 16");
static_assert(kMaxBatch <= 32, "the checks take one lane per sequence");

using Reduce = clusterfuse::ClusterReduce<C, float, clusterfuse::SoftmaxMergeOp<D::kRank>, clusterfuse::ReduceAlgo::kRing,
                                          clusterfuse::Exchange::kDsm, D::kHeads * D::kRec>;
using SeqInfo = at::SeqInfo<kMaxBatch>;

enum : int {
  kErrArgs = -1,         // batch / hidden out of range for this specialisation
  kErrSmem = -2,         // does not fit in shared memory
  kErrNotResident = -3,  // no cluster of this size can be resident
};

struct Params {
  const T* hidden;
  const T* norm_w;
  const T* w_qa;
  const T* kv_norm_w;
  const T* w_uk;
  const T* w_uv;
  const T* w_o;
  const float* cos;
  const float* sin;
  const void* positions;
  T* cache;
  const int* cache_lens;
  const T* residual;
  void* out;
  float* ws_proj;
  float* ws_q;
  float* ws_state;
  T* ws_v;
  float* ws_y;
  unsigned int* counter;
  int* error;
  at::KvLayout kv;
  int B, H, max_pos, pos64, key_splits, ks_proj, ks_o;
  float eps, softmax_scale;
};

// Per block, beside the phases' big regions.
struct Misc {
  SeqInfo seq;               // ok / len / pos per sequence (the checks)
  float rstd[kMaxBatch];
  float red[kMaxBatch * kWarps];  // the norm's per-warp sums of squares; the latent norm's
};

using clusterfuse::detail::align16;
using clusterfuse::detail::max_int;
using clusterfuse::split_range;

// Shared-memory layout, identical on host and device. Regions whose lifetimes do not overlap share
// `big`: phase A's normed x [B][ldx(H)], phase C's absorbed query [kHeads][kLat] fp32 and key tile,
// phase D's merged latent outputs [B][kRank] fp32, phase E's value output [B][ldx(kVRows)].
// The ClusterReduce tile and scratch have their own room (peers write into the scratch).
struct Layout {
  int ld_a, ld_e, off_kt, off_part, off_tile, off_red, off_misc, bytes;
  __host__ __device__ Layout(int B, int H) {
    ld_a = gv::smem_ld(H);
    ld_e = gv::smem_ld(kVRows);
    off_kt = D::kHeads * D::kLat * 4;
#if CF_MLA_KEY_MMA
    const int attn = ml::MmaAttendLayout<D>::bytes;
#else
    const int attn = off_kt + ml::kKeyTile * ml::key_tile_ld<D>() * 2;
#endif
    const int big = max_int(max_int(B * ld_a * 2, B * ld_e * 2), max_int(attn, B * D::kRank * 4));
    off_part = align16(big);
    off_tile = off_part + align16(kPartFloats * 4);
    off_red = off_tile + align16(D::kHeads * D::kRec * 4);
    off_misc = off_red + align16((int)Reduce::scratch_bytes(D::kHeads * D::kRec));
    bytes = align16(off_misc + (int)sizeof(Misc));
  }
};

__global__ void __launch_bounds__(kThreads, 1) mla_block_kernel(const __grid_constant__ Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  cg::cluster_group cluster = cg::this_cluster();
  const int B = p.B, H = p.H;
  const int gb = blockIdx.x, nb = gridDim.x, rank = (int)cluster.block_rank(), cid = gb / C, nclusters = nb / C;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const Layout lay(B, H);
  T* xs = reinterpret_cast<T*>(smem);
  float* ol = reinterpret_cast<float*>(smem);
  float* part = reinterpret_cast<float*>(smem + lay.off_part);
  float* tile = reinterpret_cast<float*>(smem + lay.off_tile);
  Misc* misc = reinterpret_cast<Misc*>(smem + lay.off_misc);
  SeqInfo* seq = &misc->seq;

  Reduce reduce(smem + lay.off_red, D::kHeads * D::kRec);
  reduce.init_local();  // its cluster barrier comes before the first reduction (below)

  // ---- phase A: checks, norm, q / KV-down GEMV ---------------------------------------------------
  int t0, t1;  // this block's 16-row tiles of [W_q ; W_kv_a]
  split_range(D::kProjRows / 16, nb, gb, 1, t0, t1);
  const gv::WeightRows<T> qa_rows{{p.w_qa + (size_t)t0 * 16 * H, nullptr, nullptr, nullptr}, 1, (t1 - t0) * 16, H, H};
  gv::warp_prefetch_first(qa_rows, p.ks_proj, warp, 4);
  if (warp == kWarps - 1 && lane < B) {
    const int len = p.cache_lens[lane];
    const long long pos = p.pos64 ? static_cast<const long long*>(p.positions)[lane]
                                  : static_cast<const int*>(p.positions)[lane];
    // Row len must exist (len + 1 rows), its page too.
    bool ok = len >= 0 && pos >= 0 && pos < p.max_pos && len / p.kv.page_size < p.kv.max_pages;
    if (ok && p.kv.block_table) {
      const int page = p.kv.block_table[(size_t)lane * p.kv.max_pages + len / p.kv.page_size];
      ok = page >= 0 && page < p.kv.num_pages;
    }
    seq->ok[lane] = ok;
    seq->len[lane] = ok ? len : 0;
    seq->pos[lane] = ok ? (int)pos : 0;
    if (!ok && gb == 0) *p.error = 1;
  }
  clusterfuse::norm::block_sum_squares<T, kThreads>(p.hidden, B, H, misc->red);
  clusterfuse::norm::finish_rstd<kThreads>(misc->red, B, H, p.eps, misc->rstd);  // publishes seq too
  // RoPE's angles for phase B, loaded now so that they arrive during phase A.
  float rope_cos[kRopePairs], rope_sin[kRopePairs];
  at::load_rope_angles<D::kRope, kThreads>(p.cos, p.sin, seq->pos, B, rope_cos, rope_sin);
  clusterfuse::norm::normed_to_smem<T, kThreads>(p.hidden, p.norm_w, misc->rstd, B, H, 0, H, xs, lay.ld_a);
  __syncthreads();
  gv::block_gemv<T, NT, kGemvDepth>(qa_rows, p.ks_proj, xs, lay.ld_a, B, part, [&](int row, int n, float v) {
    p.ws_proj[(size_t)n * D::kProjRows + t0 * 16 + row] = v;
  });
  clusterfuse::grid::barrier(p.counter);

  // ---- phase B: absorbed queries (all warps of the grid), the new latent rows (one block each) ----
  ml::absorb_q<T, D>(p.w_uk, p.ws_proj, B, p.softmax_scale, gb * kWarps + warp, nb * kWarps, p.ws_q);
  for (int n = gb; n < B; n += nb)
    if (seq->ok[n])
      ml::latent_row_and_q_rope<T, D, kThreads>(p.ws_proj, p.kv_norm_w, n, seq->len[n], 1e-6f, p.softmax_scale,
                                                rope_cos, rope_sin, B, p.kv, p.cache, misc->red, p.ws_q);
  clusterfuse::grid::barrier(p.counter);

  // ---- phase C: split-KV attention over the latent cache, states merged in the cluster ----------
  clusterfuse::dsm::cluster_sync();  // every block of the cluster has initialised its reduction links
  const int items = B * p.key_splits;
  for (int it = cid; it < items; it += nclusters) {  // cluster-uniform: all blocks reduce together
    const int n = it / p.key_splits, s = it - n * p.key_splits;
    int a0, a1, k0, k1;
    at::key_range(seq->ok[n] ? seq->len[n] + 1 : 0, p.key_splits, s, a0, a1);
    at::key_range(max_int(a1 - a0, 0), C, rank, k0, k1);
    k0 += a0, k1 += a0;
    __syncthreads();  // qs: the previous item's reads are done
#if CF_MLA_KEY_MMA
    ml::attend_latent_mma<T, D, kThreads>(p.cache, p.kv, n, k0, k1, p.ws_q + (size_t)n * D::kHeads * D::kLat, smem,
                                          tile);
#else
    float* qs = reinterpret_cast<float*>(smem);
    T* kt = reinterpret_cast<T*>(smem + lay.off_kt);
    const float4* qsrc = reinterpret_cast<const float4*>(p.ws_q + (size_t)n * D::kHeads * D::kLat);
    for (int e = threadIdx.x; e < D::kHeads * D::kLat / 4; e += kThreads) reinterpret_cast<float4*>(qs)[e] = __ldcg(qsrc + e);
    __syncthreads();
    ml::attend_latent<T, D, kThreads>(p.cache, p.kv, n, k0, k1, qs, kt, tile);
#endif
    reduce.reduce_to_root(tile, D::kHeads * D::kRec, 0);
    if (rank == 0) {
      float4* dst = reinterpret_cast<float4*>(p.ws_state + (size_t)it * D::kHeads * D::kRec);
      for (int e = threadIdx.x; e < D::kHeads * D::kRec / 4; e += kThreads) dst[e] = reinterpret_cast<const float4*>(tile)[e];
    }
    __syncthreads();  // the tile is rewritten by the next item
  }
  clusterfuse::grid::barrier(p.counter);

  // ---- phase D: merge the key splits, absorbed V up-projection → ws_v ---------------------------
  {
    int r0, r1;
    split_range(kVRows / 16, nb, gb, 16, r0, r1);
    ml::merge_and_up_project<T, D, kThreads>(p.ws_state, p.key_splits, seq->ok, B, p.w_uv, r0, r1, ol, p.ws_v);
  }
  // W_o's first steps into L2 while the grid meets.
  int h0, h1;  // this block's rows of W_o (and of the output)
  split_range(H / 16, nb, gb, 16, h0, h1);
  const gv::WeightRows<T> wo_rows{{p.w_o + (size_t)h0 * kVRows, nullptr, nullptr, nullptr}, 1, h1 - h0, kVRows, kVRows};
  gv::warp_prefetch_first(wo_rows, p.ks_o, warp, 4);
  clusterfuse::grid::barrier(p.counter);

  // ---- phase E: O projection (+ residual) ------------------------------------------------------
  for (int e = threadIdx.x; e < B * kVRows / 8; e += kThreads) {
    const int n = e / (kVRows / 8), k = (e - n * (kVRows / 8)) * 8;
    *reinterpret_cast<uint4*>(xs + n * lay.ld_e + k) = __ldcg(reinterpret_cast<const uint4*>(p.ws_v + (size_t)n * kVRows + k));
  }
  __syncthreads();
  at::o_projection<T, NT, kGemvDepth>(wo_rows, p.ks_o, xs, lay.ld_e, B, H, h0, part, p.ws_y);
  __syncthreads();  // this block's rows of ws_y are written (by its own threads)
  for (int e = threadIdx.x; e < B * (h1 - h0); e += kThreads) {
    const int n = e / (h1 - h0), r = h0 + (e - n * (h1 - h0));
    const float y = p.ws_y[(size_t)n * H + r];
    if (p.residual)
      static_cast<T*>(p.out)[(size_t)n * H + r] = at::from_f<T>(at::to_f(p.residual[(size_t)n * H + r]) + y);
    else
      static_cast<float*>(p.out)[(size_t)n * H + r] = y;
  }
  clusterfuse::dsm::cluster_sync();  // no peer still sends into this block's reduction scratch
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
int make_plan(int B, int H, CfMlaBlockPlan* plan) {
  if (B < 1 || B > kMaxBatch || H < 16 || H % 16) return kErrArgs;
  int device = 0, sms = 0, active = 0;
  if (cudaError_t e = cudaGetDevice(&device)) return e;
  const Layout lay(B, H);
  if (lay.bytes > kSmemLimit) return kErrSmem;
  if (cudaError_t e = clusterfuse::max_active_clusters(mla_block_kernel, dim3(kThreads), C, lay.bytes, &active)) return e;
  if (cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) return e;
  if (active < 1) return kErrNotResident;
  // Every cluster resident at once (grid barriers), at most a block per SM.
  const int clusters = active < sms / C ? active : (sms / C > 0 ? sms / C : 1);
  const int nb = clusters * C;
  const int rt_proj = (D::kProjRows / 16 + nb - 1) / nb, rt_o = (H / 16 + nb - 1) / nb;
  plan->num_clusters = clusters;
  plan->smem_bytes = lay.bytes;
  plan->key_splits = clusters / B > 0 ? clusters / B : 1;
  plan->ksplit_proj = gv::choose_ksplit<NT>(rt_proj, H, kWarps, kPartFloats);
  plan->ksplit_o = gv::choose_ksplit<NT>(rt_o, kVRows, kWarps, kPartFloats);
  plan->partial_floats = kPartFloats;
  return 0;
}

}  // namespace

extern "C" {

void cf_mla_block_spec(CfMlaBlockSpec* spec) {
  spec->dtype = CF_MLA_DTYPE, spec->heads = D::kHeads, spec->kv_lora_rank = D::kRank;
  spec->qk_nope_head_dim = D::kNope, spec->qk_rope_head_dim = D::kRope, spec->v_head_dim = D::kV;
  spec->max_batch = kMaxBatch, spec->cluster = C, spec->threads = kThreads, spec->key_mma = CF_MLA_KEY_MMA;
}

int cf_mla_block_plan(const CfMlaBlockShape* s, CfMlaBlockPlan* plan) { return make_plan(s->batch, s->hidden, plan); }

const char* cf_mla_block_error(int rc) {
  switch (rc) {
    case kErrArgs: return "mla_block: unsupported batch or hidden size for this kernel";
    case kErrSmem: return "mla_block: batch x hidden does not fit in shared memory";
    case kErrNotResident: return "mla_block: no cluster of this size can be resident on this GPU";
    default: return cudaGetErrorString(static_cast<cudaError_t>(rc));
  }
}

int cf_mla_block_launch(const CfMlaBlockArgs* a, const CfMlaBlockPlan* plan, void* stream) {
  const CfMlaBlockShape& s = a->shape;
  if (s.batch < 1 || s.batch > kMaxBatch || s.hidden < 16 || s.hidden % 16 || plan->num_clusters < 1 ||
      plan->key_splits < 1)
    return kErrArgs;
  Params p{};
  p.hidden = static_cast<const T*>(a->hidden);
  p.norm_w = static_cast<const T*>(a->norm_w);
  p.w_qa = static_cast<const T*>(a->w_qa);
  p.kv_norm_w = static_cast<const T*>(a->kv_norm_w);
  p.w_uk = static_cast<const T*>(a->w_uk);
  p.w_uv = static_cast<const T*>(a->w_uv);
  p.w_o = static_cast<const T*>(a->w_o);
  p.cos = a->cos;
  p.sin = a->sin;
  p.positions = a->positions;
  p.cache = static_cast<T*>(a->cache);
  p.cache_lens = a->cache_lens;
  p.residual = static_cast<const T*>(a->residual);
  p.out = a->out;
  p.ws_proj = a->ws_proj;
  p.ws_q = a->ws_q;
  p.ws_state = a->ws_state;
  p.ws_v = static_cast<T*>(a->ws_v);
  p.ws_y = a->ws_y;
  p.counter = a->counter;
  p.error = a->error;
  p.kv.block_table = a->block_table;
  p.kv.page_size = a->page_size, p.kv.max_pages = a->max_pages, p.kv.num_pages = a->num_pages, p.kv.nkv = 1;
  p.B = s.batch, p.H = s.hidden, p.max_pos = a->max_pos, p.pos64 = a->positions_int64;
  p.key_splits = plan->key_splits, p.ks_proj = plan->ksplit_proj, p.ks_o = plan->ksplit_o;
  p.eps = a->eps, p.softmax_scale = a->softmax_scale;
  return clusterfuse::launch_cluster(mla_block_kernel, dim3(plan->num_clusters * C), dim3(kThreads), C, plan->smem_bytes,
                                     static_cast<cudaStream_t>(stream), p);
}

}  // extern "C"
