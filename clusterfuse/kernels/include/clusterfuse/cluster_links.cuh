// Point-to-point message links between the blocks of a cluster, with flow control; the
// transport under ClusterReduce. Two implementations with one interface:
//   DsmLinks<...>    — st.async into the receiver's shared memory, mbarriers for "full"
//                      (data landed) and "empty" (receiver handed the slot back: a credit).
//   GlobalLinks<...> — the same messages through a global workspace, counters for both.
//
// A link index names a *pair* of directions: message i on link L from block A to block B
// lands in B's inbox for link L, slot i % kStages. Each side counts messages per link and
// direction (send_seq / recv_seq); the counts on the two ends of a direction always agree,
// so slot and mbarrier phase follow from the count alone — no per-call cluster barrier.
//
// Flow control: a sender waits for the receiver's credit for a slot before reusing it, so
// any number of back-to-back collectives (and roots that change between calls) are safe.
// Every message carries >= 16 bytes (empty payloads send one zero vector): a phase that
// could complete with no data would let a receiver run two phases ahead of its sender.
//
// All members are called by every thread of the block (block-collective) unless noted.
#pragma once

#include "clusterfuse/cluster_common.cuh"
#include "clusterfuse/dsm.cuh"

namespace clusterfuse {
namespace detail {

// Sizes shared by both transports: kLinks links, kStages slots each, slot_floats per slot.
template <int kLinks, int kStages>
struct LinkLayout {
  static constexpr int kLinksAlloc = kLinks > 0 ? kLinks : 1;
  // shared memory: mbarriers full[links][stages], empty[links][stages], then the inbox slots.
  __host__ __device__ static constexpr size_t barrier_bytes() {
    return align_up(2 * kLinksAlloc * kStages * sizeof(uint64_t), 16);
  }
  __host__ __device__ static constexpr size_t smem_bytes(int slot_floats) {
    return barrier_bytes() + size_t(kLinksAlloc) * kStages * slot_floats * sizeof(float);
  }
};

template <int N, int kLinks, int kStages>
class DsmLinks {
 public:
  using Layout = LinkLayout<kLinks, kStages>;
  struct Dest {  // where a message to a peer goes, as shared::cluster addresses
    uint32_t data, bar;
  };

  __device__ DsmLinks(void* smem, int slot_floats, void* /*workspace*/) : slot_floats_(slot_floats) {
    bars_ = static_cast<uint64_t*>(smem);
    slots_ = reinterpret_cast<float*>(static_cast<char*>(smem) + Layout::barrier_bytes());
#pragma unroll
    for (int l = 0; l < Layout::kLinksAlloc; ++l) send_seq_[l] = recv_seq_[l] = 0;
  }

  // Thread 0 initialises the barriers; the caller must then cluster_sync() before any use.
  __device__ void init_local() {
    if (dsm::block_thread() == 0) {
      for (int i = 0; i < 2 * Layout::kLinksAlloc * kStages; ++i) dsm::mbar_init(bars_ + i, 1);
      dsm::fence_mbarrier_init();
    }
  }

  __device__ float* inbox(int link) const { return slot(link, recv_seq_[link] % kStages); }

  // Wait for the peer's credit for the next slot on `link` (initially free: parity trick).
  __device__ Dest begin_send(int link, uint32_t peer) {
    const uint32_t s = send_seq_[link] % kStages, use = send_seq_[link] / kStages;
    dsm::mbar_wait(empty(link, s), (use & 1) ^ 1);
    return {dsm::mapa_shared(dsm::smem_addr(slot(link, s)), peer), dsm::mapa_shared(dsm::smem_addr(full(link, s)), peer)};
  }
  // One 16-byte vector of the message (any thread, each vector exactly once).
  __device__ __forceinline__ void put(const Dest& d, int vec, float4 v) const {
    dsm::st_async_v4(d.data + 16u * vec, v, d.bar);
  }
  __device__ void end_send(int link, uint32_t /*peer*/) { ++send_seq_[link]; }

  // Wait until the next message on `link` (vecs 16-byte vectors) is in inbox(link).
  __device__ void recv(int link, int vecs) {
    const uint32_t s = recv_seq_[link] % kStages, use = recv_seq_[link] / kStages;
    if (dsm::block_thread() == 0) dsm::mbar_arrive_expect_tx(full(link, s), 16u * vecs);
    dsm::mbar_wait(full(link, s), use & 1);
  }
  // The block has finished reading inbox(link) (caller did __syncthreads): credit the sender.
  __device__ void done(int link, uint32_t from) {
    if (dsm::block_thread() == 0) dsm::mbar_arrive_remote(empty(link, recv_seq_[link] % kStages), from);
    ++recv_seq_[link];
  }

