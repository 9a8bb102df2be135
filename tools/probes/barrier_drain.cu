// Probe: does a barrier wait for the global reads its block still has in flight?
//
// The attention block spends ~14 µs per layer in phases that stream nothing from HBM (the q,k,v
// exchange, the merge of the attention states, the grid barrier), each ending in a barrier. Reads
// issued before such a barrier (the next phase's weights or keys) would keep HBM busy through it,
// but only if the barrier does not wait for them: an L2 bulk prefetch of W_o issued before the
// exchange made that phase longer by about the prefetch's HBM time (bench/results/
// l2_prefetch_h100.md), which suggests it does, at least for that kind of read. This kernel
// measures it for each kind of read and each barrier, under a realistic load: every block of a
// grid the size of the attention block's (e.g. 32 clusters of 4, 128 threads) issues `kb` KB of
// reads of its own HBM region, then passes the barrier, then consumes the reads:
//   t_issue   issuing the reads
//   t_barrier the barrier (what the question is about)
//   t_consume waiting for the reads after the barrier
// If the barrier waits for the reads, t_barrier carries their HBM time and t_consume is ~0; if not,
// t_barrier stays at the no-read value and t_consume carries it.
//
// Kinds of read (mode): 0 none; 1 16-byte loads into registers (ld.global.nc, as gemv.cuh's
// weight pipeline), 16 per thread at most (32 KB per 128-thread block); 2 L2 bulk prefetches
// (cp.async.bulk.prefetch.L2, 4 KB each); 3 bulk copies into this block's shared memory
// (cp.async.bulk ... mbarrier::complete_tx, 4 KB each, as the weight ring's TMA tiles).
// Barriers: 0 barrier.cluster.arrive (release) + wait; 1 barrier.cluster.arrive.relaxed + wait;
// 2 __syncthreads; 3 a fence.acq_rel.gpu (what a grid barrier's arrival does) + __syncthreads;
// 4 an exchange by st.async: each block stores 16 bytes into every peer's shared memory,
// retiring them on the peer's mbarrier, and waits on its own (no release fence: ptxas makes a
// cluster-scope release a MEMBAR.ALL.GPU, the mbarrier's expect_tx at CTA scope no MEMBAR).
#include <cuda_runtime.h>
#include <stdint.h>

#include "clusterfuse/dsm.cuh"
#include "clusterfuse/gemv.cuh"
#include "clusterfuse/launch.cuh"

