// Host-side launch helper shared by every kernel library: launch a kernel with thread-block
// cluster dimensions through cudaLaunchKernelEx, raising the attributes a cluster launch
// needs first (dynamic shared memory above 48 KB, non-portable cluster size 16).
//
//   extern "C" int cf_my_op(const float* x, float* y, int n, cudaStream_t stream) {
//     return clusterfuse::launch_cluster(my_kernel, dim3(blocks), dim3(256), /*cluster=*/4,
//                                        smem_bytes, stream, x, y, n);
//   }
//
// Every C entry point returns an int cudaError_t (0 = launched); Python's
// clusterfuse.ops.launch.check turns a nonzero code into a RuntimeError.
#pragma once

#include <cuda_runtime.h>

namespace clusterfuse {

// Set the function attributes a cluster launch of `kernel` needs. Cheap enough to call per
// launch (the runtime caches them), so launchers need not track "first call".
template <typename... KArgs>
cudaError_t prepare_cluster_kernel(void (*kernel)(KArgs...), int cluster_size, size_t smem_bytes) {
  if (smem_bytes > 48 * 1024) {
    if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem_bytes)))
      return e;
  }
  if (cluster_size > 8) {  // 16 is "non-portable": Hopper supports it, but only on request
    if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1)) return e;
  }
  return cudaSuccess;
}

// How many clusters of this shape can be resident at once (0 = cannot launch at all, e.g. too
// much shared memory for cluster size 16). Grids larger than this still run, in waves.
template <typename... KArgs>
cudaError_t max_active_clusters(void (*kernel)(KArgs...), dim3 block, int cluster_size, size_t smem_bytes,
                                int* out) {
  *out = 0;
  if (cudaError_t e = prepare_cluster_kernel(kernel, cluster_size, smem_bytes)) return e;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(cluster_size);
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem_bytes;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster_size;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaOccupancyMaxActiveClusters(out, kernel, &cfg);
}

// How a launch relates to the kernel before it in the stream.
struct LaunchOptions {
  // Programmatic dependent launch (clusterfuse/pdl.cuh): the kernel's blocks may start before the
  // previous kernel has finished; the kernel must call pdl::wait_prior_grid() before reading what
  // that kernel wrote.
  bool programmatic = false;
  // Cooperative launch: the driver starts the grid only with every block resident at once, or
  // refuses it (cudaErrorCooperativeLaunchTooLarge), where the occupancy API can only say what an
  // idle device would hold (another process under MPS, a kernel of another stream). For kernels
  // whose blocks meet at grid barriers; valid with clusters and in CUDA graphs.
  bool cooperative = false;
};

// Launch `kernel` over `grid` blocks (grid.x a multiple of cluster_size) in clusters of
// cluster_size along x, then return the launch error (cudaGetLastError), if any.
template <typename... KArgs, typename... Args>
cudaError_t launch_cluster_with(LaunchOptions opts, void (*kernel)(KArgs...), dim3 grid, dim3 block,
                                int cluster_size, size_t smem_bytes, cudaStream_t stream, Args&&... args) {
  if (cluster_size < 1 || grid.x % cluster_size != 0) return cudaErrorInvalidValue;
  if (cudaError_t e = prepare_cluster_kernel(kernel, cluster_size, smem_bytes)) return e;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem_bytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[3];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster_size;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.numAttrs = 1;
  if (opts.programmatic) {
    attr[cfg.numAttrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[cfg.numAttrs++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (opts.cooperative) {
    attr[cfg.numAttrs].id = cudaLaunchAttributeCooperative;
    attr[cfg.numAttrs++].val.cooperative = 1;
  }
  cfg.attrs = attr;
  if (cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...)) return e;
  return cudaGetLastError();
}

// launch_cluster_with default options: fully ordered after the previous kernel of the stream.
template <typename... KArgs, typename... Args>
cudaError_t launch_cluster(void (*kernel)(KArgs...), dim3 grid, dim3 block, int cluster_size, size_t smem_bytes,
                           cudaStream_t stream, Args&&... args) {
  return launch_cluster_with(LaunchOptions{}, kernel, grid, block, cluster_size, smem_bytes, stream,
                             static_cast<Args&&>(args)...);
}

// The plan of the largest grid, starting from `clusters` clusters of `cluster_size` blocks, whose
// clusters can all be resident at once (what a grid barrier needs): plan_for(nc, &plan) plans a
// grid of nc clusters (returns 0 or an error code; the plan's smem_bytes is its shared memory),
// and the grid shrinks to the clusters the GPU can hold until the plan fits. Returns 0 (and the
// plan in *out), plan_for's error, a cudaError_t, or not_resident when it never fits.
template <class Plan, class PlanFor, typename... KArgs>
int plan_resident_grid(void (*kernel)(KArgs...), dim3 block, int cluster_size, int clusters, int not_resident,
                       PlanFor&& plan_for, Plan* out) {
  for (int attempt = 0; attempt < 4; ++attempt) {
    Plan plan;
    if (int rc = plan_for(clusters, &plan)) return rc;
    int active = 0;
    if (cudaError_t e = max_active_clusters(kernel, block, cluster_size, plan.smem_bytes, &active)) return e;
    if (active < 1) return not_resident;
    if (active >= clusters) {
      *out = plan;
      return 0;
    }
    clusters = active;
  }
  return not_resident;
}

}  // namespace clusterfuse
