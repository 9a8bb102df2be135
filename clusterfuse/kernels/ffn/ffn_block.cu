// Fused FFN block (SwiGLU MLP) for small-batch decoding on Hopper, one kernel:
//
//   n   = RMSNorm(x) * norm_weight                         (every block, x is tiny)
//   a   = silu(n · W_gate^T) * (n · W_up^T)                 phase 1, W_gate_up = [gate rows; up rows]
//   y   = a · W_down^T                                      phase 2
//   out = y (fp32)  |  residual + y (x's dtype)             after a grid barrier
//
// Partition (every weight byte is read from HBM exactly once):
//   * The intermediate dimension I is cut into NC contiguous slices, one per cluster (cut at
//     multiples of 8 so W_down's column slices start on 16-byte boundaries).
//   * Phase 1: block `rank` of a cluster owns a contiguous run of the slice's rows (gate and up,
//     full K = H) and computes a = silu(g)·u for them. A ClusterGather (bulk copies into every
//     peer's shared memory, completing on mbarriers) gives every block all the pieces, which it
//     lays out as the cluster's whole activation slice; or the pieces go through a global
//     workspace and a cluster barrier (the "global" exchange ablation).
//   * Phase 2: block `rank` owns H/C rows of W_down restricted to the cluster's columns, so the
//     cluster produces one fp32 partial y_c [B, H] (not one per block: fewer partial bytes).
//   * The NC partials are summed in cluster order after a grid barrier (all blocks co-resident,
//     checked on the host), each block taking a slice of [B, H]: deterministic, no atomics.
// Phase boundaries do not drain HBM: before each wait the warps issue L2 bulk prefetches of the
// first steps of their next weights, which do not depend on the activations.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "clusterfuse/cluster_gather.cuh"
#include "clusterfuse/elements.cuh"
#include "clusterfuse/ffn/block_phases.cuh"
#include "clusterfuse/gemv.cuh"
#include "clusterfuse/grid_sync.cuh"
#include "clusterfuse/launch.cuh"
#include "clusterfuse/pdl.cuh"
#include "clusterfuse/rms_norm.cuh"
#include "clusterfuse/abi/ffn_block.h"
#include "clusterfuse/split_range.cuh"


namespace cg = cooperative_groups;
namespace gv = clusterfuse::gemv;

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kGemvDepth = 3;          // register pipeline depth of the GEMVs (gemv.cuh; depth - 1 steps of 4 KB in flight per warp)
constexpr int kL2PrefetchSteps = 4;    // weight steps (16 rows × 128 k) per warp prefetched into L2 at a phase boundary
constexpr int kMaxBatch = 16;

// Error codes below 0 are ours; >= 0 are cudaError_t.
enum : int {
  kErrArgs = -1,          // shapes / cluster size / exchange out of range
  kErrSmem = -2,          // batch × hidden does not fit in shared memory
  kErrNotResident = -3,   // this cluster size cannot be scheduled (0 active clusters)
};

using clusterfuse::ffn::FfnParams;

// The activation exchange: one ClusterGather call per kernel (one output stage), 2-byte elements.
template <int N>
using ActGather = clusterfuse::ClusterGather<N, __nv_bfloat16, clusterfuse::Exchange::kDsm, 1>;

__host__ __device__ inline int act_gather_scratch_bytes(int cluster, int elems) {
  switch (cluster) {
    case 1: return (int)ActGather<1>::scratch_bytes(elems);
    case 2: return (int)ActGather<2>::scratch_bytes(elems);
    case 4: return (int)ActGather<4>::scratch_bytes(elems);
    case 8: return (int)ActGather<8>::scratch_bytes(elems);
    default: return (int)ActGather<16>::scratch_bytes(elems);
  }
}