namespace {

namespace dsm = clusterfuse::dsm;

constexpr int kThreads = 128;
constexpr int kMaxRegLoads = 16;  // uint4 per thread: 32 KB per block
constexpr int kChunk = 4096;      // bytes per bulk prefetch / copy
constexpr int kRounds = 8;        // rounds per launch, each on fresh memory
constexpr int kSlots = 3 * kRounds + 4;  // per block: 3 intervals per round, then c0, c1, g0, g1

enum Mode : int { kNone = 0, kRegisters = 1, kL2Prefetch = 2, kBulkToSmem = 3 };
enum Barrier : int { kClusterRelease = 0, kClusterRelaxed = 1, kBlock = 2, kFenceGpu = 3, kStAsync = 4 };

__device__ __forceinline__ unsigned long long ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Uses a load's registers in an asm volatile statement: the compiler keeps it after the barrier
// (also asm volatile), so the thread waits for the load there, not before the barrier.
__device__ __forceinline__ unsigned int consume(unsigned int acc, uint4 v) {
  asm volatile("xor.b32 %0, %0, %1;\n\txor.b32 %0, %0, %2;\n\txor.b32 %0, %0, %3;\n\txor.b32 %0, %0, %4;"
               : "+r"(acc)
               : "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
  return acc;
}

__device__ __forceinline__ void bulk_to_smem(uint32_t dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(dsm::smem_addr(bar))
      : "memory");
}

__global__ void __launch_bounds__(kThreads) barrier_drain_kernel(const unsigned char* buf, size_t region_bytes,
                                                                 size_t buf_bytes, int mode, int barrier, int kb,
                                                                 unsigned long long* rec, unsigned int* sink) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ uint64_t bar, xbar;  // the bulk copies', the st.async exchange's
  __shared__ float4 xslot[16];     // the exchange's payload, one slot per sender
  const int t = threadIdx.x;
  const uint32_t C = dsm::cluster_size(), rank = dsm::cluster_rank();
  const int bytes = kb * 1024;
  unsigned long long* r = rec + (size_t)blockIdx.x * kSlots;
  if (t == 0) {
    dsm::mbar_init(&bar, 1);
    dsm::mbar_init(&xbar, 1);
    dsm::fence_mbarrier_init();
    r[3 * kRounds + 0] = clock64();
    r[3 * kRounds + 2] = ns();
  }
  dsm::cluster_sync();  // the peers' mbarriers are initialised
  unsigned int acc = 0;
  for (int round = 0; round < kRounds; ++round) {
    // A region no block has read in this launch (the buffer is several times the L2).
    const size_t off = ((size_t)(round * gridDim.x + blockIdx.x) * region_bytes) % buf_bytes;
    const unsigned char* src = buf + off;
    const unsigned long long c0 = clock64();
    uint4 v[kMaxRegLoads];
    const int nreg = mode == kRegisters ? bytes / (kThreads * 16) : 0;
    if (mode == kRegisters) {
#pragma unroll
      for (int i = 0; i < kMaxRegLoads; ++i)
        if (i < nreg) v[i] = clusterfuse::gemv::ld_stream(src + ((size_t)i * kThreads + t) * 16);
    } else if (mode == kL2Prefetch) {
      for (int c = t; c < bytes / kChunk; c += kThreads) clusterfuse::gemv::prefetch_l2(src + (size_t)c * kChunk, kChunk);
    } else if (mode == kBulkToSmem && t == 0) {
      dsm::mbar_arrive_expect_tx(&bar, bytes);
      for (int c = 0; c < bytes / kChunk; ++c)
        bulk_to_smem(dsm::smem_addr(smem + c * kChunk), src + (size_t)c * kChunk, kChunk, &bar);
    }
    const unsigned long long c1 = clock64();
    if (barrier == kClusterRelease) {
      dsm::cluster_arrive();
      dsm::cluster_wait();
    } else if (barrier == kClusterRelaxed) {
      dsm::cluster_arrive_relaxed();
      dsm::cluster_wait();
    } else if (barrier == kFenceGpu) {
      asm volatile("fence.acq_rel.gpu;" ::: "memory");
      __syncthreads();
    } else if (barrier == kStAsync) {
      if (t == 0) {
        dsm::mbar_arrive_expect_tx(&xbar, (C - 1) * 16);
        for (uint32_t q = 1; q < C; ++q) {
          const uint32_t peer = (rank + q) % C;
          dsm::st_async_v4(dsm::mapa_shared(dsm::smem_addr(&xslot[rank]), peer), make_float4(1.f, 2.f, 3.f, 4.f),
                           dsm::mapa_shared(dsm::smem_addr(&xbar), peer));
        }
      }
      dsm::mbar_wait(&xbar, round & 1);
    } else {
      __syncthreads();
    }
    const unsigned long long c2 = clock64();
    if (mode == kRegisters) {
#pragma unroll
      for (int i = 0; i < kMaxRegLoads; ++i)
        if (i < nreg) acc = consume(acc, v[i]);
    } else if (mode == kBulkToSmem) {
      dsm::mbar_wait(&bar, round & 1);
      acc ^= reinterpret_cast<const unsigned int*>(smem)[t];
    }
    __syncthreads();  // the block's reads are all in (thread 0 stamps for the block)
    const unsigned long long c3 = clock64();
    if (t == 0) r[3 * round] = c1 - c0, r[3 * round + 1] = c2 - c1, r[3 * round + 2] = c3 - c2;
    // Rounds apart: nobody issues the next round's reads while a peer still waits at this barrier.
    dsm::cluster_sync();
  }
  if (t == 0) {
    r[3 * kRounds + 1] = clock64();
    r[3 * kRounds + 3] = ns();
  }
  if (acc == 0x9e3779b9u) *sink = acc;  // keeps the loads; practically never taken
}

}  // namespace

extern "C" {

// Slots per block of `records` (unsigned long long): per round the issue, barrier and consume
// intervals in SM cycles, then clock64 and globaltimer at the launch's start and end (the clock
// rate, per block). Grid: clusters x cluster_size blocks of 128 threads.
int cf_barrier_drain_slots() { return kSlots; }
int cf_barrier_drain_rounds() { return kRounds; }

int cf_barrier_drain(const void* buf, size_t buf_bytes, int mode, int barrier, int kb, int clusters, int cluster_size,
                     unsigned long long* records, unsigned int* sink, cudaStream_t stream) {
  if (mode < kNone || mode > kBulkToSmem || barrier < kClusterRelease || barrier > kStAsync || kb < 0 ||
      kb % 4 || (mode == kRegisters && kb * 1024 > kThreads * 16 * kMaxRegLoads) || kb > 192 || clusters < 1 ||
      cluster_size < 1 || cluster_size > 16)
    return cudaErrorInvalidValue;
  const size_t region = 256 * 1024;  // per block and round
  if (buf_bytes < region * 2) return cudaErrorInvalidValue;
  const size_t smem = mode == kBulkToSmem ? (size_t)kb * 1024 : 0;
  return clusterfuse::launch_cluster(barrier_drain_kernel, dim3(clusters * cluster_size), dim3(kThreads),
                                     cluster_size, smem, stream, static_cast<const unsigned char*>(buf), region,
                                     buf_bytes, mode, barrier, kb, records, sink);
}

}  // extern "C"
