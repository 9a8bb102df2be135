// Test and benchmark kernel for ClusterReduce: each cluster loads one tile per block from
// global memory into shared memory, reduces it `repeats` times back to back (in place),
// and writes every block's tile back. One library per (cluster size, dtype, operator);
// algorithm (tree / ring), exchange (DSM / global) and root are run-time arguments.
//
//   CF_CLUSTER      cluster size N (1, 2, 4, 8, 16)
//   CF_DTYPE        0 fp32, 1 bf16, 2 fp16
//   CF_OP           0 sum, 1 max, 2 softmax merge (records of CF_SOFTMAX_DIM + 2 fp32 values)
#include <cuda_runtime.h>

#include "clusterfuse/cluster.cuh"
#include "primitive_test_common.cuh"

#ifndef CF_CLUSTER
#define CF_CLUSTER 4
#endif
#ifndef CF_OP
#define CF_OP 0
#endif
#ifndef CF_SOFTMAX_DIM
#define CF_SOFTMAX_DIM 64
#endif

namespace cf = clusterfuse;
namespace pt = clusterfuse::primitives_test;

namespace {

constexpr int N = CF_CLUSTER;
#if CF_OP == 0
using Op = cf::SumOp;
#elif CF_OP == 1
using Op = cf::MaxOp;
#elif CF_OP == 2
using Op = cf::SoftmaxMergeOp<CF_SOFTMAX_DIM>;
#else
#error "CF_OP must be 0 (sum), 1 (max) or 2 (softmax merge)"
#endif

template <cf::ReduceAlgo A, cf::Exchange X>
using Reduce = cf::ClusterReduce<N, elem_t, Op, A, X>;

// x, y: [clusters, N, elems]. workspace: clusters * workspace_bytes (global exchange only).
// timing[cluster]: ns from the first to the end of the last call, seen by block 0.
template <cf::ReduceAlgo A, cf::Exchange X>
__global__ void reduce_kernel(const elem_t* __restrict__ x, elem_t* __restrict__ y, int elems, int root, int repeats,
                              char* workspace, unsigned long long* timing) {
  extern __shared__ __align__(128) char smem[];
  using R = Reduce<A, X>;
  const uint32_t rank = cf::dsm::cluster_rank(), cluster = blockIdx.x / N;
  elem_t* tile = reinterpret_cast<elem_t*>(smem);
  const size_t offset = (size_t(cluster) * N + rank) * elems;
  for (int i = cf::dsm::block_thread(); i < elems; i += cf::dsm::block_threads()) tile[i] = x[offset + i];

  R red(smem + pt::tile_bytes(elems, sizeof(elem_t)), elems,
        workspace ? workspace + cluster * R::workspace_bytes(elems) : nullptr);
  red.init();  // its cluster barrier also lines the blocks up for the timer
  const uint64_t t0 = pt::global_timer_ns();
  for (int k = 0; k < repeats; ++k) {
    if (root < 0)
      red.all_reduce(tile, elems);
    else
      red.reduce_to_root(tile, elems, root);
  }
  cf::dsm::cluster_sync();  // every block done (and no DSM traffic left) before anyone exits
  const uint64_t t1 = pt::global_timer_ns();
  if (timing && rank == 0 && cf::dsm::block_thread() == 0) timing[cluster] = t1 - t0;
  for (int i = cf::dsm::block_thread(); i < elems; i += cf::dsm::block_threads()) y[offset + i] = tile[i];
}

template <cf::ReduceAlgo A, cf::Exchange X>
size_t smem_bytes(int elems) {
  return pt::tile_bytes(elems, sizeof(elem_t)) + Reduce<A, X>::scratch_bytes(elems);
}

template <cf::ReduceAlgo A, cf::Exchange X>
int launch(const void* x, void* y, int clusters, int elems, int root, int repeats, void* workspace,
           unsigned long long* timing, int threads, cudaStream_t stream) {
  const size_t smem = smem_bytes<A, X>(elems);
  if (smem > pt::kMaxSmem) return cudaErrorInvalidValue;
  if (X == cf::Exchange::kGlobal) {
    if (!workspace) return cudaErrorInvalidValue;
    // counters must start at zero in every launch (and the data need no clearing)
    if (cudaError_t e = cudaMemsetAsync(workspace, 0, size_t(clusters) * Reduce<A, X>::workspace_bytes(elems), stream))
      return e;
  }
  return cf::launch_cluster(reduce_kernel<A, X>, dim3(clusters * N), dim3(threads), N, smem, stream,
                            static_cast<const elem_t*>(x), static_cast<elem_t*>(y), elems, root, repeats,
                            static_cast<char*>(workspace), timing);
}

using LaunchFn = int (*)(const void*, void*, int, int, int, int, void*, unsigned long long*, int, cudaStream_t);

LaunchFn select(int algo, int exchange) {
  using RA = cf::ReduceAlgo;
  using EX = cf::Exchange;
  if (algo == 0) return exchange == 0 ? launch<RA::kTree, EX::kDsm> : launch<RA::kTree, EX::kGlobal>;
  return exchange == 0 ? launch<RA::kRing, EX::kDsm> : launch<RA::kRing, EX::kGlobal>;
}

}  // namespace

extern "C" {

// What this library was built for: [cluster size, dtype code, op code, record width].
void cf_cluster_reduce_spec(int* out) {
  out[0] = N;
  out[1] = CF_DTYPE;
  out[2] = CF_OP;
  out[3] = Op::kRecord;
}

// Bytes of global workspace one launch needs (0 for DSM exchange).
size_t cf_cluster_reduce_workspace_bytes(int clusters, int elems, int algo, int exchange) {
  if (exchange == 0) return 0;
  const size_t per = algo == 0 ? Reduce<cf::ReduceAlgo::kTree, cf::Exchange::kGlobal>::workspace_bytes(elems)
                               : Reduce<cf::ReduceAlgo::kRing, cf::Exchange::kGlobal>::workspace_bytes(elems);
  return size_t(clusters) * per;
}

// Dynamic shared memory per block (to check against the 227 KB limit before launching).
size_t cf_cluster_reduce_smem_bytes(int elems, int algo) {
  return algo == 0 ? smem_bytes<cf::ReduceAlgo::kTree, cf::Exchange::kDsm>(elems)
                   : smem_bytes<cf::ReduceAlgo::kRing, cf::Exchange::kDsm>(elems);
}

// x, y: [clusters, N, elems] device arrays of the library's dtype. algo 0 tree / 1 ring;
// exchange 0 DSM / 1 global; root -1 = all-reduce. timing: [clusters] u64 ns or NULL.
int cf_cluster_reduce(const void* x, void* y, int clusters, int elems, int algo, int exchange, int root, int repeats,
                      void* workspace, unsigned long long* timing, int threads, cudaStream_t stream) {
  if (clusters < 1 || elems < 1 || elems % Op::kRecord || repeats < 0 || root >= N || threads < 32 ||
      threads > 1024 || threads % 32 || algo < 0 || algo > 1 || exchange < 0 || exchange > 1)
    return cudaErrorInvalidValue;
  return select(algo, exchange)(x, y, clusters, elems, root, repeats, workspace, timing, threads, stream);
}

}  // extern "C"
