// ClusterReduce<N, T, Op, Algo, Exchange>: reduce a shared-memory tile across the N blocks
// of a cluster, block-collectively.
//
//   extern __shared__ __align__(16) char smem[];
//   using Reduce = clusterfuse::ClusterReduce<4, __nv_bfloat16, clusterfuse::SumOp>;
//   // smem layout identical in every block: [tile | Reduce::scratch_bytes(elems)]
//   __nv_bfloat16* tile = reinterpret_cast<__nv_bfloat16*>(smem);
//   Reduce red(smem + tile_bytes, elems);   // scratch: 16-byte aligned, same offset everywhere
//   red.init();                              // all threads of all blocks (has a cluster barrier)
//   ... every thread writes its part of tile ...
//   red.all_reduce(tile, elems);             // every block's tile = sum over the cluster
//   red.reduce_to_root(tile, elems, 0);      // only block 0's tile is written
//   clusterfuse::dsm::cluster_sync();        // before exit: peers may still signal us
//
// Contract
//   * Called by all threads of every block of the cluster, same arguments (elems, root).
//   * Accumulates in fp32; T in {float, __nv_bfloat16, __half}; results rounded to T once.
//   * Deterministic: a fixed combination order, and every block ends with bit-identical
//     values (tree: partners combine (lower rank, higher rank) in that order; ring: each
//     element is reduced once, by one block, then copied). reduce_to_root(tree) gives the
//     root exactly the all_reduce(tree) result.
//   * Back-to-back calls need no cluster barrier between them: links are double-buffered
//     with credit-based flow control (see cluster_links.cuh). Non-root tiles are untouched
//     by reduce_to_root.
//   * Tiles of any size: the tile is processed in chunks of at most kChunkFloats fp32
//     values per message, so scratch stays small (scratch_bytes(max_elems)).
//   * elems must be a multiple of Op::kRecord (whole records).
//
// Operators. An operator is a functor with
//     static constexpr int kRecord;                 // elements per record (1 = elementwise)
//     template <class A, class B>
//     __device__ float operator()(const A& a, const B& b, int i) const;
// returning element i of op(a, b), where a is the earlier / lower-ranked operand and a[j],
// b[j] are fp32 reads of any element j of the same record. Provided: SumOp, MaxOp and
// SoftmaxMergeOp<D> (flash-decoding merge of split-KV partial attention).
//
// Algorithms. kTree: recursive doubling (all-reduce) / binomial tree (to root): log2 N
// rounds, partner rank ^ 2^r, latency-optimal for small tiles. kRing: reduce-scatter then
// all-gather around the ring, 2(N-1) steps of elems/N each: bandwidth-optimal for big tiles.
#pragma once

#include <math_constants.h>

#include "clusterfuse/cluster_common.cuh"
#include "clusterfuse/cluster_links.cuh"
#include "clusterfuse/dsm.cuh"

namespace clusterfuse {

enum class ReduceAlgo { kTree = 0, kRing = 1 };

struct SumOp {
  static constexpr int kRecord = 1;
  template <class A, class B>
  __device__ __forceinline__ float operator()(const A& a, const B& b, int i) const {
    return a[i] + b[i];
  }
};

struct MaxOp {
  static constexpr int kRecord = 1;
  template <class A, class B>
  __device__ __forceinline__ float operator()(const A& a, const B& b, int i) const {
    return fmaxf(a[i], b[i]);
  }
};

// Merge of online-softmax partial states (split-KV attention). A record is
//   [m, l, o_0 .. o_{D-1}]: m = max score, l = sum_j exp(s_j - m), o = sum_j exp(s_j - m) v_j
// (o unnormalised; divide by l after the reduction). Scores in natural-log units. An empty
// split has m = -inf, l = 0, o = 0 and merges as the identity.
template <int D>
struct SoftmaxMergeOp {
  static constexpr int kRecord = D + 2;
  template <class A, class B>
  __device__ __forceinline__ float operator()(const A& a, const B& b, int i) const {
    const int base = i - i % kRecord;
    const float ma = a[base], mb = b[base];
    const float m = fmaxf(ma, mb);
    if (i == base) return m;
    // -inf - -inf is NaN: an empty side contributes zero instead.
    const float sa = ma == -CUDART_INF_F ? 0.f : expf(ma - m);
    const float sb = mb == -CUDART_INF_F ? 0.f : expf(mb - m);
    return a[i] * sa + b[i] * sb;
  }
};

template <int N, typename T, typename Op = SumOp, ReduceAlgo Algo = ReduceAlgo::kTree,
          Exchange X = Exchange::kDsm, int kChunkFloats = 2048>
class ClusterReduce {
  static_assert(detail::is_cluster_size(N), "cluster size must be 1, 2, 4, 8 or 16");

