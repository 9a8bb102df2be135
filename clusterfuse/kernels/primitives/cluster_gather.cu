// Test and benchmark kernel for ClusterGather. Each block loads its tile, then gathers
// `repeats` times; between calls every block replaces its tile with the tile it received
// from block rank+1, so call k gathers the inputs rotated by k. A stale buffer or a phase
// error therefore shows up as wrong data, not only as a hang. The last call's N rows are
// written out: y[cluster, rank, p, :] = x[cluster, (p + repeats - 1) % N, :].
//
//   CF_CLUSTER        cluster size N (1, 2, 4, 8, 16)
//   CF_DTYPE          0 fp32, 1 bf16, 2 fp16
//   CF_GATHER_STAGES  output buffers rotated between calls (1 or 2)
#include <cuda_runtime.h>

#include "clusterfuse/cluster.cuh"
#include "primitive_test_common.cuh"

#ifndef CF_CLUSTER
#define CF_CLUSTER 4
#endif
#ifndef CF_GATHER_STAGES
#define CF_GATHER_STAGES 2
#endif

namespace cf = clusterfuse;
namespace pt = clusterfuse::primitives_test;

namespace {

constexpr int N = CF_CLUSTER;

template <cf::Exchange X>
using Gather = cf::ClusterGather<N, elem_t, X, CF_GATHER_STAGES>;

template <cf::Exchange X>
__global__ void gather_kernel(const elem_t* __restrict__ x, elem_t* __restrict__ y, int elems, int repeats,
                              char* workspace, unsigned long long* timing) {
  extern __shared__ __align__(128) char smem[];
  using G = Gather<X>;
  const uint32_t rank = cf::dsm::cluster_rank(), cluster = blockIdx.x / N;
  const int tid = cf::dsm::block_thread(), nthr = cf::dsm::block_threads();
  elem_t* tile = reinterpret_cast<elem_t*>(smem);
  for (int i = tid; i < elems; i += nthr) tile[i] = x[(size_t(cluster) * N + rank) * elems + i];

  G gather(smem + pt::tile_bytes(elems, sizeof(elem_t)), elems,
           workspace ? workspace + cluster * G::workspace_bytes(elems) : nullptr);
  gather.init();
  const int stride = G::stride(elems);
  const elem_t* all = nullptr;
  const uint64_t t0 = pt::global_timer_ns();
  for (int k = 0; k < repeats; ++k) {
    all = gather.all_gather(tile, elems);
    if (k + 1 < repeats) {  // rotate: take the next block's tile (the gather output stays valid)
      const elem_t* next = all + size_t((rank + 1) % N) * stride;
      for (int i = tid; i < elems; i += nthr) tile[i] = next[i];
    }
  }
  cf::dsm::cluster_sync();
  const uint64_t t1 = pt::global_timer_ns();
  if (timing && rank == 0 && tid == 0) timing[cluster] = t1 - t0;
  if (all)
    for (int p = 0; p < N; ++p)
      for (int i = tid; i < elems; i += nthr)
        y[((size_t(cluster) * N + rank) * N + p) * elems + i] = all[size_t(p) * stride + i];
}

template <cf::Exchange X>
size_t smem_bytes(int elems) {
  return pt::tile_bytes(elems, sizeof(elem_t)) + Gather<X>::scratch_bytes(elems);
}

template <cf::Exchange X>
int launch(const void* x, void* y, int clusters, int elems, int repeats, void* workspace, unsigned long long* timing,
           int threads, cudaStream_t stream) {
  const size_t smem = smem_bytes<X>(elems);
  if (smem > pt::kMaxSmem) return cudaErrorInvalidValue;
  if (X == cf::Exchange::kGlobal) {
    if (!workspace) return cudaErrorInvalidValue;
    if (cudaError_t e = cudaMemsetAsync(workspace, 0, size_t(clusters) * Gather<X>::workspace_bytes(elems), stream))
      return e;
  }
  return cf::launch_cluster(gather_kernel<X>, dim3(clusters * N), dim3(threads), N, smem, stream,
                            static_cast<const elem_t*>(x), static_cast<elem_t*>(y), elems, repeats,
                            static_cast<char*>(workspace), timing);
}

}  // namespace

extern "C" {

// [cluster size, dtype code, output stages]
void cf_cluster_gather_spec(int* out) {
  out[0] = N;
  out[1] = CF_DTYPE;
  out[2] = CF_GATHER_STAGES;
}

size_t cf_cluster_gather_workspace_bytes(int clusters, int elems, int exchange) {
  return exchange == 0 ? 0 : size_t(clusters) * Gather<cf::Exchange::kGlobal>::workspace_bytes(elems);
}

size_t cf_cluster_gather_smem_bytes(int elems) { return smem_bytes<cf::Exchange::kDsm>(elems); }

// x: [clusters, N, elems]; y: [clusters, N, N, elems]; exchange 0 DSM / 1 global.
int cf_cluster_gather(const void* x, void* y, int clusters, int elems, int exchange, int repeats, void* workspace,
                      unsigned long long* timing, int threads, cudaStream_t stream) {
  if (clusters < 1 || elems < 1 || repeats < 0 || threads < 32 || threads > 1024 || threads % 32 || exchange < 0 ||
      exchange > 1)
    return cudaErrorInvalidValue;
  return exchange == 0 ? launch<cf::Exchange::kDsm>(x, y, clusters, elems, repeats, workspace, timing, threads, stream)
                       : launch<cf::Exchange::kGlobal>(x, y, clusters, elems, repeats, workspace, timing, threads,
                                                       stream);
}

}  // extern "C"