// Shared-memory layout, identical on host and device. The GEMV partial buffer comes last: only
// the host knows its size (from the k splits), the kernel only needs where it starts. The
// normed x is dead once the phase-1 GEMV is done: the activation gather reuses its region.
struct Layout {
  int ld1, ld2;   // row strides (elements) of the normed x and of the activation slice
  int rows_max;   // phase-1 rows of one block, at most (multiple of 8)
  int off_act, off_res, off_tile, off_part;  // the normed x / gather scratch start at 0

  __host__ __device__ Layout(int B, int H, int lmax, int cluster) {
    ld1 = gv::smem_ld(H);
    ld2 = gv::smem_ld(lmax);
    rows_max = 8 * ((lmax / 8 + cluster - 1) / cluster);
    const int xs_bytes = B * ld1 * 2, gather_bytes = act_gather_scratch_bytes(cluster, B * rows_max);
    off_act = ((xs_bytes > gather_bytes ? xs_bytes : gather_bytes) + 15) & ~15;
    off_res = off_act + ((B * ld2 * 2 + 15) & ~15);
    off_tile = off_res + 2 * rows_max * B * 4;  // this block's activation piece [B][rows_max]
    off_part = off_tile + ((B * rows_max * 2 + 15) & ~15);
  }
  __host__ __device__ int bytes(int part_floats) const { return off_part + part_floats * 4; }
};

using clusterfuse::split_range;

using clusterfuse::from_f;
using clusterfuse::Pack8;
using clusterfuse::to_f;

// Block-collective: every block's activation piece (tile [B][rows_max], its first rows of each
// sequence valid) gathered over the cluster and laid out as the cluster's whole slice,
// act[n][0..L). With init: only initialise the gather's mbarriers (before the cluster barrier
// that publishes them).
template <int N, typename T>
__device__ void gather_act(unsigned char* scratch, const T* tile, T* act, const Layout& lay, int B, int L,
                           bool init) {
  using Gather = clusterfuse::ClusterGather<N, T, clusterfuse::Exchange::kDsm, 1>;
  static_assert(sizeof(T) == 2, "ActGather sizes the scratch for 2-byte elements");
  const int elems = B * lay.rows_max;
  Gather gather(scratch, elems);
  if (init) {
    gather.init_local();
    return;
  }
  const T* all = gather.all_gather(tile, elems);
  const int per_seq = lay.rows_max / 8;  // 16-byte chunks of one sequence's piece
  for (int e = threadIdx.x; e < N * B * per_seq; e += kThreads) {
    const int q = e / (B * per_seq), n = (e / per_seq) % B, r = (e % per_seq) * 8;
    int q0, q1;
    split_range(L / 8, N, q, 8, q0, q1);  // block q's rows of the slice
    if (r < q1 - q0)
      *reinterpret_cast<uint4*>(act + n * lay.ld2 + q0 + r) =
          *reinterpret_cast<const uint4*>(all + (size_t)q * Gather::stride(elems) + n * lay.rows_max + r);
  }
  __syncthreads();
}

template <typename T>
__device__ void gather_act_any(int C, unsigned char* scratch, const T* tile, T* act, const Layout& lay, int B,
                               int L, bool init) {
  switch (C) {
    case 1: return gather_act<1>(scratch, tile, act, lay, B, L, init);
    case 2: return gather_act<2>(scratch, tile, act, lay, B, L, init);
    case 4: return gather_act<4>(scratch, tile, act, lay, B, L, init);
    case 8: return gather_act<8>(scratch, tile, act, lay, B, L, init);
    default: return gather_act<16>(scratch, tile, act, lay, B, L, init);
  }
}

