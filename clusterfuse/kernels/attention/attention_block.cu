// Fused Llama-family attention block for small-batch decoding on Hopper, one kernel per layer:
//
//   x      = RMSNorm(hidden) * norm_weight                       every block (x is tiny)
//   q,k,v  = x · W_qkv^T (+ b_qkv)                               phase 1 (row-split GEMV)
//   q,k    = RMSNorm per head (q_norm_w, k_norm_w)               every block, CF_ATTN_QK_NORM builds
//   q,k    = RoPE(q, k)                                          every block, on chip
//   cache[cache_lens[b]] <- k, v                                 one block per sequence
//   o      = softmax(q·K^T / sqrt(hd)) V over cache_lens[b] + 1  phase 2 (split-KV)
//            keys (CF_ATTN_WINDOW builds: the last p.window of them)
//   y      = o · W_o^T                                           phase 3, fp32 partial per cluster
//   out    = Σ_clusters y  (fp32)  |  residual + Σ y  (hidden's dtype)
//
// Partition (every weight and KV byte is read from HBM once per step):
//   * One cluster per KV head group `cid` (its G = nh/nkv query heads share K/V weights and the KV
//     cache), C blocks per cluster. The cluster's Q/K/V rows ((G+2)·hd of W_qkv) are split in
//     16-row units across its blocks (phase 1, one GEMV over the block's rows); each block pushes
//     its rows of q,k,v for all sequences into every block's shared memory (st.async, each receiver
//     waiting on its own mbarrier: no cluster barrier, whose release fence would wait for the KV
//     prefetches in flight; see the exchange below) or through a global workspace (the
//     "global" ablation, then a barrier of the group).
//   * Phase 2: every sequence's cached keys [0, len) (with a window: from the 16-key tile of its
//     first row, at::window_key_range) are split in C contiguous ranges, one per block; inside a block, each warp folds 16-key tiles with tensor-core mma (split_kv_mma.cuh;
//     K and V rows in 16-byte loads straight into registers).
//     The blocks' (m, l, acc) states are merged by reduce-scatter then all-gather: block r merges
//     its slice of o from every block's state and pushes it into every block (a fixed butterfly
//     order: deterministic, identical in all blocks; st.async again). The new token (key `len`)
//     enters there as one more state, from the q, k, v every block holds (not re-read from the
//     cache row the same kernel writes).
//   * Phase 3: block `rank` owns H/C rows of W_o restricted to the cluster's G·hd columns, so the
//     cluster produces one fp32 partial [B, H]. Partials are summed in cluster order: after a
//     grid barrier when the whole grid is co-resident (checked on the host), else by the last
//     block of each row range to arrive (arrival counter). No atomics on outputs.
// Residency: clusters must sit inside one GPC, so at one block per SM an H100 holds only 30
// clusters of 4 (16 of 8): 32 KV heads would run in two waves. Blocks of 128 threads with room for
// two per SM make every grid of <= 132 x 2 blocks co-resident; an SM alone keeps 32 KB of weight
// loads in flight with 4 warps, and a doubled SM still has bandwidth to spare (~22 GB/s per SM is
// all an SM gets when HBM is saturated).
// Weights load straight into registers (gemv.cuh), with L2 bulk prefetches of the next weights'
// first steps issued before each wait; the first keys of each block's range are prefetched into
// L2 before the q,k,v exchange. (A per-warp ring of shared-memory weight tiles filled by TMA, one
// schedule for the block's Q/K/V rows and W_o slice, was 20-27% slower on the H100 in every
// measurement and was removed: bench/results/ring_kv_prefetch_async_exchange_h100.md.)
//
// Specialised at build time (JIT, -D): dtype, head dim, GQA ratio, batch tiles, block size and the
// model features QK-norm and sliding window; defaults below so the file compiles with no flags.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stddef.h>

#include "clusterfuse/abi/attention_block.h"
#include "clusterfuse/attention/block_params.cuh"
#include "clusterfuse/attention/block_phases.cuh"
#include "clusterfuse/attention/split_kv.cuh"
#include "clusterfuse/attention/split_kv_mma.cuh"
#include "clusterfuse/cluster_common.cuh"
#include "clusterfuse/dsm.cuh"
#include "clusterfuse/gemv.cuh"
#include "clusterfuse/grid_sync.cuh"
#include "clusterfuse/launch.cuh"
#include "clusterfuse/pdl.cuh"
#include "clusterfuse/rms_norm.cuh"
#include "clusterfuse/split_range.cuh"

#ifndef CF_ATTN_DTYPE  // 0: bf16, 1: fp16
#define CF_ATTN_DTYPE 0
#endif
#ifndef CF_ATTN_HEAD_DIM  // 64 or 128
#define CF_ATTN_HEAD_DIM 128
#endif
#ifndef CF_ATTN_GQA  // query heads per KV head, 1..8
#define CF_ATTN_GQA 1
#endif
#ifndef CF_ATTN_NT  // 8-sequence batch tiles of the mma GEMVs: 1 (batch <= 8) or 2 (<= 16)
#define CF_ATTN_NT 1
#endif
// 128 threads x 2 blocks/SM: a cluster of C fits where C SMs do not (see below). 256 (the op's
// second build, block_threads): one block per SM (the registers), twice the loads in flight per
// block; the tuner picks per shape (clusterfuse/ops/attention_block.py, BLOCK_THREADS).
#ifndef CF_ATTN_THREADS
#define CF_ATTN_THREADS 128
#endif
#ifndef CF_ATTN_TIMELINE  // 1: thread 0 of each block records the phase boundaries (bench/attention_timeline.py)
#define CF_ATTN_TIMELINE 0
#endif
// Model features, each a switch so that a build without it keeps its machine code
// (tools/compare_machine_code.sh):
#ifndef CF_ATTN_QK_NORM  // 1: per-head RMSNorm of q and k before RoPE (Qwen3; weights p.q_norm_w, p.k_norm_w)
#define CF_ATTN_QK_NORM 0
#endif
#ifndef CF_ATTN_WINDOW  // 1: sliding-window attention over the last p.window keys (Mistral-v0.1; 0: all)
#define CF_ATTN_WINDOW 0
#endif

namespace cg = cooperative_groups;
namespace gv = clusterfuse::gemv;
namespace at = clusterfuse::attention;

