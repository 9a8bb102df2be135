"""Fused MLA decode block of DeepSeek-V2-Lite (absorbed multi-head latent attention), one Hopper
kernel per layer.

``mla_block(hidden, norm_weight, weights, cos, sin, positions, latent_cache, cache_lens, *, eps,
softmax_scale, block_table=None, page_size=None, residual=None, cluster_size=None,
options=DEFAULT_KERNEL_OPTIONS)``, one decode token per sequence, matches
`clusterfuse.reference.mla.mla_self_attention` on ``RMSNorm(hidden)``::

    x = RMSNorm(hidden) * norm_weight;   q = x W_q^T;   [c | k_pe] = x W_kv_a^T
    cache row cache_lens[b] <- [RMSNorm(c) * kv_a_norm | RoPE(k_pe)]          (the cache dtype)
    q_abs_h = [q_nope_h W_UK_h | RoPE(q_pe_h)]; o_h = W_UV_h softmax(scale q_abs_h . rows) rows[:, :rank]
    out = [o_1 .. o_nh] W_o^T   (fp32 [B, H]),  or  residual + out  in hidden's dtype with ``residual``

over rows ``0 .. cache_lens[b]`` of the latent cache (the new row included). RoPE is interleaved
(DeepSeek's pair layout) with the fp32 tables of `clusterfuse.reference.rope.rope_cos_sin` (YaRN's
attention factor is in them); ``softmax_scale`` is ``qk_head_dim ** -0.5 *
yarn_softmax_scale_factor(rope)``, as `DeepseekV2ReferenceModel.softmax_scale`.

* ``hidden [B, H]`` bf16/fp16 (B ≤ 16, H a multiple of 16); ``norm_weight [H]``; ``weights``: an
  `MlaBlockWeights` from `prepare_mla_weights` (once, at load), of hidden's dtype. The build is
  DeepSeek-V2-Lite's attention: 16 heads, kv_lora_rank 512, rope 64, nope 128, v 128, no q LoRA.
* ``latent_cache``: contiguous ``[B, capacity, 576]`` (sequence ``b`` owns ``latent_cache[b]``) or
  paged ``[num_pages, page_size, 576]`` with ``block_table [B, max_pages]`` (the layout of
  `clusterfuse.engine.paged_cache.PagedKVCache.for_latent`): row ``r`` of sequence ``b`` is
  ``latent_cache[block_table[b, r // page_size], r % page_size]``. The op writes row
  ``cache_lens[b]`` of each sequence and nothing else; it does not advance ``cache_lens``.
* ``cluster_size`` ∈ {1, 2, 4, 8, 16}: blocks per cluster of the attention phase's state merge
  (ClusterReduce). None: the tuner times them once per shape, GPU and length bucket.
* ``key_loop``: the attention phase's key loop, ``"simt"`` (fp32 on CUDA cores, the default) or
  ``"mma"`` (tensor cores, q and p as two 2-byte parts each; another build, not bit-identical to
  the other). Only named: the tuner never switches it (see `KEY_LOOPS`).
* ``options`` (`clusterfuse.ops.options.KernelOptions`): accepted for the common signature of the
  fused ops; this kernel launches ordered whatever its programmatic mode says (it has no early
  release yet), and results are the same under every value.

Deterministic: fixed reduction orders, no atomics on outputs. Registered as the custom op
``torch.ops.clusterfuse.mla_block`` (mutates the latent cache; capturable in CUDA graphs — call it
once eagerly first so that the tuner and the barrier counter are set up). Value checks of
``cache_lens``/``positions``/``block_table`` read them on the host outside graph capture; inside a
graph a sequence out of range writes nothing and yields NaN. One launch of this op per device at a
time (its barrier counter is shared by the device's streams).

Kernel: ``clusterfuse/kernels/mla/mla_block.cu``.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass
from typing import Protocol

import torch

from clusterfuse.ops.kernel_abi import MlaBlockArgs, MlaBlockPlan, MlaBlockShape, MlaBlockSpec, bind_mla_block
from clusterfuse.ops.launch import address, raise_on_code, require_cuda_tensor, require_hopper
from clusterfuse.ops.options import DEFAULT_KERNEL_OPTIONS, KernelOptions
from clusterfuse.ops.tuner import TUNER, seq_bucket

CLUSTER_SIZES = (1, 2, 4, 8, 16)
#: The attention phase's key loops (builds). "simt" is the default; "mma" runs only when named until
#: a GPU run has shown it correct and faster (written before any GPU run of either).
KEY_LOOPS = ("simt", "mma")
DEFAULT_CLUSTER_SIZE = 4  # used only while capturing a graph with no tuned choice
MAX_BATCH = 16
#: The MLA dimensions the kernel is built for (DeepSeek-V2-Lite): heads, kv_lora_rank,
#: qk_nope_head_dim, qk_rope_head_dim, v_head_dim.
NUM_HEADS, KV_LORA_RANK, QK_NOPE_HEAD_DIM, QK_ROPE_HEAD_DIM, V_HEAD_DIM = 16, 512, 128, 64, 128
LATENT_DIM = KV_LORA_RANK + QK_ROPE_HEAD_DIM
PROJ_ROWS = NUM_HEADS * (QK_NOPE_HEAD_DIM + QK_ROPE_HEAD_DIM) + LATENT_DIM
_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1}
_INDEX_DTYPES = (torch.int32, torch.int64)
LIB_NAME, LIB_SOURCES = "mla_block", ("mla/mla_block.cu",)


class MLADims(Protocol):
    """The MLA fields of a model config (`clusterfuse.models.config.MLAConfig`; ops sit below models,
    so they name what they read instead of importing it)."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None


