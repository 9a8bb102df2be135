"""The persistent decode step: every layer of a Llama-family decode step in ONE Hopper launch.

``decode_step(hidden, layers, cos, sin, positions, cache_lens, *, num_heads, num_kv_heads, head_dim,
eps, cluster_size, block_table=None, page_size=None, window=None, options=DEFAULT_KERNEL_OPTIONS,
max_clusters=None, timeline=None)`` runs, for each `StepLayer` in turn, what the per-block ops run as two launches::

    h = attention_block(h, layer.attn_norm, layer.w_qkv, ..., residual=h)   # caches: row cache_lens[b]
    h = ffn_block(h, layer.ffn_norm, layer.w_gate_up, layer.w_down, eps, residual=h)

and returns the last ``h`` ([B, H], hidden's dtype; ``hidden`` itself is only read). The kernel
(``clusterfuse/kernels/step/decode_step.cu``) keeps its clusters resident for all layers and meets
at grid barriers between the phases that need the whole grid; it runs the per-block kernels' own
phase code with their partitions (the attention kernel's 256-thread build and the FFN kernel's plan
for the same ``cluster_size``), so its output is bit-identical to the per-block ops launched with
``cluster_size``, ``exchange="dsm"`` (or "global") and ``block_threads=256``.

Residency is checked, not assumed: `plan` asks the device how many clusters of this size it holds
with the step's shared memory and the grid never exceeds that, and the launch is cooperative, so
the driver refuses a grid it cannot hold at once (another process under MPS) rather than start part
of it. Where it holds none (or ``max_clusters=0``, how tests force it), or a block's layout does not
fit, `PersistentStepRefused` (a ValueError) says so; the engine then runs the per-block kernels
(`clusterfuse.engine.fused_model`).

The per-layer tensors are passed to the kernel as a table of pointers in device memory, built on a
call's first use of a layer list and kept: call once eagerly before capturing a CUDA graph. Value
checks of ``cache_lens`` / ``positions`` / ``block_table`` read them on the host, so they run only
outside graph capture; inside, a sequence out of range writes nothing and yields NaN, and sets the
step's error flag (`error_flag`).

``timeline`` (profiling only, ``bench/step_timeline.py``): an int64 CUDA tensor of at least
`timeline_shape` that the launch zeroes and fills with every block's phase stamps (the layout of
``kernels/include/clusterfuse/step/timeline.cuh``); the op then runs the step's timeline build
(``CF_STEP_TIMELINE=1``), whose stamps change no result.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from clusterfuse.ops import attention_block as attn_op
from clusterfuse.ops import ffn_block as ffn_op
from clusterfuse.ops.attention_block import _check_values as _check_index_values
from clusterfuse.ops.attention_block import _validate as _validate_attention_args
from clusterfuse.ops.ffn_block import _validate as _validate_ffn_args
from clusterfuse.ops.kernel_abi import (
    DecodeStepArgs,
    DecodeStepLayer,
    DecodeStepPlan,
    DecodeStepShape,
    DecodeStepSpec,
    bind_decode_step,
)
from clusterfuse.ops.launch import DeviceCounters, address, raise_on_code, stream_handle
from clusterfuse.ops.options import DEFAULT_KERNEL_OPTIONS, KernelOptions

LIB_NAME, LIB_SOURCES = "decode_step", ("step/decode_step.cu",)
#: The step's block size: the attention kernel's 256-thread build and the FFN kernel's.
BLOCK_THREADS = 256
CLUSTER_SIZES = (1, 2, 4, 8, 16)
#: The per-block plans' exchange whose partitions the step keeps (DSM and global are bit-identical).
EXCHANGE = "dsm"
_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1}
#: cf_decode_step_error's codes for "this device cannot run it" (the engine falls back on them).
_ERR_SMEM, _ERR_NOT_RESIDENT = -2, -3
#: cudaErrorCooperativeLaunchTooLarge: the driver cannot hold the grid at once now (the launch is
#: cooperative), e.g. another process shares the GPU under MPS; refused like a device that holds none.
_CUDA_COOPERATIVE_TOO_LARGE = 720


class PersistentStepRefused(ValueError):
    """The persistent step cannot run this shape on this device as one resident grid (no cluster of
    the size fits, a block's layout does not fit in shared memory, or the caller's cap is 0)."""


@dataclass(frozen=True)
class StepLayer:
    """One layer's tensors, as the per-block ops take them (``b_qkv``, ``q_norm``, ``k_norm`` may be
    None; ``k_cache``/``v_cache`` are the layer's pools, written at row ``cache_lens[b]``)."""

    attn_norm: torch.Tensor
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    ffn_norm: torch.Tensor
    w_gate_up: torch.Tensor
    w_down: torch.Tensor