 public:
  static constexpr int kW = Op::kRecord;
  static constexpr int kRounds = detail::log2_exact(N);
  static constexpr int kLinks = Algo == ReduceAlgo::kTree ? kRounds : 1;
  static constexpr int kStages = 2;
  static constexpr int kRecordsPerMsg = detail::max_int(1, kChunkFloats / kW);
  using Links = typename detail::LinksFor<X, N, kLinks, kStages>::type;

  // Records reduced together (one pass of the algorithm) for a tile of `elems` elements.
  __host__ __device__ static constexpr int chunk_records(int elems) {
    return detail::min_int(elems / kW, Algo == ReduceAlgo::kTree ? kRecordsPerMsg : N * kRecordsPerMsg);
  }
  // fp32 capacity of one message slot (a multiple of 4: messages move as 16-byte vectors).
  __host__ __device__ static constexpr int slot_floats(int elems) {
    const int recs = Algo == ReduceAlgo::kTree ? chunk_records(elems) : detail::ceil_div(chunk_records(elems), N);
    return int(detail::align_up(detail::max_int(1, recs * kW), 4));
  }
  // Shared memory the object needs for tiles of up to max_elems elements (16-byte aligned).
  __host__ __device__ static constexpr size_t scratch_bytes(int max_elems) {
    return Links::Layout::smem_bytes(slot_floats(max_elems)) + kAccBuffers * size_t(slot_floats(max_elems)) * 4;
  }
  // Global workspace per cluster (Exchange::kGlobal only; its first 128-byte-aligned
  // counter region must be zero at launch).
  __host__ __device__ static constexpr size_t workspace_bytes(int max_elems) {
    if constexpr (X == Exchange::kGlobal) return Links::workspace_bytes(slot_floats(max_elems));
    return 0;
  }

  __device__ ClusterReduce(void* scratch, int max_elems, void* workspace = nullptr)
      : links_(scratch, slot_floats(max_elems), workspace),
        acc_(reinterpret_cast<float*>(static_cast<char*>(scratch) +
                                      Links::Layout::smem_bytes(slot_floats(max_elems)))),
        acc_stride_(slot_floats(max_elems)),
        me_(dsm::cluster_rank()) {}

  // Initialise barriers; all threads of all blocks; ends with a cluster barrier.
  __device__ void init() {
    init_local();
    dsm::cluster_sync();
  }
  // Same without the barrier, to initialise several objects under one cluster_sync().
  __device__ void init_local() { links_.init_local(); }

  // Every block's tile becomes op over the cluster's tiles (elements [0, elems)).
  __device__ void all_reduce(T* tile, int elems) { run(tile, elems, -1); }
  // Block `root`'s tile becomes op over the cluster's tiles; other tiles are unchanged.
  __device__ void reduce_to_root(T* tile, int elems, int root) { run(tile, elems, root); }

 private:
  static constexpr int kAccBuffers = Algo == ReduceAlgo::kTree ? 2 : 1;

  __device__ void run(T* tile, int elems, int root) {
    __syncthreads();  // the tile was written by other threads of this block
    if constexpr (N > 1) {
      const int recs = elems / kW, per = chunk_records(elems);
      for (int r0 = 0; r0 < recs; r0 += per) {
        const int n = detail::min_int(per, recs - r0) * kW;
        if constexpr (Algo == ReduceAlgo::kTree)
          tree_chunk(tile + size_t(r0) * kW, n, root);
        else
          ring_chunk(tile + size_t(r0) * kW, n, root);
      }
    }
    __syncthreads();  // results visible to every thread; scratch free for the next call
  }

  __device__ static int vecs(int count) { return detail::max_int(1, detail::ceil_div(count, 4)); }

  // One pass over a message's elements: v_i = src(i) for i < count, sink(i, v_i), and, if
  // `send`, the 16-byte vectors (zero-padded past count) go to dest. All threads.
  template <bool kSend, class Src, class Sink>
  __device__ __forceinline__ void pass(int count, Src src, Sink sink, const typename Links::Dest& dest) {
    const int nv = vecs(count);
    for (int q = dsm::block_thread(); q < nv; q += dsm::block_threads()) {
      float4 v;
      float* pv = &v.x;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int i = 4 * q + k;
        float x = 0.f;
        if (i < count) {
          x = src(i);
          sink(i, x);
        }
        pv[k] = x;
      }
      if constexpr (kSend) links_.put(dest, q, v);
    }
  }

  // Role of this block in round r: all-reduce exchanges every round; to-root, with q = rank
  // ^ root, a block whose low r bits of q are zero is active: it sends if bit r is set
  // (then it is finished), else it receives. Partners are rank ^ 2^r in both modes, so the
  // root's result equals the all-reduce's bit for bit.
  __device__ bool sends_in(int r, int root) const {
    if (root < 0) return true;
    const uint32_t q = me_ ^ uint32_t(root);
    return (q & ((2u << r) - 1)) == (1u << r);
  }
  __device__ bool receives_in(int r, int root) const {
    return root < 0 || ((me_ ^ uint32_t(root)) & ((2u << r) - 1)) == 0;
  }