template <typename T, int NT, bool kDsm>
__global__ void __launch_bounds__(kThreads, 1) ffn_block_kernel(const FfnParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int B = p.B, H = p.H, I = p.I, C = p.cluster;
  const int rank = blockIdx.x % C, cid = blockIdx.x / C, NC = gridDim.x / C;
  const int warp = threadIdx.x >> 5;

  const Layout lay(B, H, p.lmax, C);

  // ---- geometry ---------------------------------------------------------------------------
  int i0, i1, r0, r1, h0, h1;
  split_range(I / 8, NC, cid, 8, i0, i1);  // this cluster's slice of I
  const int L = i1 - i0;
  split_range(L / 8, C, rank, 8, r0, r1);  // this block's rows of the slice (phase 1)
  split_range(H, C, rank, 1, h0, h1);      // this block's rows of W_down (phase 2)
  const int rows1 = r1 - r0;

  const T* wgu = static_cast<const T*>(p.w_gate_up);
  gv::WeightRows<T> w1{{wgu + (size_t)(i0 + r0) * H, wgu + (size_t)(I + i0 + r0) * H, nullptr, nullptr},
                       2, rows1, H, H};
  gv::WeightRows<T> w2{{static_cast<const T*>(p.w_down) + (size_t)h0 * I + i0, nullptr, nullptr, nullptr},
                       1, h1 - h0, I, L};

  T* xs = reinterpret_cast<T*>(smem);
  T* act = reinterpret_cast<T*>(smem + lay.off_act);
  float* res = reinterpret_cast<float*>(smem + lay.off_res);
  float* part = reinterpret_cast<float*>(smem + lay.off_part);

  // ---- phase 0: prefetch the first phase-1 weights, then RMSNorm -----------------------------
  // The prefetches are hints: they may run before the previous kernel has finished (programmatic
  // launch, pdl.cuh); x and the residual are its outputs.
  gv::warp_prefetch_first(w1, p.ksplit1, warp, kL2PrefetchSteps / 2);
  clusterfuse::pdl::wait_prior_grid();
  // res (>= 16 B floats: rows_max >= 8) is scratch until phase 1 writes it: sums, then rstd.
  static_assert(kWarps + 1 <= 16, "the norm's scratch must fit in res");
  clusterfuse::ffn::norm_x<T, kThreads>(static_cast<const T*>(p.x), static_cast<const T*>(p.norm_w), B, H, p.eps, res,
                                        xs, lay.ld1);
  __syncthreads();

  // ---- phase 1: gate and up rows of this block → res[row][n] (fp32) --------------------------
  clusterfuse::ffn::gate_up_gemv<T, NT, kGemvDepth>(w1, p.ksplit1, xs, lay.ld1, B, part, res);
  // Next weights do not depend on the activations: start streaming them before waiting.
  gv::warp_prefetch_first(w2, p.ksplit2, warp, kL2PrefetchSteps);
  __syncthreads();
  if constexpr (kDsm) {
    // xs is dead: its region becomes the gather's scratch. Initialise the mbarriers there and
    // tell the cluster (release, after a proxy fence: peers' bulk copies may land in it as soon
    // as they pass the matching wait); the wait comes only before the gather.
    gather_act_any<T>(C, smem, nullptr, nullptr, lay, B, 0, true);
    clusterfuse::dsm::fence_proxy_async_shared();
    clusterfuse::dsm::cluster_arrive();
  }

  // ---- act = silu(g)·u for this block's rows, 8 consecutive rows (16 bytes) per thread --------
  T* tile = reinterpret_cast<T*>(smem + lay.off_tile);
  T* act_ws = kDsm ? nullptr : static_cast<T*>(p.act_ws) + (size_t)cid * B * p.lmax;
  for (int e = threadIdx.x; e < (rows1 / 8) * B; e += kThreads) {
    const int n = e / (rows1 / 8), r = (e - n * (rows1 / 8)) * 8;
    Pack8 o;
    o.u = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float g = res[(r + i) * B + n], u = res[(rows1 + r + i) * B + n];
      o.at<T>(i) = from_f<T>(g / (1.f + __expf(-g)) * u);
    }
    if constexpr (kDsm)
      *reinterpret_cast<uint4*>(tile + n * lay.rows_max + r) = o.u;
    else
      *reinterpret_cast<uint4*>(act_ws + (size_t)n * p.lmax + r0 + r) = o.u;
  }
  if constexpr (kDsm) {
    clusterfuse::dsm::cluster_wait();  // every block is past phase 1, its mbarriers initialised
    gather_act_any<T>(C, smem, tile, act, lay, B, L, false);
    // Peers may still be receiving our copies: the matching wait is at the very end.
    clusterfuse::dsm::cluster_arrive();
  } else {
    __threadfence();
    cg::this_cluster().sync();  // release/acquire at cluster scope: every piece is in the workspace
    for (int e = threadIdx.x; e < (L / 8) * B; e += kThreads) {
      const int n = e / (L / 8), k = (e - n * (L / 8)) * 8;
      *reinterpret_cast<uint4*>(act + n * lay.ld2 + k) =
          __ldcg(reinterpret_cast<const uint4*>(act_ws + (size_t)n * p.lmax + k));
    }
    __syncthreads();
  }

  // ---- phase 2: this block's W_down rows × the cluster's activation slice → partial y_c ------
  float* yc = p.partials + (size_t)cid * B * H;
  clusterfuse::ffn::down_gemv<T, NT, kGemvDepth>(w2, p.ksplit2, act, lay.ld2, B, H, h0, part, yc);

  // The next kernel may start placing its blocks from here on (pdl.cuh); else when ours exit.
  if (p.pdl_early) clusterfuse::pdl::launch_dependents();
  // ---- cross-cluster sum in cluster order, + residual ----------------------------------------
  clusterfuse::grid::barrier(p.counter);
  int e0, e1;
  split_range(B * H / 4, gridDim.x, blockIdx.x, 4, e0, e1);
  if (p.residual) {
    const T* resid = static_cast<const T*>(p.residual);
    T* out = static_cast<T*>(p.out);
    clusterfuse::grid::reduce_partials(p.partials, NC, (size_t)B * H, e0, e1, [&](int e, float4 s) {
      const float v[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) out[e + i] = from_f<T>(to_f(resid[e + i]) + v[i]);
    });
  } else {
    float* out = static_cast<float*>(p.out);
    clusterfuse::grid::reduce_partials(p.partials, NC, (size_t)B * H, e0, e1,
                                       [&](int e, float4 s) { *reinterpret_cast<float4*>(out + e) = s; });
  }
  if constexpr (kDsm) clusterfuse::dsm::cluster_wait();  // no block leaves while peers use its memory
}