# ------------------------------------------------------------------------------- library
def _defines(dtype_code: int, head_dim: int, gqa: int, nt: int, qk_norm: bool, window: bool,
             timeline: bool = False) -> dict[str, int]:
    defines = {"CF_STEP_DTYPE": dtype_code, "CF_STEP_HEAD_DIM": head_dim, "CF_STEP_GQA": gqa, "CF_STEP_NT": nt}
    for name, on in (("CF_STEP_QK_NORM", qk_norm), ("CF_STEP_WINDOW", window), ("CF_STEP_TIMELINE", timeline)):
        if on:
            defines[name] = 1
    return defines


def build_spec(dtype: torch.dtype, head_dim: int, gqa: int, batch: int, *, qk_norm: bool = False,
               window: bool = False, timeline: bool = False) -> tuple[str, tuple[str, ...], dict]:
    """``(name, sources, defines)`` of the specialisation serving these shapes, for
    `clusterfuse.ops.build.prebuild`."""
    return LIB_NAME, LIB_SOURCES, _defines(_DTYPE_CODES[dtype], head_dim, gqa, 1 if batch <= 8 else 2, qk_norm,
                                           window, timeline)


@functools.cache
def _lib(dtype_code: int, head_dim: int, gqa: int, nt: int, qk_norm: bool, window: bool,
         timeline: bool = False) -> ctypes.CDLL:
    from clusterfuse.ops.build import load_library

    lib = bind_decode_step(load_library(LIB_NAME, LIB_SOURCES, _defines(dtype_code, head_dim, gqa, nt, qk_norm,
                                                                          window, timeline)))
    spec = DecodeStepSpec()
    lib.cf_decode_step_spec(ctypes.byref(spec))
    got = (spec.dtype, spec.head_dim, spec.gqa, spec.max_batch, spec.threads, bool(spec.qk_norm), bool(spec.window),
           spec.timeline_layer_slots > 0)
    want = (dtype_code, head_dim, gqa, 8 * nt, BLOCK_THREADS, qk_norm, window, timeline)
    if got != want:
        raise RuntimeError(f"decode_step: library built for {got}, wanted {want}")
    lib.timeline_head, lib.timeline_layer_slots = spec.timeline_head, spec.timeline_layer_slots
    return lib


# ------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class StepPlan:
    """A planned step: the library, its plan and the shape (with the per-block plans) it was made for."""

    lib: ctypes.CDLL
    shape: DecodeStepShape
    plan: DecodeStepPlan

    @property
    def clusters(self) -> int:
        """Resident clusters of the grid (each loops over the KV head groups and FFN slices)."""
        return self.plan.clusters

    @property
    def blocks(self) -> int:
        """Blocks of the grid: the resident clusters times the cluster size."""
        return self.plan.clusters * self.shape.cluster

    def timeline_shape(self) -> tuple[int, int]:
        """``(grid blocks, slots per block)`` of the timeline buffer (timeline builds; slots 0 otherwise)."""
        layer_slots = self.lib.timeline_layer_slots
        slots = self.lib.timeline_head + self.shape.layers * layer_slots if layer_slots else 0
        return self.blocks, slots