 private:
  __device__ float* slot(int link, uint32_t s) const { return slots_ + (size_t(link) * kStages + s) * slot_floats_; }
  __device__ uint64_t* full(int link, uint32_t s) const { return bars_ + link * kStages + s; }
  __device__ uint64_t* empty(int link, uint32_t s) const {
    return bars_ + (Layout::kLinksAlloc + link) * kStages + s;
  }

  uint64_t* bars_;
  float* slots_;
  int slot_floats_;
  uint32_t send_seq_[Layout::kLinksAlloc], recv_seq_[Layout::kLinksAlloc];
};

// Global-memory transport. Workspace (per cluster): counters posted[N][links] and
// consumed[N][links] (zero at launch), then data[N][links][stages][slot_floats]. A received
// message is copied into the same shared-memory inbox the DSM transport uses, so the
// algorithms read it identically; L2-only loads/stores (.cg) keep stale L1 lines out.
template <int N, int kLinks, int kStages>
class GlobalLinks {
 public:
  using Layout = LinkLayout<kLinks, kStages>;
  struct Dest {
    float* data;
  };

  __host__ __device__ static constexpr size_t counter_bytes() {
    return align_up(2 * N * Layout::kLinksAlloc * sizeof(uint32_t), 128);
  }
  __host__ __device__ static constexpr size_t workspace_bytes(int slot_floats) {
    return counter_bytes() + size_t(N) * Layout::kLinksAlloc * kStages * slot_floats * sizeof(float);
  }

  __device__ GlobalLinks(void* smem, int slot_floats, void* workspace) : slot_floats_(slot_floats) {
    slots_ = reinterpret_cast<float*>(static_cast<char*>(smem) + Layout::barrier_bytes());
    counters_ = static_cast<uint32_t*>(workspace);
    data_ = reinterpret_cast<float*>(static_cast<char*>(workspace) + counter_bytes());
    me_ = dsm::cluster_rank();
#pragma unroll
    for (int l = 0; l < Layout::kLinksAlloc; ++l) send_seq_[l] = recv_seq_[l] = 0;
  }
  __device__ void init_local() {}

  __device__ float* inbox(int link) const {
    return slots_ + (size_t(link) * kStages + recv_seq_[link] % kStages) * slot_floats_;
  }

  __device__ Dest begin_send(int link, uint32_t peer) {
    const uint32_t seq = send_seq_[link];
    if (dsm::block_thread() == 0 && seq >= kStages)
      dsm::wait_counter_at_least(consumed(peer, link), seq - kStages + 1);
    __syncthreads();
    return {data(peer, link, seq % kStages)};
  }
  __device__ __forceinline__ void put(const Dest& d, int vec, float4 v) const {
    __stcg(reinterpret_cast<float4*>(d.data) + vec, v);
  }
  // Publish: the barrier gathers every thread's stores; thread 0's release store (cumulative)
  // then makes them visible to the peer's acquire.
  __device__ void end_send(int link, uint32_t peer) {
    __syncthreads();
    if (dsm::block_thread() == 0) dsm::st_release_gpu(posted(peer, link), send_seq_[link] + 1);
    ++send_seq_[link];
  }

  __device__ void recv(int link, int vecs) {
    const uint32_t seq = recv_seq_[link];
    if (dsm::block_thread() == 0) dsm::wait_counter_at_least(posted(me_, link), seq + 1);
    __syncthreads();
    const float4* src = reinterpret_cast<const float4*>(data(me_, link, seq % kStages));
    float4* dst = reinterpret_cast<float4*>(inbox(link));
    for (int v = dsm::block_thread(); v < vecs; v += dsm::block_threads()) dst[v] = __ldcg(src + v);
    __syncthreads();
    // The global slot is free as soon as it is copied out: credit the sender now.
    if (dsm::block_thread() == 0) dsm::st_release_gpu(consumed(me_, link), seq + 1);
  }
  __device__ void done(int link, uint32_t /*from*/) { ++recv_seq_[link]; }

 private:
  __device__ uint32_t* posted(uint32_t block, int link) const { return counters_ + block * Layout::kLinksAlloc + link; }
  __device__ uint32_t* consumed(uint32_t block, int link) const {
    return counters_ + (N + block) * Layout::kLinksAlloc + link;
  }
  __device__ float* data(uint32_t block, int link, uint32_t s) const {
    return data_ + ((size_t(block) * Layout::kLinksAlloc + link) * kStages + s) * slot_floats_;
  }

  float* slots_;
  uint32_t* counters_;
  float* data_;
  uint32_t me_;
  int slot_floats_;
  uint32_t send_seq_[Layout::kLinksAlloc], recv_seq_[Layout::kLinksAlloc];
};

template <Exchange X, int N, int kLinks, int kStages>
struct LinksFor {
  using type = DsmLinks<N, kLinks, kStages>;
};
template <int N, int kLinks, int kStages>
struct LinksFor<Exchange::kGlobal, N, kLinks, kStages> {
  using type = GlobalLinks<N, kLinks, kStages>;
};

}  // namespace detail
}  // namespace clusterfuse