class MLALayerWeights(Protocol):
    """One layer's MLA weights with Hugging Face shapes (`clusterfuse.reference.mla.MLAWeights`)."""

    w_kv_a: torch.Tensor
    kv_a_norm: torch.Tensor
    w_kv_b: torch.Tensor
    w_o: torch.Tensor
    w_q: torch.Tensor | None
    b_kv_a: torch.Tensor | None
    b_q_a: torch.Tensor | None
    b_o: torch.Tensor | None


@dataclass(frozen=True)
class MlaBlockWeights:
    """One layer's MLA weights packed for the kernel (see `prepare_mla_weights`)."""

    w_qa: torch.Tensor  # [nh * (nope + rope) + rank + rope, H]: q_proj rows, then kv_a_proj_with_mqa rows
    kv_a_norm: torch.Tensor  # [rank]
    w_uk: torch.Tensor  # [nh, nope, rank]: kv_b_proj's key rows of each head
    w_uv: torch.Tensor  # [nh, v, rank]: kv_b_proj's value rows of each head
    w_o: torch.Tensor  # [H, nh * v]


def check_model_shape(hidden_size: int, num_heads: int, mla: MLADims) -> None:
    """The kernel's rules on a model's MLA dimensions (no tensors, no GPU): ValueError naming the first
    one it does not take."""
    dims = (num_heads, mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim)
    want = (NUM_HEADS, KV_LORA_RANK, QK_NOPE_HEAD_DIM, QK_ROPE_HEAD_DIM, V_HEAD_DIM)
    if dims != want:
        raise ValueError(f"mla: the kernel is built for (heads, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, "
                         f"v_head_dim) = {want} (DeepSeek-V2-Lite), got {dims}")
    if mla.q_lora_rank is not None:
        raise ValueError("mla.q_lora_rank: the kernel takes a plain q_proj (DeepSeek-V2-Lite), not a q LoRA")
    if hidden_size < 16 or hidden_size % 16:
        raise ValueError(f"hidden: hidden size must be a positive multiple of 16, got {hidden_size}")