@functools.cache
def _plan(device_index: int, dtype: torch.dtype, batch: int, hidden: int, num_heads: int, num_kv_heads: int,
          head_dim: int, intermediate: int, num_layers: int, cluster_size: int, qk_norm: bool, window: bool,
          max_clusters: int, timeline: bool = False) -> StepPlan:
    device = torch.device("cuda", device_index)
    what = (f"decode_step(batch={batch}, hidden={hidden}, heads={num_heads}/{num_kv_heads}, head_dim={head_dim}, "
            f"intermediate={intermediate}, layers={num_layers}, cluster_size={cluster_size})")
    try:
        attn_plan = attn_op.launch_plan(dtype, batch, hidden, num_heads, num_kv_heads, head_dim, cluster_size,
                                        EXCHANGE, BLOCK_THREADS, device=device, qk_norm=qk_norm, window=window)
        ffn_plan = ffn_op.launch_plan(dtype, batch, hidden, intermediate, cluster_size, EXCHANGE, device=device)
    except ValueError as err:  # a per-block plan refused: shared memory or residency of its own grid
        raise PersistentStepRefused(f"{what}: {err}") from err
    shape = DecodeStepShape(batch, hidden, num_heads, num_kv_heads, intermediate, num_layers, cluster_size,
                            max_clusters, attn_plan, ffn_plan)
    lib = _lib(_DTYPE_CODES[dtype], head_dim, num_heads // num_kv_heads, 1 if batch <= 8 else 2, qk_norm, window,
               timeline)
    plan = DecodeStepPlan()
    with torch.cuda.device(device_index):
        rc = lib.cf_decode_step_plan(ctypes.byref(shape), ctypes.byref(plan))
    if rc in (_ERR_SMEM, _ERR_NOT_RESIDENT):
        raise PersistentStepRefused(f"{what}: {lib.cf_decode_step_error(rc).decode()} (code {rc})")
    raise_on_code(rc, what, lib, lib.cf_decode_step_error)
    return StepPlan(lib, shape, plan)