namespace {

#if CF_ATTN_DTYPE == 0
using T = __nv_bfloat16;
#else
using T = __half;
#endif
constexpr int HD = CF_ATTN_HEAD_DIM;
constexpr int G = CF_ATTN_GQA;
constexpr int NT = CF_ATTN_NT;
constexpr int kThreads = CF_ATTN_THREADS;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBatch = 8 * NT;
constexpr int kMaxCluster = CF_ATTENTION_BLOCK_MAX_CLUSTER;
constexpr int kMinBlocksPerSm = kThreads <= 128 ? 2 : 1;  // blocks per SM the register budget must allow
// Register pipeline depth of the Q/K/V and O GEMVs (gemv.cuh; depth - 1 steps of 4 KB in flight
// per warp). 2, not gemv.cuh's 3: on an H200 the isolated block ran 79.2 -> 74.9 µs (Llama-2-7B
// S=1K), 130.6 -> 117.3 (S=8K), 63.2 -> 57.7 (Llama-3-8B S=1K), and deeper was slower still
// (bench/results/gemv_depth_ring_h200.md). ptxas (HD=128, G=1): the kernel's spills 160 -> 0 bytes
// per thread, the key loop's 92 -> 0; this kernel's 255 registers are its limit, not bytes in flight.
constexpr int kQkvGemvDepth = 2;
constexpr int kOGemvDepth = 2;
constexpr int kRows = (G + 2) * HD;  // the cluster's Q, K, V rows of W_qkv
constexpr int kSmemLimit = 227 * 1024;
constexpr int kXsBudget = 48 * 1024;  // normed-x staging; larger batch x hidden is cut in k chunks
// Two blocks per SM (what makes every grid co-resident, see above) when a block needs at most this
// (228 KB per SM, 1 KB of it reserved per block).
constexpr int kSmemTwoPerSm = (228 * 1024) / 2 - 1024;
// More than half an SM's shared memory even before its 1 KB reservation: one block per SM.
constexpr int kSmemOnePerSm = (228 * 1024) / 2 + 16;
constexpr int kL2PrefetchSteps = 4;  // first weight steps per warp prefetched into L2 at a phase boundary

static_assert(HD == 64 || HD == 128, "head_dim must be 64 or 128");
static_assert(G >= 1 && G <= 8, "GQA ratio must be in 1..8");

// How the blocks of a KV head group exchange q,k,v, their attention states and o:
enum Exchange : int {
  kExGlobal = 0,  // a thread-block cluster; through a global workspace, with cluster barriers
  kExDsm = 1,     // a thread-block cluster; through distributed shared memory
  kExFlat = 2,    // no hardware cluster (launched with clusters of 1): C consecutive blocks form
                  // the group, through the global workspace, with barriers on a per-group counter
                  // in global memory (grid_sync.cuh). Needs the whole grid resident, but not its
                  // groups inside one GPC: at one block per SM an H200 holds 132 blocks, against
                  // 30 clusters of 4 or 7 of 16 (bench/results/attention_plans_h200.json).
};
constexpr int kMaxGroups = 256;  // KV head groups the flat exchange has counters for

enum : int {
  kErrArgs = -1,         // shapes / cluster size out of range for this specialisation
  kErrSmem = -2,         // does not fit in shared memory
  kErrNotResident = -3,  // no cluster of this size can be resident
};

using Params = at::BlockParams<T, kMaxCluster>;

// Timeline (profiling builds): per block [globaltimer at start, at end, SM id, clock64 at each stamp].
enum Stamp : int { kStart, kWaited, kNormed, kQkv, kExchanged, kAppended, kAttended, kMerged, kProjected, kBarrier, kEnd,
                   kStamps };
constexpr int kTimelineSlots = 3 + kStamps;

__device__ __forceinline__ void stamp(unsigned long long* timeline, Stamp s) {
  if constexpr (CF_ATTN_TIMELINE) {
    if (threadIdx.x != 0 || !timeline) return;
    unsigned long long* t = timeline + (size_t)blockIdx.x * kTimelineSlots;
    if (s == kStart || s == kEnd) {
      unsigned long long ns;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
      t[s == kStart ? 0 : 1] = ns;
    }
    if (s == kStart) {
      unsigned int sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      t[2] = sm;
    }
    t[3 + s] = clock64();
  }
}

using clusterfuse::detail::align16;
using clusterfuse::detail::max_int;

using clusterfuse::split_range;

using SeqInfo = at::SeqInfo<kMaxBatch>;
static_assert(offsetof(SeqInfo, first) - offsetof(SeqInfo, k0) == 2 * kMaxBatch * sizeof(int),
              "at::WorkList reads k0, k_end, first as consecutive arrays");

// Shared-memory layout, identical on host and device (the regions are listed in the constructor).
// The merge reads the new token's v row from res while peers may already store o into xo, which
// starts at res: o's rows (T) must end before the v rows (fp32).
static_assert(gv::smem_ld(G * HD) * 2 <= (G + 1) * HD * 4, "o in shared memory overlaps the v rows of res");
struct Layout {
  int ld1, ld2, off_res, off_part, off_bacc, off_bml, off_rstd, off_seq, off_qfrag, bytes;