  __device__ void tree_chunk(T* tile, int count, int root) {
    float* cur = acc_;
    float* nxt = acc_ + acc_stride_;
    const auto keep = [](float* dst) { return [dst](int i, float v) { dst[i] = v; }; };
    const detail::FloatView<T> in_tile{tile};
    // Round 0's message is the input itself; keep an fp32 copy to combine with.
    if (sends_in(0, root)) {
      const auto d = links_.begin_send(0, me_ ^ 1u);
      pass<true>(count, in_tile, keep(cur), d);
      links_.end_send(0, me_ ^ 1u);
    } else {
      pass<false>(count, in_tile, keep(cur), {});
    }
    __syncthreads();
    bool holder = true;
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      if (!receives_in(r, root)) {  // sent its partial this round (or earlier): done
        holder = false;
        break;
      }
      const uint32_t partner = me_ ^ (1u << r);
      links_.recv(r, vecs(count));
      const float* got = links_.inbox(r);
      const float* lo = me_ < partner ? cur : got;  // fixed order: lower rank first
      const float* hi = me_ < partner ? got : cur;
      const auto combine = [&](int i) { return Op()(lo, hi, i); };
      if (r + 1 < kRounds && sends_in(r + 1, root)) {  // forward straight from registers
        const uint32_t next = me_ ^ (2u << r);
        const auto d = links_.begin_send(r + 1, next);
        pass<true>(count, combine, keep(nxt), d);
        links_.end_send(r + 1, next);
      } else {
        pass<false>(count, combine, keep(nxt), {});
      }
      __syncthreads();  // inbox and cur fully read, nxt fully written
      links_.done(r, partner);
      float* t = cur;
      cur = nxt;
      nxt = t;
    }
    if (holder)
      for (int i = dsm::block_thread(); i < count; i += dsm::block_threads()) tile[i] = detail::from_f<T>(cur[i]);
    __syncthreads();  // with an even number of rounds cur is acc_, which the next chunk's input pass writes
  }

  // Ring: the chunk's records split into N segments. Reduce-scatter: segment g starts at
  // block g and travels right, each block combining (received, own); after N-1 steps block
  // g-1 holds its final value and starts the all-gather, N-1 more forwarding steps.
  __device__ void ring_chunk(T* tile, int count, int root) {
    const int recs = count / kW, seg_recs = detail::ceil_div(recs, N);
    const auto seg_begin = [&](uint32_t g) { return detail::min_int(int(g) * seg_recs, recs) * kW; };
    const auto seg_count = [&](uint32_t g) { return seg_begin(g + 1) - seg_begin(g); };
    const uint32_t right = (me_ + 1) % N, left = (me_ + N - 1) % N;
    const bool holder = root < 0 || me_ == uint32_t(root);
    const auto nothing = [](int, float) {};
    float* staging = acc_;  // our final segment, until the tile can take it

    {  // step 0: our own segment, raw
      const int b = seg_begin(me_);
      const auto d = links_.begin_send(0, right);
      pass<true>(seg_count(me_), detail::FloatView<T>{tile + b}, nothing, d);
      links_.end_send(0, right);
    }
    for (int t = 1; t < N; ++t) {  // reduce-scatter
      const uint32_t g = (me_ + N - t) % N;
      const int b = seg_begin(g), n = seg_count(g);
      links_.recv(0, vecs(n));
      const float* got = links_.inbox(0);
      const detail::FloatView<T> own{tile + b};
      const auto combine = [&](int i) { return Op()(got, own, i); };
      const auto d = links_.begin_send(0, right);  // partial, or (t == N-1) final: gather starts
      if (t == N - 1)
        pass<true>(n, combine, [staging](int i, float v) { staging[i] = v; }, d);
      else
        pass<true>(n, combine, nothing, d);
      links_.end_send(0, right);
      __syncthreads();
      links_.done(0, left);
    }
    // All of the tile has been read: write results from here on.
    if (holder) {
      const int b = seg_begin(right), n = seg_count(right);
      for (int i = dsm::block_thread(); i < n; i += dsm::block_threads()) tile[b + i] = detail::from_f<T>(staging[i]);
    }
    for (int u = 1; u < N; ++u) {  // all-gather: final segments travel right
      const uint32_t g = (me_ + 1 + N - u) % N;
      const int b = seg_begin(g), n = seg_count(g);
      links_.recv(0, vecs(n));
      const float* got = links_.inbox(0);
      const auto copy = [got](int i) { return got[i]; };
      T* out = tile + b;
      const auto store = [out, holder](int i, float v) {
        if (holder) out[i] = detail::from_f<T>(v);
      };
      if (u < N - 1) {
        const auto d = links_.begin_send(0, right);
        pass<true>(n, copy, store, d);
        links_.end_send(0, right);
      } else {
        pass<false>(n, copy, store, {});
      }
      __syncthreads();
      links_.done(0, left);
    }
  }

  Links links_;
  float* acc_;
  int acc_stride_;
  uint32_t me_;
};

}  // namespace clusterfuse