def prepare_mla_weights(w: MLALayerWeights, mla: MLADims, num_heads: int) -> MlaBlockWeights:
    """The kernel's weights from the reference's (Hugging Face shapes), once at load: the q and
    KV-down projections stacked into one GEMV, ``kv_b_proj`` split per head into its key rows
    (W_UK, absorbed into the query) and value rows (W_UV, applied after attention). Contiguous
    tensors (new ones, or the inputs where already contiguous) in the weights' dtype and device.
    ValueError for what the kernel does not build."""
    fields = ("w_kv_a", "kv_a_norm", "w_kv_b", "w_o", "w_q", "b_kv_a", "b_q_a", "b_o")
    if not all(hasattr(w, f) for f in fields):
        raise ValueError(f"w: expected MLA weights (clusterfuse.reference.mla.MLAWeights), got {type(w).__name__}")
    if w.w_q is None:
        raise ValueError("w: the kernel takes a plain q_proj (DeepSeek-V2-Lite), not a q LoRA")
    check_model_shape(w.w_q.shape[1], num_heads, mla)
    for name in ("b_kv_a", "b_q_a", "b_o"):
        if getattr(w, name) is not None:
            raise ValueError(f"w: {name}: attention biases are not supported by the kernel")
    hidden = w.w_q.shape[1]
    qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    shapes = {"w_q": (w.w_q, (num_heads * qk, hidden)), "w_kv_a": (w.w_kv_a, (LATENT_DIM, hidden)),
              "kv_a_norm": (w.kv_a_norm, (KV_LORA_RANK,)),
              "w_kv_b": (w.w_kv_b, (num_heads * (QK_NOPE_HEAD_DIM + V_HEAD_DIM), KV_LORA_RANK)),
              "w_o": (w.w_o, (hidden, num_heads * V_HEAD_DIM))}
    for name, (t, shape) in shapes.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"w.{name}: expected shape {list(shape)}, got {list(t.shape)}")
        if t.dtype != w.w_q.dtype or t.device != w.w_q.device:
            raise ValueError(f"w.{name}: expected {w.w_q.dtype} on {w.w_q.device} like w_q, "
                             f"got {t.dtype} on {t.device}")
    kv_b = w.w_kv_b.view(num_heads, QK_NOPE_HEAD_DIM + V_HEAD_DIM, KV_LORA_RANK)
    return MlaBlockWeights(w_qa=torch.cat([w.w_q, w.w_kv_a]).contiguous(), kv_a_norm=w.kv_a_norm.contiguous(),
                           w_uk=kv_b[:, :QK_NOPE_HEAD_DIM].contiguous(), w_uv=kv_b[:, QK_NOPE_HEAD_DIM:].contiguous(),
                           w_o=w.w_o.contiguous())


# ------------------------------------------------------------------------------- library
def build_specs(dtype: torch.dtype, batch: int) -> list[tuple[str, tuple[str, ...], dict]]:
    """``(name, sources, defines)`` of the builds serving this dtype and batch, one per cluster size
    (the tuner may pick any), for `clusterfuse.ops.build.prebuild`."""
    nt = 1 if batch <= 8 else 2
    return [(LIB_NAME, LIB_SOURCES, _defines(_DTYPE_CODES[dtype], nt, c, mma)) for mma in (0, 1) for c in CLUSTER_SIZES]


def _defines(dtype_code: int, nt: int, cluster: int, key_mma: int) -> dict[str, int]:
    defines = {"CF_MLA_DTYPE": dtype_code, "CF_MLA_NT": nt, "CF_MLA_CLUSTER": cluster}
    if key_mma:
        defines["CF_MLA_KEY_MMA"] = 1
    return defines


@functools.cache
def _lib(dtype_code: int, nt: int, cluster: int, key_mma: int = 0) -> ctypes.CDLL:
    """The kernel specialised for (dtype, batch tiles, cluster size, key loop), built once."""
    from clusterfuse.ops.build import load_library

    lib = bind_mla_block(load_library(LIB_NAME, LIB_SOURCES, _defines(dtype_code, nt, cluster, key_mma)))
    spec = MlaBlockSpec()
    lib.cf_mla_block_spec(ctypes.byref(spec))
    got = (spec.dtype, spec.heads, spec.kv_lora_rank, spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim,
           spec.max_batch, spec.cluster, spec.key_mma)
    want = (dtype_code, NUM_HEADS, KV_LORA_RANK, QK_NOPE_HEAD_DIM, QK_ROPE_HEAD_DIM, V_HEAD_DIM, 8 * nt, cluster,
            key_mma)
    if got != want:
        raise RuntimeError(f"mla_block: library built for {got}, wanted {want}")
    return lib


@functools.cache
def _plan(device_index: int, spec: tuple[int, int, int, int], batch: int, hidden: int) -> MlaBlockPlan:
    """The kernel's plan (grid, shared memory, key splits, k splits) on this device."""
    lib = _lib(*spec)
    plan = MlaBlockPlan()
    with torch.cuda.device(device_index):
        raise_on_code(lib.cf_mla_block_plan(ctypes.byref(MlaBlockShape(batch, hidden)), ctypes.byref(plan)),
                      f"mla_block(batch={batch}, hidden={hidden}, cluster_size={spec[2]})", lib, lib.cf_mla_block_error)
    return plan