  // Regions whose lifetimes do not overlap share room, so that batch 16 with GQA 4 (Llama-3-8B)
  // still fits two blocks per SM (every grid co-resident):
  //   [0, A):   phase 1's normed x, then phase 2's per-warp states (the tensor-core loop: the parts
  //             of sequences cut between warps, at::partial_slots) followed by the block states
  //             bacc and right after them bml (the merge reads a peer's (m, l) at bacc + B·G·HD,
  //             through DSM, until its end);
  //   res:      q,k,v (fp32), then phase 3's o (the merge writes it once every q is consumed);
  //   part:     the GEMV k-split partials of phases 1 and 3, or phase 2's q fragments.
  __host__ __device__ Layout(int B, int kc, int part_floats) {
    ld1 = gv::smem_ld(kc);
    ld2 = gv::smem_ld(G * HD);
    off_bacc = align16(at::warp_states(kWarps) * G * (HD + 2) * 4);
    off_bml = off_bacc + B * G * HD * 4;
    off_res = align16(max_int(B * ld1 * 2, off_bml + B * G * 2 * 4));
    off_part = off_res + align16(max_int(kRows * B * 4, B * ld2 * 2));
    off_qfrag = off_part;  // the tensor-core key loop's q fragments, per warp
    off_rstd = off_part + align16(max_int(part_floats * 4, kWarps * at::MmaSoftmax<T, HD, G>::kQfragBytesPerWarp));
    off_seq = off_rstd + kMaxBatch * 4;
    bytes = align16(off_seq + (int)sizeof(SeqInfo));
  }
};

// A block's share of the cluster's Q/K/V rows is one contiguous run of 16-row units of the
// cluster-local row space [q rows | k rows | v rows]; it falls into at most 3 regions (pieces),
// which phase 1 streams as one GEMV (gemv.cuh WeightPieces): a GEMV per piece restarted the
// pipeline at each piece, and a block with two pieces took 8-10 µs longer than one with one
// (H100, Llama-3-8B batch 16, bench/results/qkv_pieces_h100.md).
struct Piece {
  int region, row0, rows, lr0;  // region 0/1/2 = q/k/v; first row inside it; count; local row
};

__host__ __device__ inline int qkv_pieces(int rank, int C, Piece (&pc)[3]) {
  int lo, hi;
  split_range(kRows / 16, C, rank, 16, lo, hi);
  int n = 0;
#pragma unroll
  for (int r = 0; r < 3; ++r) {
    const int b0 = r == 0 ? 0 : (G + r - 1) * HD, b1 = (G + r) * HD;
    const int a = lo > b0 ? lo : b0, b = hi < b1 ? hi : b1;
    if (a < b) pc[n++] = Piece{r, a - b0, b - a, a};
  }
  return n;
}

// First W_qkv row of a region for KV head group `cid`.
__host__ __device__ inline int region_row(int region, int cid, int nh, int nkv) {
  return region == 0 ? cid * G * HD : region == 1 ? (nh + cid) * HD : (nh + nkv + cid) * HD;
}

// Split cluster barrier halves (dsm.cuh): a relaxed arrive (no fence: loads and prefetches in
// flight stay in flight) and the acquire wait (barrier.cluster.wait's default semantics).
using clusterfuse::dsm::cluster_arrive_relaxed;
using clusterfuse::dsm::cluster_wait;

template <int kEx>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    attention_block_kernel(const __grid_constant__ Params p) {
  constexpr bool kDsm = kEx == kExDsm, kFlat = kEx == kExFlat;
  extern __shared__ __align__(16) unsigned char smem[];
  cg::cluster_group cluster = cg::this_cluster();
  const int B = p.B, H = p.H, C = p.C, nkv = p.kv.nkv;
  const int rank = kFlat ? (int)(blockIdx.x % C) : (int)cluster.block_rank(), cid = blockIdx.x / C;
  // The group's barrier on the exchanges through global memory (block-collective).
  auto group_sync = [&] {
    if constexpr (kFlat)
      clusterfuse::grid::group_barrier(p.group_counters + cid, C, rank == 0);
    else
      cluster.sync();
  };
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  // The DSM exchanges' mbarriers: [0] q,k,v, [1] o. Peers store into them only after the cluster
  // wait that follows phase 0's arrival, which publishes the init.
  __shared__ uint64_t ex_bars[2];
  constexpr bool kAsyncEx = kDsm;
  if (kAsyncEx && threadIdx.x == 0) {
    clusterfuse::dsm::mbar_init(&ex_bars[0], 1);
    clusterfuse::dsm::mbar_init(&ex_bars[1], 1);
    clusterfuse::dsm::fence_mbarrier_init();
  }

  stamp(p.timeline, kStart);

  // ---- geometry ---------------------------------------------------------------------------
  Piece pc[3];
  const int npc = qkv_pieces(rank, C, pc);
  int my_lo, my_hi;  // this block's cluster-local Q/K/V rows
  split_range(kRows / 16, C, rank, 16, my_lo, my_hi);
  const int nchunks = (H + p.kc - 1) / p.kc;
  // Piece i's first W_qkv row at column k0.
  auto piece_base = [&](int i, int k0) {
    return p.w_qkv + (size_t)(region_row(pc[i].region, cid, p.nh, nkv) + pc[i].row0) * H + k0;
  };
  // The weights of k chunk `chunk`: all of this block's pieces, one GEMV.
  auto qkv_rows = [&](int chunk) {
    const int k0 = chunk * p.kc;
    gv::WeightPieces<T> w{{p.w_qkv, p.w_qkv, p.w_qkv}, {0, 0, 0}, H, min(p.kc, H - k0)};
#pragma unroll
    for (int i = 0; i < 3; ++i) {  // unrolled: constant indices keep w and pc in registers
      if (i >= npc) break;
      w.seg[i] = piece_base(i, k0);
      w.rows[i] = pc[i].rows;
    }
    return w;
  };

  const Layout lay(B, p.kc, p.part_floats);  // as the host planned it
  T* xs = reinterpret_cast<T*>(smem);         // phase 1: normed x chunk [B][ld1]
  // Phase 2's warp states: [at::warp_states(kWarps)] (the parts of sequences cut between warps).
  constexpr int kWarpStates = at::warp_states(kWarps);
  float* wacc = reinterpret_cast<float*>(smem);  // phase 2: acc [kWarpStates][G][HD]
  float* wml = wacc + kWarpStates * G * HD;      //          (m, l) [kWarpStates][G][2]
  float* res = reinterpret_cast<float*>(smem + lay.off_res);    // q,k,v [kRows][B] fp32
  T* xo = reinterpret_cast<T*>(smem + lay.off_res);             // phase 3: o [B][ld2]
  float* part = reinterpret_cast<float*>(smem + lay.off_part);  // GEMV k-split partials
  float* bacc = reinterpret_cast<float*>(smem + lay.off_bacc);  // block state acc [B][G][HD]
  float* bml = reinterpret_cast<float*>(smem + lay.off_bml);    // block state (m, l) [B][G][2]
  float* rstd = reinterpret_cast<float*>(smem + lay.off_rstd);
  SeqInfo* seq = reinterpret_cast<SeqInfo*>(smem + lay.off_seq);
  uint4* qfrag = reinterpret_cast<uint4*>(smem + lay.off_qfrag);

  // ---- phase 0: start streaming the first weights, then norm statistics + input checks ------
  // L2 bulk prefetches of the first steps, here and at each phase boundary. They are hints, so
  // they may run before the previous kernel has finished (programmatic launch, pdl.cuh).
  if (npc > 0) gv::warp_prefetch_first(qkv_rows(0), p.ks_qkv[rank], warp, kL2PrefetchSteps);
  clusterfuse::pdl::wait_prior_grid();  // hidden, residual, lengths, caches: the previous kernels' outputs
  stamp(p.timeline, kWaited);
  // The input checks' first loads (the last warp, a lane per sequence) go out before the norm's,
  // so that the two latencies overlap: the page lookup that depends on the length is the only
  // one left after them (norm + checks 2.2 -> 1.6 µs, H100, Llama-2-7B S=1K cluster 4).
  static_assert(kMaxBatch <= 32, "the checks and the work list take one lane per sequence");
  const bool checker = warp == kWarps - 1 && lane < B;
  const int len_in = checker ? p.cache_lens[lane] : 0;
  const long long pos_in = !checker ? 0
                           : p.pos64 ? static_cast<const long long*>(p.positions)[lane]
                                     : static_cast<const int*>(p.positions)[lane];
  // The norm's sums of squares (all warps, `res` as scratch: phase 1 writes it only later), then
  // the input checks on the last warp while the other warps wait at the norm's barrier.
  float* norm_red = reinterpret_cast<float*>(smem + lay.off_res);
  clusterfuse::norm::block_sum_squares<T, kThreads>(p.hidden, B, H, norm_red);
  // The same warp then builds phase 2's work list (at::WorkList), one lane per sequence: its items,
  // then their exclusive prefix sum across the lanes (one thread walking the sequences in turn
  // put ~10 µs of dependent steps before phase 1 at batch 16). finish_rstd's barrier publishes
  // both; the KV prefetch after phase 1 and phase 2 read them.
  if (warp == kWarps - 1) {
    const int n = lane;
    bool ok = false;
    int len = 0;
    if (n < B) {
      len = len_in;
      const long long pos = pos_in;
      ok = len >= 0 && pos >= 0 && pos < p.max_pos && len / p.kv.page_size < p.kv.max_pages;
      if (ok && p.kv.block_table) {
        const int page = p.kv.block_table[(size_t)n * p.kv.max_pages + len / p.kv.page_size];
        ok = page >= 0 && page < p.kv.num_pages;
      }
      if (!ok) len = 0;
      seq->ok[n] = ok;
      seq->len[n] = len;
      seq->pos[n] = ok ? (int)pos : 0;
      if (!ok && rank == 0 && cid == 0) *p.error = 1;
    }
    int k0, k1;
    if constexpr (CF_ATTN_WINDOW)
      at::window_key_range(len, p.window, C, rank, k0, k1);
    else
      at::key_range(len, C, rank, k0, k1);
    // A bad sequence attends to nothing: its state stays empty (o is NaN below).
    const int k_end = ok ? k1 : k0;  // key_range ends at len
    int count;  // tiles (a window's range may start off the tiles: at::window_tiles)
    if constexpr (CF_ATTN_WINDOW)
      count = n < B ? at::window_tiles(k0, k_end) : 0;
    else
      count = n < B ? (k_end - k0 + at::kTileKeys - 1) / at::kTileKeys : 0;
    int upto = count;  // inclusive prefix sum, a fixed shuffle ladder
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, upto, o);
      if (lane >= o) upto += v;
    }
    if (n < B) seq->first[n] = upto - count, seq->k0[n] = k0, seq->k_end[n] = k_end;
    if (n == 31) seq->first[B] = upto;
  }
  clusterfuse::norm::finish_rstd<kThreads>(norm_red, B, H, p.eps, rstd);
  // Announce this block to the cluster once `res` is free: the peers wait for it before their
  // first DSM store, the q,k,v exchange, which writes into `res`. Arriving at the kernel's start,
  // as earlier versions did, let a peer that ran ~30 µs ahead write into `res` while this block
  // still summed the norm's squares there (never seen: phase 1 is long). Relaxed: the scratch's
  // reads have all returned (their sums are in rstd, past finish_rstd's barrier).
  if constexpr (kDsm) cluster_arrive_relaxed();
  stamp(p.timeline, kNormed);

  // ---- phase 1: this block's Q/K/V rows, all sequences → res[lr][n] -------------------------
  for (int c = 0; c < nchunks; ++c) {
    const int k0 = c * p.kc, kcur = min(p.kc, H - k0);
    if (c > 0) __syncthreads();  // the previous chunk's xs is no longer read (rstd: finish_rstd's barrier)
    clusterfuse::norm::normed_to_smem<T, kThreads>(p.hidden, p.norm_w, rstd, B, H, k0, kcur, xs, lay.ld1);
    __syncthreads();
    // Local row lr of sequence n: chunks summed in order (deterministic).
    auto sum_into_res = [&](int lr, int n, float v) {
      float& r = res[lr * B + n];
      r = c == 0 ? v : r + v;
    };
    // One GEMV: the pieces' rows are consecutive from my_lo.
    if (c + 1 < nchunks) gv::warp_prefetch_first(qkv_rows(c + 1), p.ks_qkv[rank], warp, kL2PrefetchSteps);
    gv::block_gemv<T, NT, kQkvGemvDepth>(qkv_rows(c), p.ks_qkv[rank], xs, lay.ld1, B, part,
                                         [&](int row, int n, float v) { sum_into_res(my_lo + row, n, v); });
    __syncthreads();  // part[] is reused by the next GEMV
  }

  stamp(p.timeline, kQkv);
  // Attention inputs do not depend on q,k,v: prefetch the first keys of this block's ranges into
  // L2. W_o is not: prefetching the whole slice here delayed the exchange and the attention phase
  // and did not speed up the O-projection (H100, bcd8313; H200,
  // bench/results/w_o_prefetch_h200.md). Nor did tensor-map prefetches of it in 64 x HD boxes (a
  // few dozen instructions per block), here or after the attention phase: the block 68.4 -> 84.6 /
  // 77.7 µs; the phase that issued them (each ends in a cluster barrier) grew by about the slice's
  // HBM time, and the O-projection was no faster (H100, bench/results/l2_prefetch_h100.md).
  // The first tiles of each warp's run of the work list (at::WorkList): kv_prefetch_keys per sequence, B·kv_prefetch_keys keys in
  // all, spread evenly over the warps' runs so that each warp's first loads hit L2. A tile in one
  // page is one bulk prefetch of K and one of V by one thread: a row per thread (HD·2 bytes, as
  // f0d1400 did) made the q,k,v exchange that follows 2 µs slower at batch 1 and 15 µs at 16, and
  // the attention phase no faster (H200, bench/results/work_list_phase0_h200.md).
  {
    const at::WorkList wl = seq->work_list();
    const at::WarpRuns runs(seq->first[B], kWarps);
    const int per_warp = (B * p.kv_prefetch_keys / at::kTileKeys + kWarps - 1) / kWarps;  // tiles
    for (int e = threadIdx.x; e < kWarps * per_warp; e += kThreads) {
      const int w = e / per_warp;
      int w0, w1;
      runs.run(w, w0, w1);
      const int item = w0 + (e - w * per_warp);
      if (item >= w1) continue;
      const int n = wl.sequence(item, 0);
      const int t0 = CF_ATTN_WINDOW ? at::window_tile_start(seq->k0[n]) : seq->k0[n];  // the first tile's key
      const int j0 = t0 + (item - seq->first[n]) * at::kTileKeys;
      const int valid = min(at::kTileKeys, seq->k_end[n] - j0);
      const at::TileRows<HD> r(p.kv, n, cid, j0);
      if (r.whole(valid)) {  // one page: 16 contiguous rows
        gv::prefetch_l2(p.k_cache + r.base0, at::kTileKeys * HD * 2);
        gv::prefetch_l2(p.v_cache + r.base0, at::kTileKeys * HD * 2);
      } else {
        for (int j = 0; j < valid; ++j) {
          gv::prefetch_l2(p.k_cache + r.row(j), HD * 2);
          gv::prefetch_l2(p.v_cache + r.row(j), HD * 2);
        }
      }
    }
  }
  // RoPE's cos/sin for this thread's (sequence, rotation pair)s, loaded now so that they arrive
  // during the exchange (loaded in the RoPE loop, each waited for in turn: 11-15 µs at batch 16).
  constexpr int kRopePairs = (kMaxBatch * (HD / 2) + kThreads - 1) / kThreads;
  float rope_cos[kRopePairs], rope_sin[kRopePairs];
  at::load_rope_angles<HD, kThreads>(p.cos, p.sin, seq->pos, B, rope_cos, rope_sin);
  // QK-norm's weights into L2 during the exchange: at::qk_norm reads them right after it, and the
  // layer's W_qkv, streamed since, has most likely evicted them (16-byte aligned: the op checks).
  if constexpr (CF_ATTN_QK_NORM)
    if (threadIdx.x == 0) gv::prefetch_l2(p.q_norm_w, HD * sizeof(T)), gv::prefetch_l2(p.k_norm_w, HD * sizeof(T));
  // Bias for this block's rows.
  if (p.b_qkv)
    for (int e = my_lo * B + threadIdx.x; e < my_hi * B; e += kThreads) {
      const int lr = e / B;
      const int region = lr < G * HD ? 0 : lr < (G + 1) * HD ? 1 : 2;
      const int row = lr - (region == 0 ? 0 : (G + region - 1) * HD);
      res[e] += at::to_f(p.b_qkv[region_row(region, cid, p.nh, nkv) + row]);
    }
  __syncthreads();

  // ---- exchange q,k,v: every block gets the cluster's kRows x B values ------------------------
  {
    const float4* mine = reinterpret_cast<const float4*>(res + my_lo * B);
    const int n4 = (my_hi - my_lo) * B / 4;  // my_lo, my_hi are multiples of 16
    if constexpr (kAsyncEx) {
      namespace dsm = clusterfuse::dsm;
      cluster_wait();  // every block of the cluster is past phase 0: its `res` is free, its mbarrier set
      if (threadIdx.x == 0) dsm::mbar_arrive_expect_tx(&ex_bars[0], (kRows - (my_hi - my_lo)) * B * 4);
      for (int q = 1; q < C; ++q) {
        const int peer = (rank + q) % C;
        const uint32_t dst = dsm::mapa_shared(dsm::smem_addr(res + my_lo * B), peer);
        const uint32_t bar = dsm::mapa_shared(dsm::smem_addr(&ex_bars[0]), peer);
        for (int e = threadIdx.x; e < n4; e += kThreads) dsm::st_async_v4(dst + e * 16, mine[e], bar);
      }
      dsm::mbar_wait(&ex_bars[0], 0);  // the peers' rows are in `res` (acquire)
      // Every thread of this block has loaded the rows it sends before any thread rewrites them
      // (RoPE below, in place): the wait above only covers the peers' rows.
      __syncthreads();
    } else {
      float* ws = p.ws_qkv + (size_t)cid * kRows * B;
      float4* dst = reinterpret_cast<float4*>(ws + my_lo * B);
      for (int e = threadIdx.x; e < n4; e += kThreads) dst[e] = mine[e];
      __threadfence();
      group_sync();
      for (int e = threadIdx.x; e < kRows * B / 4; e += kThreads)
        reinterpret_cast<float4*>(res)[e] = __ldcg(reinterpret_cast<const float4*>(ws) + e);
      __syncthreads();
    }
  }

  stamp(p.timeline, kExchanged);
  // ---- QK-norm (Qwen3): every head of q and the k head RMSNormed, before RoPE ----------------
  if constexpr (CF_ATTN_QK_NORM) at::qk_norm<T, HD, G, kThreads>(res, B, p.q_norm_w, p.k_norm_w, p.eps);
  // ---- RoPE (q heads and the k head), rounding of the new k, v to the cache dtype --------------
  at::rope_and_round<T, HD, G, kThreads>(res, B, rope_cos, rope_sin);
  // ---- append k, v at row cache_lens[n]: one block per sequence, nothing for a bad sequence ---
  at::append_kv<T, HD, G, kThreads>(res, B, rank, C, seq->ok, seq->len, p.kv, cid, p.k_cache, p.v_cache);

  stamp(p.timeline, kAppended);
  // ---- phase 2: split-KV attention ---------------------------------------------------------------
  constexpr float kLog2e = 1.4426950408889634f;
  const float qscale = kLog2e * rsqrtf((float)HD);
  // One flat work list for all sequences (at::WorkList, built in phase 0): each warp takes a
  // contiguous run and streams its tiles without a block barrier between sequences (a loop over
  // the sequences, with two barriers and a merge each, left every warp 1-2 tiles deep per
  // sequence at batch 16).
  const at::WorkList wl = seq->work_list();
  const at::WarpRuns runs(seq->first[B], kWarps);
  at::attend_items_mma<T, HD, G, kWarps, CF_ATTN_WINDOW>(p.k_cache, p.v_cache, p.kv, cid, wl, res, B, qscale, wacc,
                                                         bacc, qfrag);
  __syncthreads();
  // Sequences no warp holds whole: the states of their warps wa .. wb merged in warp order; a
  // sequence with no items (wb < wa): the empty state.
  for (int e = threadIdx.x; e < B * G * HD; e += kThreads) {
    const int n = e / (G * HD), g = (e - n * G * HD) / HD;
    const int f0 = seq->first[n], f1 = seq->first[n + 1];
    const int wa = runs.warp_of(f0), wb = f1 > f0 ? runs.warp_of(f1 - 1) : wa - 1;
    if (wb == wa) continue;  // written by its warp
    float mx = -CUDART_INF_F, a = 0.f, l = 0.f;
    for (int w = wa; w <= wb; ++w) mx = fmaxf(mx, wml[runs.slot(w, wa) * G * 2 + g * 2]);
    for (int w = wa; w <= wb; ++w) {
      const int slot = runs.slot(w, wa);
      const float wt = at::merge_weight(wml[slot * G * 2 + g * 2], mx);
      a = fmaf(wacc[slot * G * HD + (e - n * G * HD)], wt, a);
      l = fmaf(wml[slot * G * 2 + g * 2 + 1], wt, l);
    }
    bacc[e] = a;
    if (e % HD == 0) bml[(n * G + g) * 2] = mx, bml[(n * G + g) * 2 + 1] = l;
  }

  // The new token's score per (sequence, head) for the merge, into `part` (the key loop's q
  // fragments are dead: the barrier after it; the O-projection writes part only after the merge's
  // last barrier).
  float* snew = part;  // [B][G]
  at::new_token_scores<HD, G, kThreads>(res, B, qscale, snew);

  stamp(p.timeline, kAttended);
  // ---- exchange and merge the blocks' states: o for all sequences, in every block ------------
  // Reduce-scatter, then all-gather: block `rank` merges only its slice of o's float4 groups,
  // reading that slice of every block's state, and pushes the result into every block's `xo`.
  // Each block thus reads B·G·HD floats of states instead of C times that (every block merging
  // everything, one peer after the other, took 41 µs at batch 16, cluster 16). C consecutive lanes
  // hold one group, lane r reading block r's state: one round of loads, then a butterfly across
  // the C lanes (the same sums in every lane, so o is bit-identical in all blocks, and the same
  // from run to run), and lane r stores the group into block r.
  const int state_floats = (B * G * (HD + 2) + 3) & ~3;  // 16-byte aligned slots (float4 reads)
  if constexpr (kDsm) {
    cluster.sync();
  } else {
    float* ws = p.ws_attn + (size_t)(cid * C + rank) * state_floats;
    for (int e = threadIdx.x; e < B * G * HD; e += kThreads) ws[e] = bacc[e];
    for (int e = threadIdx.x; e < B * G * 2; e += kThreads) ws[B * G * HD + e] = bml[e];
    __threadfence();
    group_sync();
  }
  // The global ablation gathers o through the cluster's q,k,v workspace: every block read it
  // before the barrier above, and it holds kRows·B >= B·G·HD floats.
  T* ws_o = kDsm ? nullptr : reinterpret_cast<T*>(p.ws_qkv + (size_t)cid * kRows * B);  // no workspace with DSM
  int g0, g1;  // this block's float4 groups of o [B][G][HD] (the async gather's byte count uses them too)
  split_range(B * G * HD / 4, C, rank, 1, g0, g1);
  {
    const int src = threadIdx.x % C;       // the block whose state this lane reads (C divides 32)
    const int groups_per_pass = kThreads / C;
    const float* st = kDsm ? (src == rank ? bacc : cluster.map_shared_rank(bacc, src))
                           : p.ws_attn + (size_t)(cid * C + src) * state_floats;
    for (int base = g0; base < g1; base += groups_per_pass) {  // block-uniform: the warps shuffle
      const int gi = base + threadIdx.x / C;
      const bool mine = gi < g1;
      const int ng = mine ? gi * 4 / HD : 0, d = gi * 4 - ng * HD;
      float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
      float2 ml = make_float2(-CUDART_INF_F, 0.f);  // (m, l) of (n, g) in block src; empty if none
      if (mine) {
        const float4* ap = reinterpret_cast<const float4*>(st + ng * HD + d);
        const float2* mp = reinterpret_cast<const float2*>(st + B * G * HD + ng * 2);  // bml follows bacc
        a = kDsm ? *ap : __ldcg(ap);
        ml = kDsm ? *mp : __ldcg(mp);
      }
      float mx = ml.x;
#pragma unroll
      for (int o = 1; o < kMaxCluster; o <<= 1)
        if (o < C) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      // The new token: one more state (m = its score, l = 1, acc = its v row), the same in all C
      // lanes of the group.
      const float s_new = mine ? snew[ng] : -CUDART_INF_F;
      mx = fmaxf(mx, s_new);
      const float wt = at::merge_weight(ml.x, mx);
      float v[5] = {a.x * wt, a.y * wt, a.z * wt, a.w * wt, ml.y * wt};
#pragma unroll
      for (int o = 1; o < kMaxCluster; o <<= 1)
        if (o < C) {
#pragma unroll
          for (int i = 0; i < 5; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], o);
        }
      if (mine) {
        const int n = ng / G;
        // v of the new token, rows (G+1)·HD + d.. of res: xo, which peers may be filling by now,
        // ends before them (static_assert at Layout).
        const float wn = at::merge_weight(s_new, mx);
        const float* vn = res + ((G + 1) * HD + d) * B + n;
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = fmaf(vn[i * B], wn, v[i]);
        v[4] += wn;
        const float inv = seq->ok[n] ? 1.f / v[4] : CUDART_NAN_F;  // a bad sequence yields NaN, not garbage
        const uint2 packed = make_uint2(at::pack2<T>(v[0] * inv, v[1] * inv), at::pack2<T>(v[2] * inv, v[3] * inv));
        if constexpr (kAsyncEx) {
          T* at_xo = xo + n * lay.ld2 + (ng - n * G) * HD + d;
          if (src == rank)
            *reinterpret_cast<uint2*>(at_xo) = packed;
          else
            clusterfuse::dsm::st_async_v2(clusterfuse::dsm::mapa_shared(clusterfuse::dsm::smem_addr(at_xo), src), packed,
                                          clusterfuse::dsm::mapa_shared(clusterfuse::dsm::smem_addr(&ex_bars[1]), src));
        } else if (src == 0) {
          *reinterpret_cast<uint2*>(ws_o + ng * HD + d) = packed;  // o [B][G·HD], unpadded
        }
      }
    }
  }
  // W_o's first steps into L2 while the cluster gathers o (as at phase 1's boundaries).
  int h0, h1;  // this block's rows of W_o (and of the output)
  split_range(H / 4, C, rank, 4, h0, h1);
  const gv::WeightRows<T> wo_rows{{p.w_o + (size_t)h0 * p.nh * HD + cid * G * HD, nullptr, nullptr, nullptr},
                                  1, h1 - h0, p.nh * HD, G * HD};
  gv::warp_prefetch_first(wo_rows, p.ks_o, warp, kL2PrefetchSteps);
  if constexpr (kAsyncEx) {
    // The peers' slices of o land on ex_bars[1]; this block's own slice was stored by its threads.
    if (threadIdx.x == 0) clusterfuse::dsm::mbar_arrive_expect_tx(&ex_bars[1], (B * G * HD / 4 - (g1 - g0)) * 8);
    __syncthreads();
    clusterfuse::dsm::mbar_wait(&ex_bars[1], 0);
    // Done reading the peers' states (their values are in o): a peer may exit once every block
    // has arrived here, which the wait at the kernel's end checks. Relaxed: no fence, so the W_o
    // prefetches above stay in flight.
    cluster_arrive_relaxed();
  } else {
    __threadfence();
    group_sync();
    for (int e = threadIdx.x; e < B * G * HD / 4; e += kThreads) {
      const int n = e * 4 / (G * HD), c = e * 4 - n * G * HD;
      *reinterpret_cast<uint2*>(xo + n * lay.ld2 + c) = __ldcg(reinterpret_cast<const uint2*>(ws_o + n * G * HD + c));
    }
    __syncthreads();
  }

  stamp(p.timeline, kMerged);
  // ---- phase 3: o · W_o^T for this block's rows → the cluster's fp32 partial -----------------
  at::o_projection<T, NT, kOGemvDepth>(wo_rows, p.ks_o, xo, lay.ld2, B, H, h0, part, p.partials + (size_t)cid * B * H);

  stamp(p.timeline, kProjected);
  // The next kernel (FFN) may start placing its blocks from here on, on SMs this grid leaves free,
  // while the partials are summed (pdl.cuh); else when this grid's blocks exit.
  if (p.pdl_early) clusterfuse::pdl::launch_dependents();
  // ---- cross-cluster sum in cluster order (+ residual) ---------------------------------------
  auto write_out = [&](int e, float4 s) {
    if (p.residual) {
      T* out = static_cast<T*>(p.out);
      const float v[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) out[e + i] = at::from_f<T>(at::to_f(p.residual[e + i]) + v[i]);
    } else {
      *reinterpret_cast<float4*>(static_cast<float*>(p.out) + e) = s;
    }
  };
  if (p.coresident) {
    clusterfuse::grid::barrier(p.counters);
    stamp(p.timeline, kBarrier);
    int e0, e1;
    split_range(B * H / 4, gridDim.x, blockIdx.x, 4, e0, e1);
    clusterfuse::grid::reduce_partials(p.partials, nkv, (size_t)B * H, e0, e1, write_out);
  } else {
    // Last block of this row range to arrive (over all clusters) sums it.
    __shared__ int s_last;
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();
      const unsigned int old = atomicAdd(p.counters + 1 + rank, 1u);
      s_last = old == (unsigned int)(nkv - 1);
      if (s_last) {
        p.counters[1 + rank] = 0;  // ready for the next launch (stream-ordered)
        __threadfence();
      }
    }
    __syncthreads();
    stamp(p.timeline, kBarrier);
    if (s_last)
      for (int n = 0; n < B; ++n)
        clusterfuse::grid::reduce_partials(p.partials, nkv, (size_t)B * H, n * H + h0, n * H + h1, write_out);
  }
  if constexpr (kAsyncEx) cluster_wait();  // no peer still reads this block's state (see the merge)
  stamp(p.timeline, kEnd);
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
using KernelFn = void (*)(Params);
KernelFn kernel_for(int ex) {
  return ex == kExDsm ? attention_block_kernel<kExDsm> : ex == kExFlat ? attention_block_kernel<kExFlat>
                                                                        : attention_block_kernel<kExGlobal>;
}

