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
#include "clusterfuse/ffn/block_program.cuh"
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

constexpr int kThreads = clusterfuse::ffn::kBlockThreads;
constexpr int kWarps = kThreads / 32;
constexpr int kGemvDepth = clusterfuse::ffn::kGemvDepth;
constexpr int kL2PrefetchSteps = clusterfuse::ffn::kL2PrefetchSteps;
constexpr int kMaxBatch = 16;

// Error codes below 0 are ours; >= 0 are cudaError_t.
enum : int {
  kErrArgs = -1,          // shapes / cluster size / exchange out of range
  kErrSmem = -2,          // batch × hidden does not fit in shared memory
  kErrNotResident = -3,   // this cluster size cannot be scheduled (0 active clusters)
};

using clusterfuse::ffn::FfnParams;

using Layout = clusterfuse::ffn::BlockLayout;

using clusterfuse::split_range;

using clusterfuse::from_f;
using clusterfuse::Pack8;
using clusterfuse::to_f;

template <typename T, int NT, bool kDsm>
__global__ void __launch_bounds__(kThreads, 1) ffn_block_kernel(const FfnParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int B = p.B, H = p.H, I = p.I, C = p.cluster;
  const int rank = blockIdx.x % C, cid = blockIdx.x / C, NC = gridDim.x / C;
  const int warp = threadIdx.x >> 5;
  // The prefetches before it are hints, so they may run before the previous kernel has finished.
  auto wait_inputs = [] { clusterfuse::pdl::wait_prior_grid(); };
  auto stamp = [](clusterfuse::ffn::Stamp) {};  // no timeline build of this kernel

#include "clusterfuse/ffn/group_program_body.cuh"


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
