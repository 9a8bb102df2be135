// ClusterGather<N, T, Exchange, Stages>: all-gather of per-block shared-memory tiles, so
// that every block of the cluster holds all N tiles. Block-collective.
//
//   using Gather = clusterfuse::ClusterGather<4, float>;
//   Gather g(smem_scratch, max_elems);  // Gather::scratch_bytes(max_elems), same offset everywhere
//   g.init();                           // all threads of all blocks (has a cluster barrier)
//   const float* all = g.all_gather(my_tile, elems);
//   float x = all[peer * Gather::stride(elems) + j];   // tile of block `peer`, element j
//   ...
//   clusterfuse::dsm::cluster_sync();   // before exit
//
// Contract
//   * Called by all threads of every block with the same elems; my_tile in shared memory.
//   * The result lives in the object's scratch: rows of stride(elems) elements (16-byte
//     multiples), own row included. It stays valid until the next all_gather call; my_tile
//     may be overwritten as soon as the call returns.
//   * DSM: the own tile is copied into our row, then one thread bulk-copies that row into
//     every peer (cp.async.bulk shared::cta -> shared::cluster, complete_tx on the peer's
//     mbarrier). Output buffers rotate through kStages; a block hands its previous output
//     back to the peers (remote mbarrier arrive) when it enters the next call, so back-to-back
//     calls need no cluster barrier.
//   * Scratch is kStages * N * stride(elems) * sizeof(T): large tiles at N = 16 need kStages = 1.
#pragma once

#include "clusterfuse/cluster_common.cuh"
#include "clusterfuse/dsm.cuh"

namespace clusterfuse {

template <int N, typename T, Exchange X = Exchange::kDsm, int kStages = 2>
class ClusterGather {
  static_assert(detail::is_cluster_size(N), "cluster size must be 1, 2, 4, 8 or 16");
  static_assert(kStages >= 1, "at least one output buffer");

 public:
  // Row stride in elements: the tile padded to a multiple of 16 bytes (bulk-copy granularity).
  __host__ __device__ static constexpr int stride(int elems) {
    return int(detail::align_up(size_t(elems) * sizeof(T), 16) / sizeof(T));
  }
  __host__ __device__ static constexpr size_t scratch_bytes(int max_elems) {
    return kBarrierBytes + size_t(kStages) * N * stride(max_elems) * sizeof(T);
  }
  // Exchange::kGlobal: counters posted[N], consumed[N] (zero at launch), then rows[stages][N].
  __host__ __device__ static constexpr size_t workspace_bytes(int max_elems) {
    if constexpr (X == Exchange::kGlobal) return kCounterBytes + size_t(kStages) * N * stride(max_elems) * sizeof(T);
    return 0;
  }

  __device__ ClusterGather(void* scratch, int max_elems, void* workspace = nullptr)
      : bars_(static_cast<uint64_t*>(scratch)),
        out_(reinterpret_cast<T*>(static_cast<char*>(scratch) + kBarrierBytes)),
        stage_elems_(size_t(N) * stride(max_elems)),
        counters_(static_cast<uint32_t*>(workspace)),
        ws_rows_(reinterpret_cast<T*>(static_cast<char*>(workspace) + kCounterBytes)),
        me_(dsm::cluster_rank()) {}

  __device__ void init() {
    init_local();
    dsm::cluster_sync();
  }
  __device__ void init_local() {
    if (X == Exchange::kDsm && dsm::block_thread() == 0) {
      for (int s = 0; s < kStages; ++s) {
        dsm::mbar_init(full(s), 1);       // our own arming arrival + the peers' bytes
        dsm::mbar_init(empty(s), N - 1);  // one credit from each peer
      }
      dsm::fence_mbarrier_init();
    }
  }