int make_plan(int B, int H, int nh, int nkv, int C, int ex, CfAttentionBlockPlan* plan) {
  if (B < 1 || B > kMaxBatch || H < 16 || H % 16 || nkv < 1 || nh != nkv * G ||
      !(C == 1 || C == 2 || C == 4 || C == 8 || C == 16) || ex < kExGlobal || ex > kExFlat ||
      (ex == kExFlat && nkv > kMaxGroups))
    return kErrArgs;
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device)) return e;
  KernelFn fn = kernel_for(ex);
  // Occupancy is asked for the hardware cluster the launch uses: one block with the flat exchange,
  // and then "active clusters" counts blocks.
  const int hw_cluster = ex == kExFlat ? 1 : C, needed = ex == kExFlat ? nkv * C : nkv;

  // k chunk: the whole hidden size unless B x H of normed x would crowd shared memory.
  int chunks = 1, kc = H;
  while (B * gv::smem_ld(kc) * 2 > kXsBudget) {
    ++chunks;
    kc = 128 * ((H + 128 * chunks - 1) / (128 * chunks));
  }

  // k splits of every GEMV (ks[r]: rank r's Q/K/V GEMV, all its pieces; ks[kMaxCluster]: W_o), their
  // partials taking whatever shared memory the SM has left.
  int ks[kMaxCluster + 1], part = 0;
  const int budget = (kSmemLimit - Layout(B, kc, 0).bytes) / 4;
  if (budget < 0) return kErrSmem;
  for (int i = 0; i < kMaxCluster; ++i) ks[i] = 1;  // ranks >= C: defined, unused
  for (int r = 0; r < C; ++r) {
    int lo, hi;
    split_range(kRows / 16, C, r, 16, lo, hi);
    const int rt = (hi - lo) / 16;
    ks[r] = gv::choose_ksplit<NT>(rt, kc, kWarps, budget);
    part = max_int(part, gv::partial_floats<NT>(rt, ks[r]));
  }
  const int rt_o = (4 * ((H / 4 + C - 1) / C) + 15) / 16;
  ks[kMaxCluster] = gv::choose_ksplit<NT>(rt_o, G * HD, kWarps, budget);
  part = max_int(part, gv::partial_floats<NT>(rt_o, ks[kMaxCluster]));
  for (int i = 0; i < kMaxCluster; ++i) plan->ksplit_qkv[i] = ks[i];
  const int ks_o = ks[kMaxCluster];
  const Layout lay(B, kc, part);
  if (lay.bytes > kSmemLimit) return kErrSmem;

  // A grid of at most half as many blocks as the GPU has SMs gets an SM per block, by asking for
  // more than half an SM's shared memory: where two fit, the cluster scheduler packs two blocks of
  // a cluster onto one SM and halves their bandwidth (H100, Llama-3-8B batch 16 at cluster 8, 64
  // blocks: decode step 14.5 -> 16.4 ms once the layout shrank to two per SM;
  // bench/results/layout_share_h100.md). Kept only where the whole grid stays co-resident.
  int sms = 0, active = 0, bytes = lay.bytes;
  if (cudaError_t e = clusterfuse::max_active_clusters(fn, dim3(kThreads), hw_cluster, bytes, &active)) return e;
  if (cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) return e;
  if (nkv * C * 2 <= sms && bytes <= kSmemTwoPerSm) {
    int spread_active = 0;
    if (cudaError_t e =
            clusterfuse::max_active_clusters(fn, dim3(kThreads), hw_cluster, kSmemOnePerSm, &spread_active))
      return e;
    if (spread_active >= needed) bytes = kSmemOnePerSm, active = spread_active;
  }
  // The flat exchange's barriers spin on blocks of the group: all of them must be resident.
  if (active < 1 || (ex == kExFlat && active < needed)) return kErrNotResident;
  plan->smem_bytes = bytes, plan->k_chunk = kc, plan->ksplit_o = ks_o, plan->coresident = active >= needed;
  plan->active_clusters = active, plan->partial_floats = part;
  return 0;
}

}  // namespace

