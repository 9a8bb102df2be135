// Distributed shared memory (DSM) plumbing for thread-block clusters (sm_90).
//
// Thin, typed wrappers over the PTX that moves data and signals between the blocks of a
// cluster. Each wrapper states its memory-ordering contract: who must call it, what it
// makes visible to whom. Higher-level collectives (cluster_reduce.cuh, cluster_gather.cuh)
// are built only from these.
//
// Address kinds:
//   * generic pointer (T*)            — what C++ code uses; mapa() turns one of ours into a
//                                       generic pointer into a peer's shared memory.
//   * shared::cta address (uint32_t)  — smem_addr(p): our own shared memory.
//   * shared::cluster address (u32)   — mapa_shared(addr, rank): a peer's shared memory,
//                                       what st.async, bulk copies and remote arrives take.
// Shared-memory layouts must be identical in every block of a cluster (same offsets), which
// holds whenever all blocks run the same kernel and carve dynamic shared memory the same way.
//
// Lifetime rule: a block must not exit while a peer may still access its shared memory
// (remote stores, bulk copies, remote arrives). End every kernel that uses DSM with
// cluster_sync() (or cluster_arrive() ... cluster_wait()).
#pragma once

#include <stdint.h>

namespace clusterfuse {
namespace dsm {

// ----------------------------------------------------------------------------- identity
__device__ __forceinline__ uint32_t cluster_rank() {  // %cluster_ctarank: 0..cluster_size()-1
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

__device__ __forceinline__ uint32_t cluster_size() {  // %cluster_nctarank
  uint32_t n;
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
  return n;
}

__device__ __forceinline__ uint32_t cluster_id_x() {  // which cluster of the grid (x)
  uint32_t c;
  asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(c));
  return c;
}

// Linear thread index and count of the block (collectives accept any block shape).
__device__ __forceinline__ int block_thread() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
__device__ __forceinline__ int block_threads() { return blockDim.x * blockDim.y * blockDim.z; }

// ----------------------------------------------------------------------------- addresses
// shared::cta address of a pointer into our own shared memory.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Generic pointer to the same offset in block `rank`'s shared memory. Plain loads/stores
// through it are ordinary (weak) accesses: order them with a cluster barrier or an mbarrier.
template <typename T>
__device__ __forceinline__ T* mapa(T* p, uint32_t rank) {
  uint64_t out;
  asm volatile("mapa.u64 %0, %1, %2;" : "=l"(out) : "l"(reinterpret_cast<uint64_t>(p)), "r"(rank));
  return reinterpret_cast<T*>(out);
}

// shared::cluster address of our shared::cta address `addr` as seen in block `rank`.
__device__ __forceinline__ uint32_t mapa_shared(uint32_t addr, uint32_t rank) {
  uint32_t out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(out) : "r"(addr), "r"(rank));
  return out;
}

// ----------------------------------------------------------------------------- mbarrier
// An mbarrier is a uint64_t in shared memory. Each phase completes when its pending arrival
// count reaches zero and its transaction count (bytes announced with expect_tx, retired by
// complete_tx from st.async / bulk copies) is zero; then the next phase starts. Waiters
// name the phase by its parity (0, 1, 0, ...): callers track the phase count themselves.

// Initialise with `count` arrivals per phase. One thread; then fence_mbarrier_init() and a
// cluster barrier before any peer touches it, a __syncthreads before local use.
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

// Invalidate a barrier no one uses any more (its phases complete, nothing in flight to it), so that
// its memory may serve another purpose or a new mbarrier.init (PTX: mbarrier.inval before reuse).
// One thread.
__device__ __forceinline__ void mbar_inval(uint64_t* bar) {
  asm volatile("mbarrier.inval.shared::cta.b64 [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Makes prior mbarrier.init visible to the async proxy and to the cluster (release, cluster
// scope). Call by the initialising thread, before the cluster barrier that publishes them.
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// Arrive on our own barrier. Release at CTA scope: our prior writes are visible to threads
// of this block that then complete a wait on this phase.
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Arrive on block `rank`'s barrier at the same offset as `bar`. Release at cluster scope:
// whatever this thread wrote or read before (and, through a preceding __syncthreads, what
// its block did) happens before the peer's completed wait on that phase. Used to hand back
// a buffer ("credit"): our reads of it finish before the peer overwrites it.
__device__ __forceinline__ void mbar_arrive_remote(uint64_t* bar, uint32_t rank) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(
                   mapa_shared(smem_addr(bar), rank))
               : "memory");
}

// Arrive and announce `bytes` more bytes of transactions for the current phase (one thread,
// typically the consumer arming its own barrier). Data may land (complete_tx) before this
// runs: the transaction count goes transiently negative and the phase cannot complete
// while our arrival is still pending, so arming late is safe.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}

// Announce bytes without arriving (when the arrival comes from elsewhere).
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

// True once the phase with parity `parity` has completed. Acquire at cluster scope: data
// delivered by peers' st.async / bulk copies / writes released by their remote arrives are
// visible to this thread afterwards. Note the parity trick: on a barrier whose current
// phase has parity p, waiting for parity p^1 returns at once ("the previous phase is done"),
// which is how a producer treats initially-empty buffers.
__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n .reg .pred p;\n"
      " mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
      " selp.u32 %0, 1, 0, p;\n}"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

// Block until the phase with parity `parity` completes (any number of threads may wait).
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}

