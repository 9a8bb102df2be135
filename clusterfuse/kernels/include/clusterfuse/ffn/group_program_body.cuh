// clusterfuse/ffn/group_program_body.cuh — NOT a self-contained header: the statements of the
// fused FFN block's program for one slice of the intermediate dimension on one block of its
// cluster (the norm, the gate/up GEMV, SiLU·up, the activation exchange, the down GEMV into the
// cluster's fp32 partial p.partials + cid·B·H), included inside the body of the function that runs
// them: the per-block kernel (kernels/ffn/ffn_block.cu) and the persistent decode step
// (kernels/step/decode_step.cu). One implementation of each phase; the per-block kernel keeps the
// machine code it had when these lines were its own (tools/compare_machine_code.sh), which a
// function taking the parameters by reference does not (see attention/group_program_body.cuh).
//
// The including scope defines: T, NT, kDsm (the exchange), kThreads, kWarps, kGemvDepth,
// kL2PrefetchSteps; Layout (ffn::BlockLayout); gv, cg; split_range, from_f, to_f, Pack8; p (ffn::FfnParams of this layer), smem (dynamic
// shared memory), B, H, I, C, rank, cid (this cluster's slice), NC (slices), warp (int);
// wait_inputs() (called before the first read of x); stamp(ffn::Stamp) (profiling; a no-op outside
// timeline builds).
// It leaves defined h0, h1 (this block's rows of the partial) and, with kDsm, one cluster arrival
// open (peers may still be receiving this block's piece): the including scope closes it with
// cluster_wait() before the block exits or reuses shared memory.
  const Layout lay(B, H, p.lmax, C);

  // ---- geometry ---------------------------------------------------------------------------
  int i0, i1, r0, r1, h0, h1;
  split_range(I / 8, NC, cid, 8, i0, i1);  // this cluster's slice of I
  const int L = i1 - i0;
  split_range(L / 8, C, rank, 8, r0, r1);  // this block's rows of the slice (phase 1)
  split_range(H, C, rank, 1, h0, h1);      // this block's rows of W_down (phase 2)
  const int rows1 = r1 - r0;

  const T* wgu = static_cast<const T*>(p.w_gate_up);
  gv::WeightRows<T> w1{{wgu + (size_t)(i0 + r0) * H, wgu + (size_t)(I + i0 + r0) * H, nullptr, nullptr},
                       2, rows1, H, H};
  gv::WeightRows<T> w2{{static_cast<const T*>(p.w_down) + (size_t)h0 * I + i0, nullptr, nullptr, nullptr},
                       1, h1 - h0, I, L};

  T* xs = reinterpret_cast<T*>(smem);
  T* act = reinterpret_cast<T*>(smem + lay.off_act);
  float* res = reinterpret_cast<float*>(smem + lay.off_res);
  float* part = reinterpret_cast<float*>(smem + lay.off_part);

  // ---- phase 0: prefetch the first phase-1 weights, then RMSNorm -----------------------------
  // The prefetches are hints: they may run before the previous kernel has finished (programmatic
  // launch, pdl.cuh); x and the residual are its outputs.
  gv::warp_prefetch_first(w1, p.ksplit1, warp, kL2PrefetchSteps / 2);
  wait_inputs();  // x is the previous kernel's output (programmatic launch, pdl.cuh)
  // res (>= 16 B floats: rows_max >= 8) is scratch until phase 1 writes it: sums, then rstd.
  static_assert(kWarps + 1 <= 16, "the norm's scratch must fit in res");
  clusterfuse::ffn::norm_x<T, kThreads>(static_cast<const T*>(p.x), static_cast<const T*>(p.norm_w), B, H, p.eps, res,
                                        xs, lay.ld1);
  __syncthreads();
  stamp(clusterfuse::ffn::kStampNormed);

  // ---- phase 1: gate and up rows of this block → res[row][n] (fp32) --------------------------
  clusterfuse::ffn::gate_up_gemv<T, NT, kGemvDepth>(w1, p.ksplit1, xs, lay.ld1, B, part, res);
  // Next weights do not depend on the activations: start streaming them before waiting.
  gv::warp_prefetch_first(w2, p.ksplit2, warp, kL2PrefetchSteps);
  __syncthreads();
  stamp(clusterfuse::ffn::kStampGateUp);
  if constexpr (kDsm) {
    // xs is dead: its region becomes the gather's scratch. Initialise the mbarriers there and
    // tell the cluster (release, after a proxy fence: peers' bulk copies may land in it as soon
    // as they pass the matching wait); the wait comes only before the gather.
    clusterfuse::ffn::gather_act_any<kThreads, T>(C, smem, nullptr, nullptr, lay, B, 0, true);
    clusterfuse::dsm::fence_proxy_async_shared();
    clusterfuse::dsm::cluster_arrive();
  }

  // ---- act = silu(g)·u for this block's rows, 8 consecutive rows (16 bytes) per thread --------
  T* tile = reinterpret_cast<T*>(smem + lay.off_tile);
  T* act_ws = kDsm ? nullptr : static_cast<T*>(p.act_ws) + (size_t)cid * B * p.lmax;
  for (int e = threadIdx.x; e < (rows1 / 8) * B; e += kThreads) {
    const int n = e / (rows1 / 8), r = (e - n * (rows1 / 8)) * 8;
    Pack8 o;
    o.u = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float g = res[(r + i) * B + n], u = res[(rows1 + r + i) * B + n];
      o.at<T>(i) = from_f<T>(g / (1.f + __expf(-g)) * u);
    }
    if constexpr (kDsm)
      *reinterpret_cast<uint4*>(tile + n * lay.rows_max + r) = o.u;
    else
      *reinterpret_cast<uint4*>(act_ws + (size_t)n * p.lmax + r0 + r) = o.u;
  }
  if constexpr (kDsm) {
    clusterfuse::dsm::cluster_wait();  // every block is past phase 1, its mbarriers initialised
    clusterfuse::ffn::gather_act_any<kThreads, T>(C, smem, tile, act, lay, B, L, false);
    // Peers may still be receiving our copies: the matching wait is at the very end.
    clusterfuse::dsm::cluster_arrive();
  } else {
    __threadfence();
    cg::this_cluster().sync();  // release/acquire at cluster scope: every piece is in the workspace
    for (int e = threadIdx.x; e < (L / 8) * B; e += kThreads) {
      const int n = e / (L / 8), k = (e - n * (L / 8)) * 8;
      *reinterpret_cast<uint4*>(act + n * lay.ld2 + k) =
          __ldcg(reinterpret_cast<const uint4*>(act_ws + (size_t)n * p.lmax + k));
    }
    __syncthreads();
  }
  stamp(clusterfuse::ffn::kStampGathered);

  // ---- phase 2: this block's W_down rows × the cluster's activation slice → partial y_c ------
  float* yc = p.partials + (size_t)cid * B * H;
  clusterfuse::ffn::down_gemv<T, NT, kGemvDepth>(w2, p.ksplit2, act, lay.ld2, B, H, h0, part, yc);
  stamp(clusterfuse::ffn::kStampDown);