  __device__ const T* all_gather(const T* tile, int elems) {
    const uint32_t s = call_ % kStages, use = call_ / kStages;
    T* out = out_ + s * stage_elems_;
    const int row = stride(elems);
    __syncthreads();  // our reads of the previous output and the writes of `tile` are done
    if constexpr (X == Exchange::kDsm)
      gather_dsm(tile, elems, out, row, s, use);
    else
      gather_global(tile, elems, out, row, s);
    ++call_;
    return out;
  }

 private:
  static constexpr size_t kBarrierBytes = detail::align_up(2 * kStages * sizeof(uint64_t), 16);
  static constexpr size_t kCounterBytes = detail::align_up(2 * N * sizeof(uint32_t), 128);

  __device__ uint64_t* full(uint32_t s) const { return bars_ + s; }
  __device__ uint64_t* empty(uint32_t s) const { return bars_ + kStages + s; }

  __device__ void copy_row(T* dst, const T* src, int elems) const {
    for (int i = dsm::block_thread(); i < elems; i += dsm::block_threads()) dst[i] = src[i];
  }

  __device__ void gather_dsm(const T* tile, int elems, T* out, int row, uint32_t s, uint32_t use) {
    if constexpr (N > 1) {
      // Credit: peers may overwrite the buffer of our previous call (its readers are done).
      if (call_ > 0 && dsm::block_thread() == 0)
        for (uint32_t p = 0; p < N; ++p)
          if (p != me_) dsm::mbar_arrive_remote(empty((call_ - 1) % kStages), p);
      // Every peer has handed buffer s back (and so has received our last copy out of it).
      dsm::mbar_wait(empty(s), (use & 1) ^ 1);
    }
    T* mine = out + size_t(me_) * row;
    copy_row(mine, tile, elems);
    if constexpr (N > 1) {
      dsm::fence_proxy_async_shared();  // our generic stores, before the bulk copies read them
      __syncthreads();
      const uint32_t bytes = uint32_t(row * sizeof(T));
      if (dsm::block_thread() == 0) {
        dsm::mbar_arrive_expect_tx(full(s), (N - 1) * bytes);
        for (uint32_t p = 0; p < N; ++p)
          if (p != me_) dsm::bulk_copy_to_peer(mine, mine, bytes, full(s), p);
      }
      dsm::mbar_wait(full(s), use & 1);
    } else {
      __syncthreads();
    }
  }

  __device__ void gather_global(const T* tile, int elems, T* out, int row, uint32_t s) {
    uint32_t* posted = counters_;
    uint32_t* consumed = counters_ + N;
    T* rows = ws_rows_ + s * stage_elems_;
    // Before overwriting our global row of stage s, every peer must have copied it out.
    if (dsm::block_thread() == 0 && call_ >= kStages)
      for (uint32_t p = 0; p < N; ++p)
        if (p != me_) dsm::wait_counter_at_least(consumed + p, call_ - kStages + 1);
    __syncthreads();
    T* g = rows + size_t(me_) * row;
    T* mine = out + size_t(me_) * row;
    for (int i = dsm::block_thread(); i < elems; i += dsm::block_threads()) {
      const T v = tile[i];
      __stcg(g + i, v);
      mine[i] = v;
    }
    __syncthreads();
    if (dsm::block_thread() == 0) {
      dsm::st_release_gpu(posted + me_, call_ + 1);
      for (uint32_t p = 0; p < N; ++p)
        if (p != me_) dsm::wait_counter_at_least(posted + p, call_ + 1);
    }
    __syncthreads();
    for (uint32_t p = 0; p < N; ++p)
      if (p != me_)
        for (int i = dsm::block_thread(); i < elems; i += dsm::block_threads())
          out[size_t(p) * row + i] = __ldcg(rows + size_t(p) * row + i);
    __syncthreads();
    if (dsm::block_thread() == 0) dsm::st_release_gpu(consumed + me_, call_ + 1);
  }

  uint64_t* bars_;
  T* out_;
  size_t stage_elems_;
  uint32_t* counters_;
  T* ws_rows_;
  uint32_t me_;
  uint32_t call_ = 0;
};

}  // namespace clusterfuse
