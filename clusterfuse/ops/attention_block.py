"""Fused Llama-family attention block (MHA and GQA) for decoding, one Hopper kernel per layer.

``attention_block(hidden, norm_weight, w_qkv, b_qkv, w_o, cos, sin, positions, k_cache, v_cache,
cache_lens, *, num_heads, num_kv_heads, head_dim, eps, block_table=None, page_size=None,
residual=None, q_norm=None, k_norm=None, window=None, cluster_size=None, exchange=None,
block_threads=None, options=DEFAULT_KERNEL_OPTIONS, timeline=None)``, one decode token per sequence::

    x = RMSNorm(hidden) * norm_weight;  q, k, v = x @ w_qkv.T (+ b_qkv)
    q, k = RMSNorm per head (q_norm, k_norm)   [QK-norm, Qwen3: only with q_norm / k_norm]
    q, k = RoPE(q, k)
    cache row cache_lens[b] <- k, v;    o = softmax(q K^T / sqrt(hd)) V over cache_lens[b] + 1 keys
                                            (the last ``window`` of them with a sliding window)
    out = o @ w_o.T   (fp32 [B, H]),  or  residual + out  in hidden's dtype when ``residual`` is given

Same signature and math as `clusterfuse.reference.ops.attention_block` (without ``residual_partials``).

* ``hidden [B, H]`` bf16/fp16 (B ≤ 16, H a multiple of 16); weights and caches of the same dtype;
  ``w_qkv [(nh + 2 nkv) hd, H]`` (q rows, k rows, v rows: Hugging Face layout), ``w_o [H, nh hd]``;
  head_dim 64 or 128, nh / nkv in 1..8; ``nh * hd`` need not equal H (Qwen3-0.6B: 16 x 128 heads on
  hidden 1024): the Q/K/V GEMV reads H columns and the O projection nh * hd.
* ``q_norm, k_norm [hd]`` (both or neither, hidden's dtype): QK-norm, each head of q and k RMSNormed
  (``eps``) after the projection and its bias, before RoPE; runs the kernel's ``CF_ATTN_QK_NORM``
  build. ``window``: None or a positive int W, sliding-window attention (the new token at row n sees
  rows n - W + 1 .. n); runs the ``CF_ATTN_WINDOW`` build, except where W covers the cache's whole
  capacity (it hides nothing then).
* ``cos, sin`` fp32 ``[max_pos, hd / 2]`` (rotate-half RoPE; any rope kind's table).
* KV cache contiguous ``[B, nkv, capacity, hd]`` or paged ``[num_pages, nkv, page_size, hd]`` with
  ``block_table [B, max_pages]`` (page_size ≥ 16). The op writes row ``cache_lens[b]`` of each
  sequence and nothing else; it does not advance ``cache_lens``.
* ``cluster_size`` ∈ {1, 2, 4, 8, 16}; ``exchange="dsm"`` passes q, k, v and the attention
  states between the cluster's blocks through distributed shared memory, ``"global"`` through a
  global workspace (same dataflow), ``"flat"`` through the same workspace without a hardware
  cluster: C consecutive blocks of a grid launched with clusters of one block form the group and
  meet at barriers on a counter in global memory, so that the groups need not fit inside one GPC
  (the whole grid must be resident, else a ValueError). None (the default of all) lets the tuner
  time the choices once per shape, GPU and length bucket and keep the fastest (on an H200 the
  global path was faster for Llama-3-8B's clusters of 16: bench/results/exchange_tuning_h200.md);
  it times ``TUNED_EXCHANGES``: dsm and global. Flat runs only when named: it showed wrong logits
  under programmatic launches on an H200 for a reason not found yet (`FLAT_RACE`), so its launches
  are ordered and the tuner never picks it.
* ``block_threads`` ∈ {128, 256}: the kernel's block size (two builds of it). None: tuned with
  the other two (see `BLOCK_THREADS`).
* ``options``: how the kernel launches (`clusterfuse.ops.options.KernelOptions`: programmatic
  launch mode, KV prefetch into L2); results are bit-identical under every value.
* ``timeline``: profiling only (``bench/attention_timeline.py``): an int64 CUDA tensor
  ``[>= grid blocks, timeline slots]`` that the launch fills with its blocks' phase timestamps; the
  op then runs the kernel's timeline build (``CF_ATTN_TIMELINE=1``).

Deterministic: fp32 partials reduced in a fixed order, no atomics on outputs. Registered as the
custom op ``torch.ops.clusterfuse.attention_block`` (mutates the caches; capturable in CUDA graphs
— call it once eagerly first so that the tuner and workspaces are set up). Value checks of
``cache_lens``/``positions``/``block_table`` read them on the host, so they run only outside graph
capture; inside a graph, a sequence out of range writes nothing and yields NaN (the kernel guards).
One launch of this op per device at a time (its counters are shared by streams of a device).

Kernel: ``clusterfuse/kernels/attention/attention_block.cu``.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import torch

from clusterfuse.ops.kernel_abi import (
    AttentionBlockArgs,
    AttentionBlockPlan,
    AttentionBlockShape,
    AttentionBlockSpec,
    bind_attention_block,
)
from clusterfuse.ops.launch import address, raise_on_code, require_hopper
from clusterfuse.ops.options import DEFAULT_KERNEL_OPTIONS, KernelOptions
from clusterfuse.ops.tuner import TUNER, launch_candidates, seq_bucket

CLUSTER_SIZES = (1, 2, 4, 8, 16)
EXCHANGES = ("dsm", "global", "flat")
#: The exchange paths the tuner times when the caller names none (the key names them: a choice
#: cached when more were offered is timed again). Not flat: `FLAT_RACE`.
TUNED_EXCHANGES = ("dsm", "global")
#: Why the flat exchange is neither tuned nor launched programmatically. Measured on an H200,
#: teacher-forced Llama-3-8B (4 layers) with the attention pinned to flat / 16 blocks per KV head /
#: 256 threads: with programmatic mode 2 the logits were off by up to 6e-2 and differed from run to
#: run; mode 1 passed twice in one run and drifted to 2.9e-2 in another; ordered launches gave
#: 8.8e-3, bit-identical, every time. The same chain of ops alone (eager or under a graph) did not
#: reproduce it, and the cause is not found. On two H100s 24 runs of that setup, 21 of them with
#: programmatic flat launches, were all correct (bench/results/flat_pdl_race_h100.json): the race
#: may need an H200's timing or may be gone. Until it is explained, correctness comes first: flat
#: launches are ordered (`KernelOptions.flat_ordered_launch`) and flat runs only when a caller names
#: it; its reproducer is ``bench/flat_pdl_race.py``.
FLAT_RACE = "flat exchange: wrong logits under programmatic launches on an H200, cause not found"
_EXCHANGE_CODES = {"global": 0, "dsm": 1, "flat": 2}  # the kernel's enum Exchange
MAX_GROUPS = 256  # KV heads the flat exchange has barrier counters for (the kernel's kMaxGroups)
#: The kernel's block sizes, one library build each. 128 threads (4 warps) leave room for two blocks
#: per SM, so that every grid of up to twice the SMs' blocks is co-resident; 256 threads (8 warps)
#: take a whole SM (the kernel's ~254 registers per thread) and keep twice the weight and KV loads in
#: flight per block. Neither wins everywhere (H200, decode step, same run,
#: bench/results/block_threads_h200.md): 256 was 25-35% faster on the attention kernels for
#: Llama-3-8B at batch 16 and ~4% for Llama-2-7B at batch 16, but ~5% slower for Llama-2-7B at
#: batch 1. At one block per SM an H200 holds only 30 clusters of 4 and 7 of 16, so 256-thread
#: grids of 128 blocks are not co-resident and the tuner settles on 64-block ones
#: (bench/results/attention_plans_h200.json). The tuner times both; the first is the default where
#: nothing is tuned.
BLOCK_THREADS = (128, 256)
# The kernel's own default (CF_ATTN_THREADS): its library is built without the define, so it keeps
# its cache key. A constant, not BLOCK_THREADS[0]: a caller narrowing BLOCK_THREADS to (256,) got
# the 128-thread library for 256-thread launches (caught by _lib's spec check).
KERNEL_DEFAULT_THREADS = 128
HEAD_DIMS = (64, 128)
MAX_BATCH = 16
MAX_GQA = 8
MIN_PAGE_SIZE = 16
MAX_CLUSTER = 16
_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1}
#: The weight and activation dtypes the kernel is built for.
KERNEL_DTYPES = tuple(_DTYPE_CODES)
_INDEX_DTYPES = (torch.int32, torch.int64)
# ------------------------------------------------------------------------------- library
LIB_NAME, LIB_SOURCES = "attention_block", ("attention/attention_block.cu",)


def build_specs(dtype: torch.dtype, head_dim: int, gqa: int, batch: int, *, qk_norm: bool = False,
                window: bool = False) -> list[tuple[str, tuple[str, ...], dict]]:
    """``(name, sources, defines)`` of the specialisations serving these shapes (with QK-norm, with a
    sliding window), one per block size (the tuner may pick either), for
    `clusterfuse.ops.build.prebuild` (building several in parallel ahead of use)."""
    # _spec's heads / KV heads: gqa query heads per KV head.
    return [(LIB_NAME, LIB_SOURCES, _defines(*_spec(dtype, batch, gqa, 1, head_dim, threads=t, qk_norm=qk_norm,
                                                    window=window)))
            for t in BLOCK_THREADS]


def _defines(dtype_code: int, head_dim: int, gqa: int, nt: int, threads: int = KERNEL_DEFAULT_THREADS,
             timeline: bool = False, qk_norm: bool = False, window: bool = False) -> dict[str, int]:
    defines = {"CF_ATTN_DTYPE": dtype_code, "CF_ATTN_HEAD_DIM": head_dim, "CF_ATTN_GQA": gqa, "CF_ATTN_NT": nt}
    if threads != KERNEL_DEFAULT_THREADS:
        defines["CF_ATTN_THREADS"] = threads
    if timeline:
        defines["CF_ATTN_TIMELINE"] = 1
    # Only when on: the builds without them keep their defines, so their cache keys and machine code.
    if qk_norm:
        defines["CF_ATTN_QK_NORM"] = 1
    if window:
        defines["CF_ATTN_WINDOW"] = 1
    return defines


@functools.cache
def _lib(dtype_code: int, head_dim: int, gqa: int, nt: int, threads: int = KERNEL_DEFAULT_THREADS,
         timeline: bool = False, qk_norm: bool = False, window: bool = False) -> ctypes.CDLL:
    """The kernel specialised for (dtype, head_dim, GQA ratio, batch tiles, block size, profiling
    build, QK-norm, sliding window), built once."""
    from clusterfuse.ops.build import load_library

    lib = bind_attention_block(load_library(LIB_NAME, LIB_SOURCES,
                                            _defines(dtype_code, head_dim, gqa, nt, threads, timeline, qk_norm,
                                                     window)))
    spec = AttentionBlockSpec()
    lib.cf_attention_block_spec(ctypes.byref(spec))
    got = (spec.dtype, spec.head_dim, spec.gqa, spec.max_batch, spec.threads, bool(spec.timeline_slots),
           bool(spec.qk_norm), bool(spec.window))
    want = (dtype_code, head_dim, gqa, 8 * nt, threads, timeline, qk_norm, window)
    if got != want:
        raise RuntimeError(f"attention_block: library built for {got}, wanted {want}")
    lib.timeline_slots = spec.timeline_slots  # 0 unless built with CF_ATTN_TIMELINE=1
    return lib


@functools.cache
def _plan(device_index: int, spec: tuple[int, int, int, int, int, bool, bool, bool],
          dims: tuple[int, ...]) -> AttentionBlockPlan:
    """The kernel's plan (grid, shared memory, k splits) for ``dims`` = (batch, hidden, heads,
    kv_heads, cluster, exchange code) on this device (attention_block.cu, make_plan)."""
    lib = _lib(*spec)
    plan = AttentionBlockPlan()
    with torch.cuda.device(device_index):
        raise_on_code(lib.cf_attention_block_plan(ctypes.byref(AttentionBlockShape(*dims)), ctypes.byref(plan)),
                      f"attention_block(batch, hidden, heads, kv_heads, cluster, exchange = {dims})", lib,
                      lib.cf_attention_block_error)
    return plan


# ------------------------------------------------------------------------------- validation
def _tensor(name: str, t: object, *, dtypes: tuple[torch.dtype, ...] | None, shape: tuple[int | None, ...],
            device: torch.device | None) -> torch.Tensor:
    """``t`` checked (tensor, device, dtype, shape with None = any, contiguous, 16-byte aligned)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda" or (device is not None and t.device != device):
        raise ValueError(f"{name}: expected a tensor on {device or 'a CUDA device'}, got {t.device}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape, strict=True)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name}: expected shape [{want}], got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")
    if t.data_ptr() % 16:
        raise ValueError(f"{name}: data must be 16-byte aligned")
    return t