// ------------------------------------------------------------------------------------------------
// Host side: plan (grid, k splits, shared memory) and launch.
// ------------------------------------------------------------------------------------------------
using KernelFn = void (*)(FfnParams);

template <typename T, int NT, bool kDsm>
KernelFn kernel_ptr() { return ffn_block_kernel<T, NT, kDsm>; }

KernelFn select_kernel(int dtype, int nt, int dsm) {
  // dtype: 0 = bf16, 1 = fp16
  static const KernelFn table[2][2][2] = {
      {{kernel_ptr<__nv_bfloat16, 1, false>(), kernel_ptr<__nv_bfloat16, 1, true>()},
       {kernel_ptr<__nv_bfloat16, 2, false>(), kernel_ptr<__nv_bfloat16, 2, true>()}},
      {{kernel_ptr<__half, 1, false>(), kernel_ptr<__half, 1, true>()},
       {kernel_ptr<__half, 2, false>(), kernel_ptr<__half, 2, true>()}}};
  return table[dtype][nt - 1][dsm];
}

constexpr int kSmemLimit = 227 * 1024;

template <int NT>
int plan_for_grid(int B, int H, int I, int C, int nc, CfFfnBlockPlan* out) {
  const int lmax = 8 * ((I / 8 + nc - 1) / nc);
  const Layout lay(B, H, lmax, C);
  const int budget = (kSmemLimit - lay.bytes(0)) / 4;  // floats left for the GEMV partials
  if (budget < 0) return kErrSmem;
  const int rows_max = 8 * ((lmax / 8 + C - 1) / C);
  const int rt1 = 2 * gv::Plan::ceil_div(rows_max, 16), rt2 = gv::Plan::ceil_div(gv::Plan::ceil_div(H, C), 16);
  const int ks1 = gv::choose_ksplit<NT>(rt1, H, kWarps, budget);
  const int ks2 = gv::choose_ksplit<NT>(rt2, lmax, kWarps, budget);
  const int pf1 = gv::partial_floats<NT>(rt1, ks1), pf2 = gv::partial_floats<NT>(rt2, ks2);
  *out = CfFfnBlockPlan{nc, lay.bytes(pf1 > pf2 ? pf1 : pf2), lmax, ks1, ks2};
  return 0;
}