def plan(dtype: torch.dtype, batch: int, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int,
         intermediate: int, num_layers: int, cluster_size: int, *, device: torch.device, qk_norm: bool = False,
         window: bool = False, max_clusters: int | None = None, timeline: bool = False) -> StepPlan:
    """The step's plan on ``device`` (cached per shape): raises `PersistentStepRefused` where the
    device cannot hold it resident (``max_clusters``: at most that many clusters, None: what the
    device holds; 0 refuses, as a full device would), ValueError for shapes the kernels do not take.
    ``timeline``: the plan of the profiling build (`StepPlan.timeline_shape`)."""
    if cluster_size not in CLUSTER_SIZES:
        raise ValueError(f"cluster_size: expected one of {CLUSTER_SIZES}, got {cluster_size!r}")
    if max_clusters is not None and (isinstance(max_clusters, bool) or not isinstance(max_clusters, int)
                                     or max_clusters < 0):
        raise ValueError(f"max_clusters: expected None or an int >= 0, got {max_clusters!r}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"layers: expected at least one layer, got {num_layers!r}")
    attn_op.check_model_shape(hidden, num_heads, num_kv_heads, head_dim)
    ffn_op.check_model_shape(hidden, intermediate)
    if dtype not in _DTYPE_CODES:
        raise ValueError(f"hidden: expected dtype bfloat16 or float16, got {dtype}")
    return _plan(device.index, dtype, batch, hidden, num_heads, num_kv_heads, head_dim, intermediate, num_layers,
                 cluster_size, qk_norm, window, -1 if max_clusters is None else max_clusters, bool(timeline))


def default_cluster_size(num_kv_heads: int, device: torch.device) -> int:
    """The attention op's default (the largest cluster whose grid of one cluster per KV head fits one
    block per SM), at most 8: clusters of 16 need the non-portable size and fewer are resident."""
    return min(8, attn_op.default_cluster_size(num_kv_heads, device))


# ------------------------------------------------------------------------------- launching
#: The grid barrier's counter and the error flag of each device: [counter, error].
_STATE = DeviceCounters("decode_step", count=2)
_tables_lock = threading.Lock()
#: Device tables of per-layer pointers by (device, pointers), most recent last (a few kept).
_tables: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
_MAX_TABLES = 8


def error_flag(device: torch.device) -> torch.Tensor:
    """The step's error flag on ``device`` (int32, set to 1 by a step that met an out-of-range
    sequence; never reset by the kernel)."""
    return _STATE.get(device)[1:2]


def _layer_table(layers: Sequence[StepLayer], device: torch.device) -> torch.Tensor:
    """The device array of CfDecodeStepLayer for ``layers`` (built once per pointer set)."""
    rows = [DecodeStepLayer(*(address(t) for t in (w.attn_norm, w.w_qkv, w.b_qkv, w.w_o, w.q_norm, w.k_norm, w.k_cache,
                                                    w.v_cache, w.ffn_norm, w.w_gate_up, w.w_down)))
             for w in layers]
    key = (device.index, tuple(tuple(getattr(r, name) for name, _ in DecodeStepLayer._fields_) for r in rows))
    with _tables_lock:
        table = _tables.get(key)
        if table is not None:
            _tables.move_to_end(key)
            return table
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("decode_step: call it once with these layers before capturing a CUDA graph "
                               "(their pointer table is copied to the device on first use)")
        host = (DecodeStepLayer * len(rows))(*rows)
        table = torch.frombuffer(bytearray(bytes(host)), dtype=torch.uint8).to(device)
        _tables[key] = table
        while len(_tables) > _MAX_TABLES:
            _tables.popitem(last=False)
        return table


def _validate(hidden, layers, cos, sin, positions, cache_lens, num_heads, num_kv_heads, head_dim, eps, block_table,
              page_size, window, cluster_size) -> int:
    """Every check that needs no device → host copy, the per-block ops' own rules for each layer;
    returns the intermediate size."""
    if not isinstance(layers, Sequence) or not layers or not all(isinstance(w, StepLayer) for w in layers):
        raise ValueError("layers: expected a non-empty sequence of StepLayer")
    if cluster_size not in CLUSTER_SIZES:
        raise ValueError(f"cluster_size: expected one of {CLUSTER_SIZES}, got {cluster_size!r}")
    inter = None
    for i, w in enumerate(layers):
        if (w.q_norm is None) != (layers[0].q_norm is None) or (w.b_qkv is None) != (layers[0].b_qkv is None):
            raise ValueError(f"layers: layer {i} differs from layer 0 in having q_norm / k_norm or b_qkv")
        if isinstance(w.k_cache, torch.Tensor) and w.k_cache.shape != layers[0].k_cache.shape:
            raise ValueError(f"layers: layer {i}'s k_cache has shape {list(w.k_cache.shape)}, layer 0's "
                             f"{list(layers[0].k_cache.shape)} (one block table addresses every layer's pages)")
        try:
            _validate_attention_args(hidden, w.attn_norm, w.w_qkv, w.b_qkv, w.w_o, cos, sin, positions, w.k_cache,
                                     w.v_cache, cache_lens, num_heads, num_kv_heads, head_dim, eps, block_table,
                                     page_size, hidden, cluster_size, EXCHANGE, BLOCK_THREADS, w.q_norm, w.k_norm,
                                     window)
            _, _, layer_inter = _validate_ffn_args(hidden, w.ffn_norm, w.w_gate_up, w.w_down, eps, hidden,
                                                   cluster_size, EXCHANGE)
        except ValueError as err:
            raise ValueError(f"layers[{i}]: {err}") from err
        if inter is not None and layer_inter != inter:
            raise ValueError(f"layers[{i}]: intermediate size {layer_inter}, layer 0's is {inter}")
        inter = layer_inter
    return inter


def _check_timeline(timeline: object, sp: StepPlan, device: torch.device) -> None:
    rows, slots = sp.timeline_shape()
    if (not isinstance(timeline, torch.Tensor) or timeline.dtype != torch.int64 or timeline.device != device
            or timeline.dim() != 2 or not timeline.is_contiguous() or timeline.shape[0] < rows
            or timeline.shape[1] != slots):
        got = (f"{timeline.dtype} {list(timeline.shape)} on {timeline.device}" if isinstance(timeline, torch.Tensor)
               else type(timeline).__name__)
        raise ValueError(f"timeline: expected a contiguous int64 tensor [>= {rows}, {slots}] on {device}, got {got}")


def decode_step(hidden: torch.Tensor, layers: Sequence[StepLayer], cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor, cache_lens: torch.Tensor, *, num_heads: int, num_kv_heads: int,
                head_dim: int, eps: float, cluster_size: int, block_table: torch.Tensor | None = None,
                page_size: int | None = None, window: int | None = None,
                options: KernelOptions = DEFAULT_KERNEL_OPTIONS, max_clusters: int | None = None,
                timeline: torch.Tensor | None = None) -> torch.Tensor:
    """All ``layers`` of one decode step in one launch; see the module docstring. Raises ValueError
    naming the bad argument, `PersistentStepRefused` where the device cannot hold the step resident."""
    if not isinstance(options, KernelOptions):
        raise ValueError(f"options: expected a KernelOptions, got {type(options).__name__}")
    inter = _validate(hidden, layers, cos, sin, positions, cache_lens, num_heads, num_kv_heads, head_dim, eps,
                      block_table, page_size, window, cluster_size)
    first = layers[0]
    window = attn_op.kernel_window(window, first.k_cache, block_table, page_size)
    if not torch.cuda.is_current_stream_capturing():  # every layer's caches have layer 0's shape (_validate)
        _check_index_values(cos, positions, first.k_cache, cache_lens, block_table, page_size)
    b, h = hidden.shape
    dev = hidden.device
    sp = plan(hidden.dtype, b, h, num_heads, num_kv_heads, head_dim, inter, len(layers), cluster_size, device=dev,
              qk_norm=first.q_norm is not None, window=window > 0, max_clusters=max_clusters,
              timeline=timeline is not None)
    if timeline is not None:
        _check_timeline(timeline, sp, dev)
        timeline.zero_()
    table = _layer_table(layers, dev)
    state = _STATE.get(dev)
    # Scratch from the caching allocator (graph-safe): the fp32 partials and two activation buffers.
    partials = torch.empty(sp.plan.partial_floats, dtype=torch.float32, device=dev)
    mid, tmp, out = (torch.empty_like(hidden) for _ in range(3))
    cache_lens = cache_lens.to(torch.int32)
    block_table = None if block_table is None else block_table.to(torch.int32)
    if block_table is None:
        page, max_pages, num_pages = first.k_cache.shape[2], 1, b
    else:
        page, max_pages, num_pages = page_size, block_table.shape[1], first.k_cache.shape[0]
    args = DecodeStepArgs(
        shape=sp.shape, layers=table.data_ptr(), hidden=hidden.data_ptr(), mid=mid.data_ptr(), tmp=tmp.data_ptr(),
        out=out.data_ptr(), cos=cos.data_ptr(), sin=sin.data_ptr(), positions=positions.data_ptr(),
        cache_lens=cache_lens.data_ptr(), block_table=address(block_table), partials=partials.data_ptr(),
        counter=state.data_ptr(), error=state.data_ptr() + 4, max_pos=cos.shape[0],
        positions_int64=int(positions.dtype == torch.int64), page_size=page, max_pages=max_pages,
        num_pages=num_pages, kv_prefetch_keys=options.kv_prefetch_keys, window=window, eps=float(eps),
        timeline=address(timeline))
    with torch.cuda.device(dev):
        rc = sp.lib.cf_decode_step_launch(ctypes.byref(args), ctypes.byref(sp.plan), stream_handle(dev))
    if rc == _CUDA_COOPERATIVE_TOO_LARGE:
        raise PersistentStepRefused(f"decode_step: the driver cannot hold its {sp.blocks} blocks "
                                    f"resident at once now ({sp.lib.cf_decode_step_error(rc).decode()})")
    raise_on_code(rc, "decode_step launch", sp.lib, sp.lib.cf_decode_step_error)
    return out