def _positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return v


def check_model_shape(hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[int, int, int]:
    """The kernel's rules on a model's dimensions (no tensors, no GPU): ValueError naming the first one it
    does not take; returns ``(num_heads, num_kv_heads, head_dim)``."""
    if hidden_size < 16 or hidden_size % 16:
        raise ValueError(f"hidden: hidden size must be a positive multiple of 16, got {hidden_size}")
    nh, nkv, hd = (_positive_int(n, v) for n, v in
                   (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)))
    if nh % nkv or not 1 <= nh // nkv <= MAX_GQA:
        raise ValueError(f"num_kv_heads: num_heads / num_kv_heads must be an integer in 1..{MAX_GQA}, "
                         f"got {nh} / {nkv}")
    if hd not in HEAD_DIMS:
        raise ValueError(f"head_dim: expected one of {HEAD_DIMS}, got {hd}")
    return nh, nkv, hd


def _validate(hidden, norm_weight, w_qkv, b_qkv, w_o, cos, sin, positions, k_cache, v_cache, cache_lens,
              num_heads, num_kv_heads, head_dim, eps, block_table, page_size, residual, cluster_size,
              exchange, block_threads=None, q_norm=None, k_norm=None, window=None) -> None:
    """Every check that needs no device → host copy; raises ValueError naming the argument."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError("hidden: expected a 2-D tensor [batch, hidden]")
    if hidden.dtype not in _DTYPE_CODES:
        raise ValueError(f"hidden: expected dtype bfloat16 or float16, got {hidden.dtype}")
    b, h = hidden.shape
    dev = _tensor("hidden", hidden, dtypes=None, shape=(b, h), device=None).device
    require_hopper("hidden", dev, "attention")
    if not 1 <= b <= MAX_BATCH:
        raise ValueError(f"hidden: batch must be in [1, {MAX_BATCH}], got {b}")
    nh, nkv, hd = check_model_shape(h, num_heads, num_kv_heads, head_dim)
    dt = (hidden.dtype,)
    _tensor("norm_weight", norm_weight, dtypes=dt, shape=(h,), device=dev)
    qkv_rows = (nh + 2 * nkv) * hd
    _tensor("w_qkv", w_qkv, dtypes=dt, shape=(qkv_rows, h), device=dev)
    if b_qkv is not None:
        _tensor("b_qkv", b_qkv, dtypes=dt, shape=(qkv_rows,), device=dev)
    _tensor("w_o", w_o, dtypes=dt, shape=(h, nh * hd), device=dev)
    max_pos = _tensor("cos", cos, dtypes=(torch.float32,), shape=(None, hd // 2), device=dev).shape[0]
    if max_pos < 1:
        raise ValueError("cos: the table has no positions")
    _tensor("sin", sin, dtypes=(torch.float32,), shape=(max_pos, hd // 2), device=dev)
    _tensor("positions", positions, dtypes=_INDEX_DTYPES, shape=(b,), device=dev)
    _tensor("cache_lens", cache_lens, dtypes=_INDEX_DTYPES, shape=(b,), device=dev)
    if block_table is None:
        if page_size is not None:
            raise ValueError("page_size: only meaningful with block_table (paged cache)")
        _tensor("k_cache", k_cache, dtypes=dt, shape=(b, nkv, None, hd), device=dev)
        if k_cache.shape[2] < 1:
            raise ValueError("k_cache: capacity must be at least 1")
    else:
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < MIN_PAGE_SIZE:
            raise ValueError(f"page_size: expected an int >= {MIN_PAGE_SIZE} with block_table, got {page_size!r}")
        _tensor("k_cache", k_cache, dtypes=dt, shape=(None, nkv, page_size, hd), device=dev)
        _tensor("block_table", block_table, dtypes=_INDEX_DTYPES, shape=(b, None), device=dev)
        if block_table.shape[1] < 1 or k_cache.shape[0] < 1:
            raise ValueError("block_table: needs at least one page per sequence and a non-empty cache")
    _tensor("v_cache", v_cache, dtypes=dt, shape=tuple(k_cache.shape), device=dev)
    if residual is not None:
        _tensor("residual", residual, dtypes=dt, shape=(b, h), device=dev)
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm: QK-norm needs both q_norm and k_norm (or neither)")
    if q_norm is not None:
        _tensor("q_norm", q_norm, dtypes=dt, shape=(hd,), device=dev)
        _tensor("k_norm", k_norm, dtypes=dt, shape=(hd,), device=dev)
    if window is not None:
        _positive_int("window", window)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps: expected a positive float, got {eps!r}")
    if cluster_size is not None and cluster_size not in CLUSTER_SIZES:
        raise ValueError(f"cluster_size: expected one of {CLUSTER_SIZES} or None, got {cluster_size!r}")
    if exchange is not None and exchange not in EXCHANGES:
        raise ValueError(f"exchange: expected one of {EXCHANGES} or None, got {exchange!r}")
    if exchange == "flat" and nkv > MAX_GROUPS:
        raise ValueError(f"exchange: 'flat' serves at most {MAX_GROUPS} KV heads, got {nkv}")
    if block_threads is not None and (isinstance(block_threads, bool) or block_threads not in BLOCK_THREADS):
        raise ValueError(f"block_threads: expected one of {BLOCK_THREADS} or None, got {block_threads!r}")


def _check_values(cos, positions, k_cache, cache_lens, block_table, page_size) -> int:
    """Range checks of the index tensors (one device → host copy); returns the longest length.
    Raises before anything is launched, so a bad call writes nothing."""
    lens = cache_lens.tolist()
    pos = positions.tolist()
    if block_table is None:
        capacity = k_cache.shape[2]
    else:
        capacity = block_table.shape[1] * page_size
    for b, n in enumerate(lens):
        if not 0 <= n < capacity:
            raise ValueError(f"cache_lens: sequence {b} has {n} cached rows; the new token needs row {n} "
                             f"< capacity {capacity}")
    for b, p in enumerate(pos):
        if not 0 <= p < cos.shape[0]:
            raise ValueError(f"positions: sequence {b} is at position {p}, outside the rope table "
                             f"[0, {cos.shape[0]})")
    if block_table is not None:
        pages = block_table.tolist()
        for b, n in enumerate(lens):
            used = pages[b][: n // page_size + 1]
            if any(not 0 <= pg < k_cache.shape[0] for pg in used):
                raise ValueError(f"block_table: row {b} names a page outside [0, {k_cache.shape[0]}) "
                                 f"among its first {len(used)} pages")
    return max(lens)


# ------------------------------------------------------------------------------- launching
_state_lock = threading.Lock()
_counters: dict[int, torch.Tensor] = {}
_last_bucket: dict[tuple, int] = {}  # shape key → length bucket of the last eager call


def _device_state(device: torch.device) -> torch.Tensor:
    """Per-device int32 [1 + MAX_CLUSTER + 1 + MAX_GROUPS]: grid-barrier counter, per-rank arrival
    counters, the kernel's out-of-range flag, and the flat exchange's per-group barrier counters
    (counters are zero once and left at zero by every launch)."""
    with _state_lock:
        if device.index not in _counters:
            _counters[device.index] = torch.zeros(MAX_CLUSTER + 2 + MAX_GROUPS, dtype=torch.int32, device=device)
        return _counters[device.index]


def _spec(dtype: torch.dtype, batch: int, num_heads: int, num_kv_heads: int, head_dim: int,
          threads: int = KERNEL_DEFAULT_THREADS, timeline: bool = False, qk_norm: bool = False,
          window: bool = False) -> tuple[int, int, int, int, int, bool, bool, bool]:
    """The library serving these shapes: (dtype code, head_dim, GQA ratio, batch tiles, block size,
    timeline build, QK-norm build, window build)."""
    return (_DTYPE_CODES[dtype], head_dim, num_heads // num_kv_heads, 1 if batch <= 8 else 2, threads, timeline,
            qk_norm, window)


def _launch(hidden, norm_weight, w_qkv, b_qkv, w_o, cos, sin, positions, k_cache, v_cache, cache_lens,
            block_table, residual, out, num_heads, num_kv_heads, head_dim, page_size, eps, cluster, exchange, threads,
            kv_prefetch_keys, launch_mode, timeline, q_norm, k_norm, window) -> None:
    b, h = hidden.shape
    spec = _spec(hidden.dtype, b, num_heads, num_kv_heads, head_dim, threads, timeline is not None,
                 q_norm is not None, window > 0)
    lib = _lib(*spec)
    dims = (b, h, num_heads, num_kv_heads, cluster, _EXCHANGE_CODES[exchange])
    plan = _plan(hidden.device.index, spec, dims)
    gqa = spec[2]
    dev = hidden.device
    # Scratch from the caching allocator (graph-safe): fp32 O-proj partials, exchange workspaces.
    partials = torch.empty(num_kv_heads * b * h, dtype=torch.float32, device=dev)
    ws_qkv = ws_attn = None
    if exchange != "dsm":
        ws_qkv = torch.empty(num_kv_heads * (gqa + 2) * head_dim * b, dtype=torch.float32, device=dev)
        state_floats = -(-b * gqa * (head_dim + 2) // 4) * 4  # per-block softmax state, 16-byte aligned slots
        ws_attn = torch.empty(num_kv_heads * cluster * state_floats, dtype=torch.float32, device=dev)
    state = _device_state(dev)
    cache_lens = cache_lens.to(torch.int32)  # the tensor itself when it is int32 already
    block_table = None if block_table is None else block_table.to(torch.int32)
    if block_table is None:
        page, max_pages, num_pages = k_cache.shape[2], 1, b
    else:
        page, max_pages, num_pages = page_size, block_table.shape[1], k_cache.shape[0]

    p = address
    _check_timeline(timeline, lib, num_kv_heads * cluster, dev)
    args = AttentionBlockArgs(
        shape=AttentionBlockShape(*dims), hidden=p(hidden), norm_w=p(norm_weight), w_qkv=p(w_qkv), b_qkv=p(b_qkv),
        w_o=p(w_o), cos=p(cos), sin=p(sin), positions=p(positions), k_cache=p(k_cache), v_cache=p(v_cache),
        cache_lens=p(cache_lens), block_table=p(block_table), residual=p(residual), out=p(out), partials=p(partials),
        ws_qkv=p(ws_qkv), ws_attn=p(ws_attn), counters=state.data_ptr(),
        error=state.data_ptr() + 4 * (MAX_CLUSTER + 1), group_counters=state.data_ptr() + 4 * (MAX_CLUSTER + 2),
        timeline=p(timeline), max_pos=cos.shape[0], positions_int64=int(positions.dtype == torch.int64),
        page_size=page, max_pages=max_pages, num_pages=num_pages, kv_prefetch_keys=kv_prefetch_keys,
        launch_mode=launch_mode, eps=float(eps), q_norm_w=p(q_norm), k_norm_w=p(k_norm), window=window)
    stream = torch.cuda.current_stream(dev).cuda_stream
    raise_on_code(lib.cf_attention_block_launch(ctypes.byref(args), ctypes.byref(plan), stream),
                  "attention_block launch", lib, lib.cf_attention_block_error)


def kernel_window(window: int | None, k_cache: torch.Tensor, block_table: torch.Tensor | None,
                  page_size: int | None) -> int:
    """The window the kernel is launched with: ``window``, or 0 (none: the build without the window)
    where no row can fall out of it, a window of at least the cache's capacity (the new token sits at
    row < capacity and sees rows > row - window, so every row from 0)."""
    capacity = k_cache.shape[2] if block_table is None else block_table.shape[1] * page_size
    return 0 if window is None or window >= capacity else window


def tuned_candidates(cluster_size: int | None, exchange: str | None,
                     block_threads: int | None) -> list[tuple[int, str, int]]:
    """The (cluster size, exchange, block threads) launches the tuner times: every combination of
    `CLUSTER_SIZES`, `TUNED_EXCHANGES` and `BLOCK_THREADS`, each axis the caller fixed kept fixed
    (the flat exchange only when the caller names it)."""
    threads = (block_threads,) if block_threads is not None else BLOCK_THREADS
    return [(c, x, t) for c, x in launch_candidates(cluster_size, exchange, CLUSTER_SIZES, TUNED_EXCHANGES)
            for t in threads]


def _check_timeline(t: torch.Tensor | None, lib: ctypes.CDLL, blocks: int, device: torch.device) -> None:
    """The ``timeline`` buffer checked against this launch (None: not profiling)."""
    if t is None:
        return
    want = (blocks, lib.timeline_slots)
    if (t.dtype != torch.int64 or t.device != device or t.dim() != 2 or t.shape[0] < want[0]
            or t.shape[1] != want[1] or not t.is_contiguous()):
        raise ValueError(f"timeline: expected a contiguous int64 tensor on {device} of shape [>= {want[0]}, "
                         f"{want[1]}], got {tuple(t.shape)} {t.dtype} on {t.device}")


@torch.library.custom_op("clusterfuse::attention_block", mutates_args=("k_cache", "v_cache", "timeline"))
def _attention_block_op(hidden: torch.Tensor, norm_weight: torch.Tensor, w_qkv: torch.Tensor,
                        b_qkv: torch.Tensor | None, w_o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        cache_lens: torch.Tensor, block_table: torch.Tensor | None, residual: torch.Tensor | None,
                        num_heads: int, num_kv_heads: int, head_dim: int, page_size: int, eps: float,
                        cluster_size: int, exchange: str, block_threads: int, kv_prefetch_keys: int,
                        launch_mode: int, timeline: torch.Tensor | None, q_norm: torch.Tensor | None,
                        k_norm: torch.Tensor | None, window: int) -> torch.Tensor:
    out = torch.empty(hidden.shape, dtype=hidden.dtype if residual is not None else torch.float32,
                      device=hidden.device)
    with torch.cuda.device(hidden.device):
        _launch(hidden, norm_weight, w_qkv, b_qkv, w_o, cos, sin, positions, k_cache, v_cache, cache_lens,
                block_table, residual, out, num_heads, num_kv_heads, head_dim, page_size, eps, cluster_size,
                exchange, block_threads, kv_prefetch_keys, launch_mode, timeline, q_norm, k_norm, window)
    return out


@_attention_block_op.register_fake
def _(hidden, norm_weight, w_qkv, b_qkv, w_o, cos, sin, positions, k_cache, v_cache, cache_lens, block_table,
      residual, num_heads, num_kv_heads, head_dim, page_size, eps, cluster_size, exchange, block_threads,
      kv_prefetch_keys, launch_mode, timeline, q_norm, k_norm, window):
    return hidden.new_empty(hidden.shape, dtype=hidden.dtype if residual is not None else torch.float32)


def default_cluster_size(num_kv_heads: int, device: torch.device) -> int:
    """Largest cluster size whose grid (one cluster per KV head) still fits one block per SM."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    fitting = [c for c in CLUSTER_SIZES if num_kv_heads * c <= sms]
    return fitting[-1] if fitting else 1