int make_plan(int dtype, int B, int H, int I, int C, int dsm, int device, CfFfnBlockPlan* out) {
  if (dtype < 0 || dtype > 1 || B < 1 || B > kMaxBatch || H < 8 || H % 8 || I < 8 || I % 8 ||
      !(C == 1 || C == 2 || C == 4 || C == 8 || C == 16) || dsm < 0 || dsm > 1)
    return kErrArgs;
  const int nt = B > 8 ? 2 : 1;
  KernelFn fn = select_kernel(dtype, nt, dsm);
  int sms = 0;
  if (cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) return e;

  // Grid: at most one block per SM and at least 8 columns of I per cluster; shrink it until
  // every cluster can be resident at once (the grid barrier needs that).
  const int nc = sms / C < I / 8 ? sms / C : I / 8;
  return clusterfuse::plan_resident_grid(fn, dim3(kThreads), C, nc, kErrNotResident, [&](int n, CfFfnBlockPlan* pl) {
    return nt == 1 ? plan_for_grid<1>(B, H, I, C, n, pl) : plan_for_grid<2>(B, H, I, C, n, pl);
  }, out);
}

}  // namespace

extern "C" {

int cf_ffn_block_plan(const CfFfnBlockShape* s, CfFfnBlockPlan* plan) {
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device)) return e;
  return make_plan(s->dtype, s->batch, s->hidden, s->intermediate, s->cluster, s->dsm, device, plan);
}

const char* cf_ffn_block_error(int rc) {
  switch (rc) {
    case kErrArgs: return "ffn_block: unsupported shape, cluster size or exchange";
    case kErrSmem: return "ffn_block: batch x hidden does not fit in shared memory";
    case kErrNotResident: return "ffn_block: no cluster of this size can be resident on this GPU";
    default: return cudaGetErrorString(static_cast<cudaError_t>(rc));
  }
}

// Launch with a plan from cf_ffn_block_plan and workspaces sized from it: partials =
// num_clusters*batch*hidden fp32, act_ws = num_clusters*batch*lmax elements (global exchange),
// counter = one zero-initialised uint32 owned by this stream.
int cf_ffn_block_launch(const CfFfnBlockArgs* a, const CfFfnBlockPlan* plan, void* stream) {
  const CfFfnBlockShape& s = a->shape;
  if (a->launch_mode < 0 || a->launch_mode > 2 || s.dtype < 0 || s.dtype > 1 || s.dsm < 0 || s.dsm > 1 ||
      s.batch < 1 || s.batch > kMaxBatch)
    return kErrArgs;
  const int nt = s.batch > 8 ? 2 : 1;
  FfnParams p{a->x, a->norm_w, a->w_gate_up, a->w_down, a->residual, a->out, a->partials, a->act_ws, a->counter,
              s.batch, s.hidden, s.intermediate, s.cluster, plan->lmax, plan->ksplit1, plan->ksplit2, a->eps,
              a->launch_mode == 2};
  clusterfuse::LaunchOptions opts;
  opts.programmatic = a->launch_mode != 0;
  return clusterfuse::launch_cluster_with(opts, select_kernel(s.dtype, nt, s.dsm), dim3(plan->num_clusters * s.cluster),
                                          dim3(kThreads), s.cluster, plan->smem_bytes,
                                          static_cast<cudaStream_t>(stream), p);
}

}  // extern "C"