extern "C" {

void cf_attention_block_spec(CfAttentionBlockSpec* spec) {
  spec->dtype = CF_ATTN_DTYPE, spec->head_dim = HD, spec->gqa = G, spec->max_batch = kMaxBatch;
  spec->timeline_slots = CF_ATTN_TIMELINE ? kTimelineSlots : 0;
  spec->threads = kThreads;
  spec->qk_norm = CF_ATTN_QK_NORM, spec->window = CF_ATTN_WINDOW;
}

int cf_attention_block_plan(const CfAttentionBlockShape* s, CfAttentionBlockPlan* plan) {
  return make_plan(s->batch, s->hidden, s->heads, s->kv_heads, s->cluster, s->exchange, plan);
}

const char* cf_attention_block_error(int rc) {
  switch (rc) {
    case kErrArgs: return "attention_block: unsupported shape or cluster size for this kernel";
    case kErrSmem: return "attention_block: batch x hidden x heads does not fit in shared memory";
    case kErrNotResident: return "attention_block: no cluster of this size can be resident on this GPU";
    default: return cudaGetErrorString(static_cast<cudaError_t>(rc));
  }
}

int cf_attention_block_launch(const CfAttentionBlockArgs* a, const CfAttentionBlockPlan* plan, void* stream) {
  const CfAttentionBlockShape& s = a->shape;
  if (a->kv_prefetch_keys < 0 || a->launch_mode < 0 || a->launch_mode > 2 || s.exchange < kExGlobal ||
      s.exchange > kExFlat)
    return kErrArgs;
  // A feature's arguments only in the build that does it, and there always (never silently ignored).
  if (CF_ATTN_QK_NORM ? !a->q_norm_w || !a->k_norm_w : a->q_norm_w || a->k_norm_w) return kErrArgs;
  if (((uintptr_t)a->q_norm_w | (uintptr_t)a->k_norm_w) % 16) return kErrArgs;  // their L2 prefetch's alignment
  if (a->window < 0 || (!CF_ATTN_WINDOW && a->window)) return kErrArgs;
  Params p{};
  p.hidden = static_cast<const T*>(a->hidden);
  p.norm_w = static_cast<const T*>(a->norm_w);
  p.w_qkv = static_cast<const T*>(a->w_qkv);
  p.b_qkv = static_cast<const T*>(a->b_qkv);
  p.w_o = static_cast<const T*>(a->w_o);
  p.cos = a->cos;
  p.sin = a->sin;
  p.positions = a->positions;
  p.k_cache = static_cast<T*>(a->k_cache);
  p.v_cache = static_cast<T*>(a->v_cache);
  p.cache_lens = a->cache_lens;
  p.kv.block_table = a->block_table;
  p.residual = static_cast<const T*>(a->residual);
  p.out = a->out;
  p.partials = a->partials;
  p.ws_qkv = a->ws_qkv;
  p.ws_attn = a->ws_attn;
  p.counters = a->counters;
  p.group_counters = a->group_counters;
  p.error = a->error;
  p.timeline = reinterpret_cast<unsigned long long*>(a->timeline);
  p.B = s.batch, p.H = s.hidden, p.nh = s.heads, p.kv.nkv = s.kv_heads, p.C = s.cluster;
  p.max_pos = a->max_pos, p.pos64 = a->positions_int64;
  p.kv.page_size = a->page_size, p.kv.max_pages = a->max_pages, p.kv.num_pages = a->num_pages;
  p.kv_prefetch_keys = a->kv_prefetch_keys;
  p.pdl_early = a->launch_mode == 2;
  p.kc = plan->k_chunk, p.ks_o = plan->ksplit_o, p.coresident = plan->coresident;
  p.part_floats = plan->partial_floats;
  p.eps = a->eps;
  for (int r = 0; r < kMaxCluster; ++r) p.ks_qkv[r] = (signed char)plan->ksplit_qkv[r];
  p.q_norm_w = static_cast<const T*>(a->q_norm_w);
  p.k_norm_w = static_cast<const T*>(a->k_norm_w);
  p.window = a->window;
  clusterfuse::LaunchOptions opts;
  opts.programmatic = a->launch_mode != 0;
  return clusterfuse::launch_cluster_with(opts, kernel_for(s.exchange), dim3(p.kv.nkv * p.C), dim3(kThreads),
                                          s.exchange == kExFlat ? 1 : p.C, plan->smem_bytes,
                                          static_cast<cudaStream_t>(stream), p);
}

}  // extern "C"
