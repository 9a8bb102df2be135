// clusterfuse/attention/group_program_body.cuh — NOT a self-contained header: the statements of
// the fused attention block's program for one KV head group on one block (phases 0-3: input checks
// and norm statistics, the Q/K/V GEMV, the first keys' L2 prefetch, bias, the q,k,v exchange,
// QK-norm / RoPE / KV append, split-KV attention, the merge of the blocks' states, the O
// projection into the group's fp32 partial p.partials + cid·B·H), included inside the body of the
// function that runs them: the per-block kernel (kernels/attention/attention_block.cu, one launch
// per layer) and the persistent decode step (include/clusterfuse/step/attention_group.cuh, every
// layer in one launch). One implementation of each phase; the per-block kernel keeps the machine
// code it had when these lines were its own (tools/compare_machine_code.sh: moved into a
// __forceinline__ function taking the parameters by reference, the program compiled to ~130 more
// instructions per kernel, because LLVM simplifies a callee before inlining it).
//
// The including scope defines:
//   Cfg (at::BlockConfig), T, HD, G, NT, kThreads, kWarps, kMaxBatch, kMaxCluster, kRows,
//   kQkvGemvDepth, kOGemvDepth, kL2PrefetchSteps, kQkNorm, kWindow (constexpr, from Cfg);
//   Layout (at::BlockLayout<Cfg>), SeqInfo, Piece, qkv_pieces, region_row; namespaces at, gv;
//   split_range, cluster_arrive_relaxed, cluster_wait;
//   kDsm, kFlat, kAsyncEx (constexpr bool: the exchange);
//   p (at::BlockParams: this group's layer), smem (the dynamic shared memory, BlockLayout),
//   ex_bars (uint64_t[2]: the DSM exchanges' mbarriers, initialised), parity (the phase they
//   complete in this run: each is used once per run), cluster (cg::cluster_group),
//   B, H, C, nkv, rank, cid, warp, lane (int), group_sync (the group barrier of the global
//   exchanges), wait_inputs() (called before the first read of activations, lengths or caches),
//   stamp(timeline, at::Stamp) (profiling; a no-op outside timeline builds).
// It leaves defined: h0, h1 (this block's rows of W_o and of the output), and, with kAsyncEx, one
// relaxed cluster arrival open (peers may still read this block's attention state): the including
// scope closes it with cluster_wait() before the block exits or reuses shared memory.
  // ---- geometry ---------------------------------------------------------------------------
  Piece pc[3];
  const int npc = qkv_pieces<Cfg>(rank, C, pc);
  int my_lo, my_hi;  // this block's cluster-local Q/K/V rows
  split_range(kRows / 16, C, rank, 16, my_lo, my_hi);
  const int nchunks = (H + p.kc - 1) / p.kc;
  // Piece i's first W_qkv row at column k0.
  auto piece_base = [&](int i, int k0) {
    return p.w_qkv + (size_t)(region_row<Cfg>(pc[i].region, cid, p.nh, nkv) + pc[i].row0) * H + k0;
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
  wait_inputs();  // hidden, residual, lengths, caches: the previous kernels' outputs
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
    if constexpr (kWindow)
      at::window_key_range(len, p.window, C, rank, k0, k1);
    else
      at::key_range(len, C, rank, k0, k1);
    // A bad sequence attends to nothing: its state stays empty (o is NaN below).
    const int k_end = ok ? k1 : k0;  // key_range ends at len
    int count;  // tiles (a window's range may start off the tiles: at::window_tiles)
    if constexpr (kWindow)
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
  stamp(p.timeline, at::kNormed);

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

  stamp(p.timeline, at::kQkv);
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
      const int t0 = kWindow ? at::window_tile_start(seq->k0[n]) : seq->k0[n];  // the first tile's key
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
  if constexpr (kQkNorm)
    if (threadIdx.x == 0) gv::prefetch_l2(p.q_norm_w, HD * sizeof(T)), gv::prefetch_l2(p.k_norm_w, HD * sizeof(T));
  // Bias for this block's rows.
  if (p.b_qkv)
    for (int e = my_lo * B + threadIdx.x; e < my_hi * B; e += kThreads) {
      const int lr = e / B;
      const int region = lr < G * HD ? 0 : lr < (G + 1) * HD ? 1 : 2;
      const int row = lr - (region == 0 ? 0 : (G + region - 1) * HD);
      res[e] += at::to_f(p.b_qkv[region_row<Cfg>(region, cid, p.nh, nkv) + row]);
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
      dsm::mbar_wait(&ex_bars[0], parity);  // the peers' rows are in `res` (acquire)
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

  stamp(p.timeline, at::kExchanged);
  // ---- QK-norm (Qwen3): every head of q and the k head RMSNormed, before RoPE ----------------
  if constexpr (kQkNorm) at::qk_norm<T, HD, G, kThreads>(res, B, p.q_norm_w, p.k_norm_w, p.eps);
  // ---- RoPE (q heads and the k head), rounding of the new k, v to the cache dtype --------------
  at::rope_and_round<T, HD, G, kThreads>(res, B, rope_cos, rope_sin);
  // ---- append k, v at row cache_lens[n]: one block per sequence, nothing for a bad sequence ---
  at::append_kv<T, HD, G, kThreads>(res, B, rank, C, seq->ok, seq->len, p.kv, cid, p.k_cache, p.v_cache);

  stamp(p.timeline, at::kAppended);
  // ---- phase 2: split-KV attention ---------------------------------------------------------------
  constexpr float kLog2e = 1.4426950408889634f;
  const float qscale = kLog2e * rsqrtf((float)HD);
  // One flat work list for all sequences (at::WorkList, built in phase 0): each warp takes a
  // contiguous run and streams its tiles without a block barrier between sequences (a loop over
  // the sequences, with two barriers and a merge each, left every warp 1-2 tiles deep per
  // sequence at batch 16).
  const at::WorkList wl = seq->work_list();
  const at::WarpRuns runs(seq->first[B], kWarps);
  at::attend_items_mma<T, HD, G, kWarps, kWindow>(p.k_cache, p.v_cache, p.kv, cid, wl, res, B, qscale, wacc, bacc,
                                                  qfrag);
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

  stamp(p.timeline, at::kAttended);
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
    clusterfuse::dsm::mbar_wait(&ex_bars[1], parity);
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

  stamp(p.timeline, at::kMerged);
  // ---- phase 3: o · W_o^T for this block's rows → the cluster's fp32 partial -----------------
  at::o_projection<T, NT, kOGemvDepth>(wo_rows, p.ks_o, xo, lay.ld2, B, H, h0, part, p.partials + (size_t)cid * B * H);

  stamp(p.timeline, at::kProjected);