def attention_block(hidden: torch.Tensor, norm_weight: torch.Tensor, w_qkv: torch.Tensor,
                    b_qkv: torch.Tensor | None, w_o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cache_lens: torch.Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int, eps: float,
                    block_table: torch.Tensor | None = None, page_size: int | None = None,
                    residual: torch.Tensor | None = None, q_norm: torch.Tensor | None = None,
                    k_norm: torch.Tensor | None = None, window: int | None = None,
                    cluster_size: int | None = None, exchange: str | None = None, block_threads: int | None = None,
                    options: KernelOptions = DEFAULT_KERNEL_OPTIONS,
                    timeline: torch.Tensor | None = None) -> torch.Tensor:
    """Fused attention block; see the module docstring. Raises ValueError naming the bad argument."""
    if not isinstance(options, KernelOptions):
        raise ValueError(f"options: expected a KernelOptions, got {type(options).__name__}")
    if cluster_size is None and exchange is None and block_threads is None and options.attention_launch:
        cluster_size, exchange, block_threads = options.attention_launch
    _validate(hidden, norm_weight, w_qkv, b_qkv, w_o, cos, sin, positions, k_cache, v_cache, cache_lens,
              num_heads, num_kv_heads, head_dim, eps, block_table, page_size, residual, cluster_size, exchange,
              block_threads, q_norm, k_norm, window)
    window = kernel_window(window, k_cache, block_table, page_size)
    if timeline is not None and not isinstance(timeline, torch.Tensor):
        raise ValueError(f"timeline: expected a torch.Tensor or None, got {type(timeline).__name__}")
    b, h = hidden.shape
    shape_key = (str(hidden.dtype).removeprefix("torch."), h, num_heads, num_kv_heads, head_dim, b,
                 block_table is not None, exchange, q_norm is not None, window > 0)
    if torch.cuda.is_current_stream_capturing():
        bucket = _last_bucket.get(shape_key, seq_bucket(1))
    else:
        bucket = seq_bucket(_check_values(cos, positions, k_cache, cache_lens, block_table, page_size) + 1)
        _last_bucket[shape_key] = bucket
    def run(c: int, x: str, t: int):
        return _attention_block_op(hidden, norm_weight, w_qkv, b_qkv, w_o, cos, sin, positions, k_cache, v_cache,
                                   cache_lens, block_table, residual, num_heads, num_kv_heads, head_dim,
                                   page_size or 0, float(eps), c, x, t, options.kv_prefetch_keys,
                                   options.launch_mode("attention", x), timeline, q_norm, k_norm, window)

    if cluster_size is None or exchange is None or block_threads is None:
        # Tuning replays the op: it rewrites the same k, v into the same cache rows (idempotent).
        fields = dict(zip(("dtype", "hidden", "heads", "kv_heads", "head_dim", "batch", "paged", "exchange"),
                          shape_key[:8], strict=True))
        key = TUNER.make_key("attention_block", hidden.device,
                             {**fields, "cluster": cluster_size, "threads": block_threads, "seq_bucket": bucket,
                              **({"tuned": "+".join(TUNED_EXCHANGES)} if exchange is None else {}),
                              **({"kv_prefetch_keys": options.kv_prefetch_keys}
                                 if options.kv_prefetch_keys != DEFAULT_KERNEL_OPTIONS.kv_prefetch_keys else {}),
                              **({"timeline": 1} if timeline is not None else {}),
                              # Only when on: the keys of the builds without them stay as they were.
                              **({"qk_norm": 1} if q_norm is not None else {}),
                              **({"window": 1} if window > 0 else {})})
        candidates = tuned_candidates(cluster_size, exchange, block_threads)
        default = (cluster_size or default_cluster_size(num_kv_heads, hidden.device), exchange or TUNED_EXCHANGES[0],
                   block_threads or BLOCK_THREADS[0])
        cluster_size, exchange, block_threads = TUNER.choose(
            "attention_block", key, candidates, lambda cxt: (lambda: run(*cxt)), default=default)
    return run(cluster_size, exchange, block_threads)


def launch_plan(dtype: torch.dtype, batch: int, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int,
                cluster_size: int, exchange: str, block_threads: int, *, device: torch.device,
                qk_norm: bool = False, window: bool = False) -> AttentionBlockPlan:
    """The kernel's plan for these launch choices on ``device`` (cached): what the persistent decode
    step (`clusterfuse.ops.decode_step`) takes over, so that it partitions its attention phases as
    this kernel does. ValueError (naming the shapes) where the kernel refuses them."""
    spec = _spec(dtype, batch, num_heads, num_kv_heads, head_dim, block_threads, qk_norm=qk_norm, window=window)
    return _plan(device.index, spec, (batch, hidden, num_heads, num_kv_heads, cluster_size, _EXCHANGE_CODES[exchange]))