# ------------------------------------------------------------------------------- validation
def _validate(hidden, norm_weight, weights, cos, sin, positions, latent_cache, cache_lens, eps, softmax_scale,
              block_table, page_size, residual, cluster_size, key_loop, options) -> int:
    """Shapes, dtypes, devices and scalars; returns the capacity of a sequence."""
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"hidden: expected a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dtype not in _DTYPE_CODES:
        raise ValueError(f"hidden: dtype {hidden.dtype} not supported (expected bfloat16 or float16)")
    b, h = require_cuda_tensor("hidden", hidden, shape=(None, None)).shape
    if not 1 <= b <= MAX_BATCH:
        raise ValueError(f"hidden: batch must be in [1, {MAX_BATCH}], got {b}")
    if h < 16 or h % 16:
        raise ValueError(f"hidden: hidden size must be a positive multiple of 16, got {h}")
    require_hopper("hidden", hidden.device, "MLA")
    if not isinstance(weights, MlaBlockWeights):
        raise ValueError(f"weights: expected MlaBlockWeights (prepare_mla_weights), got {type(weights).__name__}")
    dev, dt = hidden.device, hidden.dtype
    named = {"norm_weight": (norm_weight, (h,)), "weights.w_qa": (weights.w_qa, (PROJ_ROWS, h)),
             "weights.kv_a_norm": (weights.kv_a_norm, (KV_LORA_RANK,)),
             "weights.w_uk": (weights.w_uk, (NUM_HEADS, QK_NOPE_HEAD_DIM, KV_LORA_RANK)),
             "weights.w_uv": (weights.w_uv, (NUM_HEADS, V_HEAD_DIM, KV_LORA_RANK)),
             "weights.w_o": (weights.w_o, (h, NUM_HEADS * V_HEAD_DIM)), "residual": (residual, (b, h))}
    for name, (t, shape) in named.items():
        if t is None and name == "residual":
            continue
        require_cuda_tensor(name, t, dtype=dt, shape=shape)
        if t.device != dev:
            raise ValueError(f"{name}: expected a tensor on {dev}, got one on {t.device}")
    require_cuda_tensor("cos", cos, dtype=torch.float32, shape=(None, QK_ROPE_HEAD_DIM // 2), align=4)
    require_cuda_tensor("sin", sin, dtype=torch.float32, shape=tuple(cos.shape), align=4)
    require_cuda_tensor("positions", positions, dtype=_INDEX_DTYPES, shape=(b,), align=4)
    require_cuda_tensor("cache_lens", cache_lens, dtype=_INDEX_DTYPES, shape=(b,), align=4)
    for name, t in (("cos", cos), ("sin", sin), ("positions", positions), ("cache_lens", cache_lens)):
        if t.device != dev:
            raise ValueError(f"{name}: expected a tensor on {dev}, got one on {t.device}")
    if block_table is None:
        if page_size is not None:
            raise ValueError("page_size: given without block_table (a contiguous cache has no pages)")
        require_cuda_tensor("latent_cache", latent_cache, dtype=dt, shape=(b, None, LATENT_DIM))
        capacity = latent_cache.shape[1]
    else:
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size: expected a positive int with block_table, got {page_size!r}")
        require_cuda_tensor("latent_cache", latent_cache, dtype=dt, shape=(None, page_size, LATENT_DIM))
        require_cuda_tensor("block_table", block_table, dtype=_INDEX_DTYPES, shape=(b, None), align=4)
        if block_table.device != dev:
            raise ValueError(f"block_table: expected a tensor on {dev}, got one on {block_table.device}")
        capacity = block_table.shape[1] * page_size
    if latent_cache.device != dev:
        raise ValueError(f"latent_cache: expected a tensor on {dev}, got one on {latent_cache.device}")
    for name, v in (("eps", eps), ("softmax_scale", softmax_scale)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name}: expected a positive float, got {v!r}")
    if cluster_size is not None and (isinstance(cluster_size, bool) or cluster_size not in CLUSTER_SIZES):
        raise ValueError(f"cluster_size: expected one of {CLUSTER_SIZES} or None, got {cluster_size!r}")
    if key_loop not in KEY_LOOPS:
        raise ValueError(f"key_loop: expected one of {KEY_LOOPS}, got {key_loop!r}")
    if not isinstance(options, KernelOptions):
        raise ValueError(f"options: expected a KernelOptions, got {type(options).__name__}")
    return capacity


def _check_values(cos, positions, latent_cache, cache_lens, block_table, capacity) -> int:
    """Range checks of the index tensors (one device → host copy each); returns the longest length.
    Raises before anything is launched, so a bad call writes nothing."""
    lens, pos = cache_lens.long().cpu(), positions.long().cpu()

    def first_bad(values: torch.Tensor, hi: int) -> int | None:
        bad = ((values < 0) | (values >= hi)).nonzero()
        return None if bad.numel() == 0 else int(bad[0, 0])

    if (b := first_bad(lens, capacity)) is not None:
        raise ValueError(f"cache_lens: sequence {b} has {int(lens[b])} cached rows; the new token needs row "
                         f"{int(lens[b])} < capacity {capacity}")
    if (b := first_bad(pos, cos.shape[0])) is not None:
        raise ValueError(f"positions: sequence {b} is at position {int(pos[b])}, outside the rope table "
                         f"[0, {cos.shape[0]})")
    if block_table is not None:
        # The pages holding rows 0 .. len of each sequence (the new row's included) must exist.
        table = block_table.long().cpu()
        used = torch.arange(table.shape[1])[None, :] <= (lens // latent_cache.shape[1])[:, None]
        out_of_pool = used & ((table < 0) | (table >= latent_cache.shape[0]))
        if out_of_pool.any():
            b = int(out_of_pool.any(1).nonzero()[0, 0])
            raise ValueError(f"block_table: row {b} names a page outside [0, {latent_cache.shape[0]}) among its "
                             f"first {int(used[b].sum())} pages")
    return int(lens.max())


# ------------------------------------------------------------------------------- launching
_state_lock = threading.Lock()
_states: dict[int, torch.Tensor] = {}
_last_bucket: dict[tuple, int] = {}  # (device, dtype, batch, hidden, key loop) → length bucket of the last eager call


def _device_state(device: torch.device) -> torch.Tensor:
    """Per-device int32 [2]: the grid-barrier counter (zero once, left as found by every launch) and
    the kernel's out-of-range flag."""
    with _state_lock:
        if device.index not in _states:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("mla_block: call it once on this device before capturing a CUDA graph "
                                   "(its barrier counter is allocated on first use)")
            _states[device.index] = torch.zeros(4, dtype=torch.int32, device=device)
        return _states[device.index]


def _launch(hidden, norm_weight, w_qa, kv_a_norm, w_uk, w_uv, w_o, cos, sin, positions, latent_cache, cache_lens,
            block_table, residual, out, eps, softmax_scale, cluster, key_mma) -> None:
    b, h = hidden.shape
    spec = (_DTYPE_CODES[hidden.dtype], 1 if b <= 8 else 2, cluster, key_mma)
    lib = _lib(*spec)
    plan = _plan(hidden.device.index, spec, b, h)
    dev = hidden.device
    items = b * plan.key_splits
    ws_proj = torch.empty(b * PROJ_ROWS, dtype=torch.float32, device=dev)
    ws_q = torch.empty(b * NUM_HEADS * LATENT_DIM, dtype=torch.float32, device=dev)
    ws_state = torch.empty(items * NUM_HEADS * (KV_LORA_RANK + 2), dtype=torch.float32, device=dev)
    ws_v = torch.empty(b * NUM_HEADS * V_HEAD_DIM, dtype=hidden.dtype, device=dev)
    ws_y = torch.empty(b * h, dtype=torch.float32, device=dev)
    state = _device_state(dev)
    cache_lens = cache_lens.to(torch.int32)  # the tensor itself when it is int32 already
    block_table = None if block_table is None else block_table.to(torch.int32)
    if block_table is None:
        page, max_pages, num_pages = latent_cache.shape[1], 1, b
    else:
        page, max_pages, num_pages = latent_cache.shape[1], block_table.shape[1], latent_cache.shape[0]

    p = address
    args = MlaBlockArgs(
        shape=MlaBlockShape(b, h), hidden=p(hidden), norm_w=p(norm_weight), w_qa=p(w_qa), kv_norm_w=p(kv_a_norm),
        w_uk=p(w_uk), w_uv=p(w_uv), w_o=p(w_o), cos=p(cos), sin=p(sin), positions=p(positions),
        cache=p(latent_cache), cache_lens=p(cache_lens), block_table=p(block_table), residual=p(residual), out=p(out),
        ws_proj=p(ws_proj), ws_q=p(ws_q), ws_state=p(ws_state), ws_v=p(ws_v), ws_y=p(ws_y), counter=state.data_ptr(),
        error=state.data_ptr() + 4, max_pos=cos.shape[0], positions_int64=int(positions.dtype == torch.int64),
        page_size=page, max_pages=max_pages, num_pages=num_pages, eps=float(eps), softmax_scale=float(softmax_scale))
    stream = torch.cuda.current_stream(dev).cuda_stream
    raise_on_code(lib.cf_mla_block_launch(ctypes.byref(args), ctypes.byref(plan), stream), "mla_block launch", lib,
                  lib.cf_mla_block_error)


@torch.library.custom_op("clusterfuse::mla_block", mutates_args=("latent_cache",))
def _mla_block_op(hidden: torch.Tensor, norm_weight: torch.Tensor, w_qa: torch.Tensor, kv_a_norm: torch.Tensor,
                  w_uk: torch.Tensor, w_uv: torch.Tensor, w_o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor, latent_cache: torch.Tensor, cache_lens: torch.Tensor,
                  block_table: torch.Tensor | None, residual: torch.Tensor | None, eps: float, softmax_scale: float,
                  cluster_size: int, key_mma: int) -> torch.Tensor:
    out = torch.empty(hidden.shape, dtype=hidden.dtype if residual is not None else torch.float32,
                      device=hidden.device)
    with torch.cuda.device(hidden.device):
        _launch(hidden, norm_weight, w_qa, kv_a_norm, w_uk, w_uv, w_o, cos, sin, positions, latent_cache, cache_lens,
                block_table, residual, out, eps, softmax_scale, cluster_size, key_mma)
    return out


@_mla_block_op.register_fake
def _(hidden, norm_weight, w_qa, kv_a_norm, w_uk, w_uv, w_o, cos, sin, positions, latent_cache, cache_lens,
      block_table, residual, eps, softmax_scale, cluster_size, key_mma):
    return hidden.new_empty(hidden.shape, dtype=hidden.dtype if residual is not None else torch.float32)


def mla_block(hidden: torch.Tensor, norm_weight: torch.Tensor, weights: MlaBlockWeights, cos: torch.Tensor,
              sin: torch.Tensor, positions: torch.Tensor, latent_cache: torch.Tensor, cache_lens: torch.Tensor, *,
              eps: float, softmax_scale: float, block_table: torch.Tensor | None = None,
              page_size: int | None = None, residual: torch.Tensor | None = None, cluster_size: int | None = None,
              key_loop: str = "simt", options: KernelOptions = DEFAULT_KERNEL_OPTIONS) -> torch.Tensor:
    """Fused MLA decode block; see the module docstring. Raises ValueError naming the bad argument."""
    capacity = _validate(hidden, norm_weight, weights, cos, sin, positions, latent_cache, cache_lens, eps,
                         softmax_scale, block_table, page_size, residual, cluster_size, key_loop, options)
    key_mma = int(key_loop == "mma")
    b, h = hidden.shape
    shape_key = (hidden.device.index, hidden.dtype, b, h, key_loop)
    if torch.cuda.is_current_stream_capturing():
        # The lengths cannot be read while capturing: the bucket of the last eager call of this shape
        # (the engine tunes each graph at its context class's length before capturing it).
        bucket = _last_bucket.get(shape_key, seq_bucket(capacity))
    else:
        bucket = seq_bucket(_check_values(cos, positions, latent_cache, cache_lens, block_table, capacity) + 1)
        _last_bucket[shape_key] = bucket
    w = weights
    args = (hidden, norm_weight, w.w_qa, w.kv_a_norm, w.w_uk, w.w_uv, w.w_o, cos, sin, positions, latent_cache,
            cache_lens, block_table, residual, float(eps), float(softmax_scale))
    if cluster_size is None:
        key = TUNER.make_key("mla_block", hidden.device, {"dtype": str(hidden.dtype).removeprefix("torch."),
                                                          "hidden": h, "batch": b, "seq": bucket,
                                                          "key_loop": key_loop})
        # The tuner runs each candidate several times: each launch writes the same values into the
        # same row (cache_lens is not advanced), so the cache ends as after one call.

        def run(c: int, _exchange: str):
            return _mla_block_op(*args, c, key_mma)

        cluster_size, _ = TUNER.choose_launch("mla_block", key, None, "dsm", CLUSTER_SIZES, ("dsm",), run,
                                              default_cluster=DEFAULT_CLUSTER_SIZE)
    return _mla_block_op(*args, cluster_size, key_mma)