// ----------------------------------------------------------------------------- data movement
// Order this thread's prior generic-proxy writes to shared memory before later async-proxy
// reads of it (a bulk copy issued after a __syncthreads). Every writing thread calls it.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Bulk copy `bytes` (multiple of 16, both addresses 16-byte aligned) from our shared memory
// `src` to the same-layout buffer `dst` in block `rank`, retiring `bytes` transactions on
// block `rank`'s barrier `bar` (same offset as our `bar`). One thread issues it. Asynchronous:
// `src` must stay unchanged until the receiver's phase completes (learn that from a credit).
// If `src` was written with ordinary stores, fence_proxy_async_shared() + __syncthreads first.
__device__ __forceinline__ void bulk_copy_to_peer(void* dst, const void* src, uint32_t bytes, uint64_t* bar,
                                                  uint32_t rank) {
  asm volatile(
      "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          mapa_shared(smem_addr(dst), rank)),
      "r"(smem_addr(src)), "r"(bytes), "r"(mapa_shared(smem_addr(bar), rank))
      : "memory");
}

// Store 16 bytes from registers into a peer's shared memory: `dst` and `bar` are
// shared::cluster addresses (mapa_shared) in the same block, `dst` 16-byte aligned; retires
// 16 transactions on `bar`. Weak store; the complete_tx has release semantics at cluster
// scope, so a receiver whose wait on that phase completes sees the data. Fire-and-forget:
// unlike a bulk copy there is no source buffer to keep intact.
__device__ __forceinline__ void st_async_v4(uint32_t dst, float4 v, uint32_t bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];" ::"r"(dst),
               "r"(__float_as_uint(v.x)), "r"(__float_as_uint(v.y)), "r"(__float_as_uint(v.z)),
               "r"(__float_as_uint(v.w)), "r"(bar)
               : "memory");
}

// 8-byte variant (retires 8 transactions).
__device__ __forceinline__ void st_async_v2(uint32_t dst, uint2 v, uint32_t bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.b32 [%0], {%1, %2}, [%3];" ::"r"(dst),
               "r"(v.x), "r"(v.y), "r"(bar)
               : "memory");
}

// 4-byte variant (retires 4 transactions), for payloads that are not a multiple of 16 bytes.
__device__ __forceinline__ void st_async_b32(uint32_t dst, uint32_t v, uint32_t bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];" ::"r"(dst), "r"(v),
               "r"(bar)
               : "memory");
}

// ----------------------------------------------------------------------------- cluster barrier
// Split cluster barrier: every thread of every block arrives, then waits. arrive.release makes
// this thread's prior memory accesses visible to all threads of the cluster that complete
// the matching wait.acquire. Independent work can go between the two halves.
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// Arrive without ordering memory: only for "I am still alive / have started" handshakes.
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}

// ----------------------------------------------------------------------------- global flags
// For the "same dataflow through global memory" ablation: a producer publishes with a
// release store, a consumer polls with acquire loads (GPU scope: the peer is another SM).
__device__ __forceinline__ void st_release_gpu(uint32_t* p, uint32_t v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ uint32_t ld_acquire_gpu(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
// Spin until *p >= target (counters only grow within a launch).
__device__ __forceinline__ void wait_counter_at_least(const uint32_t* p, uint32_t target) {
  while (static_cast<int32_t>(ld_acquire_gpu(p) - target) < 0) {
  }
}

}  // namespace dsm
}  // namespace clusterfuse
