"""Fused MoE block (RMSNorm → router → top-k → shared + chosen routed SwiGLU experts → weighted sum
[+ residual]) as one Hopper kernel, for DeepSeek-V2-style decode layers.

``moe_block(x, norm_weight, w_router, w_gate_up, w_down, eps, routing, *, shared_gate_up=None,
shared_down=None, residual=None, cluster_size=None, return_routing=False,
options=DEFAULT_KERNEL_OPTIONS)`` matches `clusterfuse.reference.moe.moe_block`:

* ``x [B, H]`` (bf16 or fp16, B ≤ 16), ``norm_weight [H]``, ``w_router [E, H]``, the routed experts
  stacked: ``w_gate_up [E, 2I, H]`` (each expert's gate rows then up rows) and ``w_down [E, H, I]``;
  optionally the shared experts as one MLP, ``shared_gate_up [2Is, H]`` and ``shared_down [H, Is]``;
* ``routing`` (`MoeRouting`; ``MoeRouting.from_config(config.moe)`` for a DeepSeek-V2 config):
  top-k by softmax score, group-limited when configured, the routed scaling factor or normalised
  weights. Equal router scores go to the lower expert index, as in the reference;
* returns fp32 ``[B, H]``, or with ``residual [B, H]`` ``residual + that`` in x's dtype; with
  ``return_routing=True`` also the chosen experts (int32 ``[B, k]``, best first) and their
  weights (fp32 ``[B, k]``);
* ``cluster_size`` ∈ {1, 2, 4, 8, 16}, None: tuned once per shape and GPU; ``options``
  (`clusterfuse.ops.options.KernelOptions`): the programmatic launch mode (as the FFN block's).

Only the chosen experts' weights are read (for a batch, the union of its choices, once each);
the kernel is deterministic (no float atomics: fp32 partials summed in a fixed order). Design:
``clusterfuse/kernels/moe/moe_block.cu``. Registered as ``torch.ops.clusterfuse.moe_block``
(capturable in CUDA graphs; tune before capturing).

`expert_union` and `expert_pieces` are the kernel's bookkeeping in plain Python (which experts
it reads and how it splits their columns over the clusters), for the CPU tests and the
benchmark's floor (``bench.floor.moe_block_bytes``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from clusterfuse.ops.kernel_abi import (
    MOE_BLOCK_MAX_EXPERTS,
    MOE_BLOCK_MAX_GROUPS,
    MOE_BLOCK_MAX_TOP_K,
    MoeBlockArgs,
    MoeBlockPlan,
    MoeBlockShape,
    bind_moe_block,
)
from clusterfuse.ops.launch import (
    DeviceCounters,
    address,
    check_choice,
    check_eps,
    raise_on_code,
    require_cuda_tensor,
    require_hopper,
    require_same_device,
    stream_handle,
)
from clusterfuse.ops.options import DEFAULT_KERNEL_OPTIONS, KernelOptions
from clusterfuse.ops.tuner import TUNER

CLUSTER_SIZES = (1, 2, 4, 8, 16)
EXCHANGES = ("dsm",)  # the activation exchange inside a cluster; no global-memory variant
MAX_BATCH = 16
DEFAULT_CLUSTER_SIZE = 8  # used only while capturing a graph with no tuned choice
_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1}

LIB_NAME, LIB_SOURCES = "moe_block", ("moe/moe_block.cu",)


def batch_tiles(batch: int) -> int:
    """The library build's batch tiles of 8 sequences (``CF_MOE_NT``) for ``batch``."""
    return 1 if batch <= 8 else 2


def build_spec(dtype: torch.dtype, batch: int) -> tuple[str, tuple[str, ...], dict]:
    """``(name, sources, defines)`` of the library for a dtype and batch (sizes are run-time
    arguments; the batch only picks the tile count), for `clusterfuse.ops.build.prebuild`."""
    return LIB_NAME, LIB_SOURCES, {"CF_MOE_DTYPE": _DTYPE_CODES[dtype], "CF_MOE_NT": batch_tiles(batch)}


@functools.cache
def _lib(dtype_code: int, nt: int) -> ctypes.CDLL:
    from clusterfuse.ops.build import load_library

    return bind_moe_block(load_library(LIB_NAME, LIB_SOURCES, {"CF_MOE_DTYPE": dtype_code, "CF_MOE_NT": nt}))


# ------------------------------------------------------------------------------- routing
TOPK_METHODS = ("greedy", "group_limited_greedy")


@dataclasses.dataclass(frozen=True)
class MoeRouting:
    """How the block routes each token: the ``top_k`` experts of the softmax of the router logits;
    with ``n_group`` > 0 only inside the ``topk_group`` groups (of ``n_group`` equal groups of
    experts) with the best single score; their weights times ``routed_scaling_factor``, or
    normalised to sum 1 when ``norm_topk_prob`` (and top_k > 1)."""

    top_k: int
    n_group: int = 0
    topk_group: int = 0
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.top_k) or not 1 <= self.top_k <= MOE_BLOCK_MAX_TOP_K:
            raise ValueError(f"routing.top_k: expected an int in [1, {MOE_BLOCK_MAX_TOP_K}], got {self.top_k!r}")
        if not is_int(self.n_group) or not 0 <= self.n_group <= MOE_BLOCK_MAX_GROUPS:
            raise ValueError(f"routing.n_group: expected an int in [0, {MOE_BLOCK_MAX_GROUPS}] (0: no groups), "
                             f"got {self.n_group!r}")
        if self.n_group and (not is_int(self.topk_group) or not 1 <= self.topk_group <= self.n_group):
            raise ValueError(f"routing.topk_group: expected an int in [1, n_group={self.n_group}], "
                             f"got {self.topk_group!r}")
        if not isinstance(self.norm_topk_prob, bool):
            raise ValueError(f"routing.norm_topk_prob: expected a bool, got {self.norm_topk_prob!r}")
        scale = self.routed_scaling_factor
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"routing.routed_scaling_factor: expected a finite float, got {scale!r}")

    @classmethod
    def from_config(cls, moe: Any) -> MoeRouting:
        """The routing of a DeepSeek-V2 MoE config (`clusterfuse.models.config.MoEConfig`, read by
        field name); ValueError naming the first field the kernel does not take."""
        if moe.scoring_func != "softmax":
            raise ValueError(f"moe.scoring_func: the fused MoE kernel takes 'softmax', got {moe.scoring_func!r}")
        if moe.topk_method not in TOPK_METHODS:
            raise ValueError(f"moe.topk_method: expected one of {TOPK_METHODS}, got {moe.topk_method!r}")
        grouped = moe.topk_method == "group_limited_greedy"
        return cls(top_k=moe.num_experts_per_tok, n_group=moe.n_group if grouped else 0,
                   topk_group=moe.topk_group if grouped else 0, norm_topk_prob=bool(moe.norm_topk_prob),
                   routed_scaling_factor=float(moe.routed_scaling_factor))


# ------------------------------------------------------------------------------- bookkeeping
class Piece(NamedTuple):
    """A run of one expert's intermediate columns that one cluster handles at once."""

    expert: int  # routed expert, or -1 for the shared experts
    c0: int      # first column inside that expert's intermediate dimension
    length: int


def expert_union(topk_ids: torch.Tensor) -> list[int]:
    """The experts any sequence of ``topk_ids [B, k]`` chose, ascending: the routed experts whose
    weights a launch reads (each once)."""
    return sorted(set(topk_ids.flatten().tolist()))


def _split(n_units: int, parts: int, i: int, unit: int) -> tuple[int, int]:
    """split_range.cuh: part ``i`` of ``n_units`` units split into ``parts`` near-equal runs."""
    return unit * (i * n_units // parts), unit * ((i + 1) * n_units // parts)


def expert_pieces(union: Sequence[int], shared_width: int, width: int, num_clusters: int,
                  piece_max: int) -> list[list[Piece]]:
    """Each cluster's pieces, as the kernel walks them: the shared experts' ``shared_width``
    columns, then ``width`` columns per expert of ``union`` (ascending), laid end to end and cut
    into ``num_clusters`` near-equal runs of whole 8-column units; a run goes in pieces that lie
    inside one expert and are at most ``piece_max`` long (moe/block_phases.cuh, `piece_at`)."""
    total = shared_width + len(union) * width
    pieces: list[list[Piece]] = []
    for c in range(num_clusters):
        v, end = _split(total // 8, num_clusters, c, 8)
        mine: list[Piece] = []
        while v < end:
            if v < shared_width:
                expert, start, stop = -1, 0, shared_width
            else:
                j = (v - shared_width) // width
                expert, start, stop = union[j], shared_width + j * width, shared_width + (j + 1) * width
            length = min(end, stop, v + piece_max) - v
            mine.append(Piece(expert, v - start, length))
            v += length
        pieces.append(mine)
    return pieces


# ------------------------------------------------------------------------------- validation
def check_model_shape(hidden_size: int, intermediate_size: int, experts: int, routing: MoeRouting,
                      shared_intermediate_size: int = 0) -> None:
    """The kernel's rules on a model's MoE dimensions (no tensors, no GPU): ValueError naming the
    first one it does not take."""
    if hidden_size < 8 or hidden_size % 8:
        raise ValueError(f"x: hidden size must be a positive multiple of 8, got {hidden_size}")
    if intermediate_size < 8 or intermediate_size % 8:
        raise ValueError(f"w_down: the experts' intermediate size must be a positive multiple of 8, "
                         f"got {intermediate_size}")
    if shared_intermediate_size < 0 or shared_intermediate_size % 8:
        raise ValueError(f"shared_down: the shared experts' intermediate size must be a multiple of 8, "
                         f"got {shared_intermediate_size}")
    if not 1 <= experts <= MOE_BLOCK_MAX_EXPERTS:
        raise ValueError(f"w_down: the number of experts must be in [1, {MOE_BLOCK_MAX_EXPERTS}], got {experts}")
    if routing.top_k > experts:
        raise ValueError(f"routing.top_k: at most the {experts} experts, got {routing.top_k}")
    if routing.n_group and experts % routing.n_group:
        raise ValueError(f"routing.n_group: must divide the {experts} experts, got {routing.n_group}")


def _validate(x, norm_weight, w_router, w_gate_up, w_down, eps, routing, shared_gate_up, shared_down, residual,
              cluster_size) -> None:
    if not isinstance(routing, MoeRouting):
        raise ValueError(f"routing: expected a MoeRouting, got {type(routing).__name__}")
    b, h = require_cuda_tensor("x", x, dtype=tuple(_DTYPE_CODES), shape=(None, None)).shape
    if not 1 <= b <= MAX_BATCH:
        raise ValueError(f"x: batch must be in [1, {MAX_BATCH}], got {b}")
    if h < 8 or h % 8:
        raise ValueError(f"x: hidden size must be a positive multiple of 8, got {h}")
    require_hopper("x", x.device, "MoE")
    e, _, inter = require_cuda_tensor("w_down", w_down, dtype=x.dtype, shape=(None, h, None)).shape
    require_cuda_tensor("w_router", w_router, dtype=x.dtype, shape=(e, h))
    if (shared_gate_up is None) != (shared_down is None):
        raise ValueError("shared_gate_up: give both shared_gate_up and shared_down, or neither")
    shared = 0 if shared_down is None else require_cuda_tensor("shared_down", shared_down, dtype=x.dtype,
                                                               shape=(h, None)).shape[1]
    check_model_shape(h, inter, e, routing, shared)
    if shared_down is not None and shared == 0:
        raise ValueError("shared_down: the shared experts' intermediate size must be positive, got 0")
    named = {"norm_weight": (norm_weight, (h,)), "w_gate_up": (w_gate_up, (e, 2 * inter, h)),
             "shared_gate_up": (shared_gate_up, (2 * shared, h)), "residual": (residual, (b, h))}
    for name, (t, shape) in named.items():
        if t is not None or name not in ("shared_gate_up", "residual"):
            require_cuda_tensor(name, t, dtype=x.dtype, shape=shape)
    require_same_device(x.device, {"norm_weight": norm_weight, "w_router": w_router, "w_gate_up": w_gate_up,
                                   "w_down": w_down, "shared_gate_up": shared_gate_up, "shared_down": shared_down,
                                   "residual": residual})
    check_eps(eps)
    check_choice("cluster_size", cluster_size, CLUSTER_SIZES)


# ------------------------------------------------------------------------------- launching
#: The grid-barrier counter of each device (grid_sync.cuh).
_BARRIER_COUNTERS = DeviceCounters("moe_block")


def _shape(dtype_code: int, b: int, h: int, inter: int, shared_width: int, e: int, k: int,
           cluster: int) -> MoeBlockShape:
    return MoeBlockShape(dtype_code, b, h, inter, shared_width, e, k, cluster)


@functools.cache
def plan(device_index: int, dtype: torch.dtype, b: int, h: int, inter: int, shared_width: int, e: int, k: int,
         cluster: int) -> MoeBlockPlan:
    """The kernel's plan (grid, shared memory, piece length, k splits) on this device, or raises."""
    code, nt = _DTYPE_CODES[dtype], batch_tiles(b)
    lib = _lib(code, nt)
    out = MoeBlockPlan()
    shape = _shape(code, b, h, inter, shared_width, e, k, cluster)
    with torch.cuda.device(device_index):
        raise_on_code(lib.cf_moe_block_plan(ctypes.byref(shape), ctypes.byref(out)),
                      f"moe_block(batch={b}, hidden={h}, intermediate={inter}, experts={e}, cluster_size={cluster})",
                      lib, lib.cf_moe_block_error)
    return out


def _routing_fields(routing: MoeRouting) -> tuple[int, int, int, float]:
    """``(n_group, topk_group, norm_topk_prob, routed_scaling_factor)`` as the kernel takes them."""
    return (routing.n_group, routing.topk_group if routing.n_group else 0, int(routing.norm_topk_prob),
            float(routing.routed_scaling_factor))


def _launch(x, norm_weight, w_router, w_gate_up, w_down, eps, routing, shared_gate_up, shared_down, residual,
            out, topk_ids, topk_weights, cluster, launch_mode) -> None:
    b, h = x.shape
    e, _, inter = w_down.shape
    k = topk_ids.shape[1]
    shared_width = 0 if shared_down is None else shared_down.shape[1]
    pl = plan(x.device.index, x.dtype, b, h, inter, shared_width, e, k, cluster)
    partials = torch.empty(pl.num_clusters * b * h, dtype=torch.float32, device=x.device)
    logits_ws = torch.empty(pl.router_kparts * b * e, dtype=torch.float32, device=x.device)
    counter = _BARRIER_COUNTERS.get(x.device)

    p = address
    n_group, topk_group, norm_topk, scaling = routing
    code = _DTYPE_CODES[x.dtype]
    args = MoeBlockArgs(shape=_shape(code, b, h, inter, shared_width, e, k, cluster), x=p(x), norm_w=p(norm_weight),
                        w_router=p(w_router), w_gate_up=p(w_gate_up), w_down=p(w_down),
                        w_shared_gate_up=p(shared_gate_up), w_shared_down=p(shared_down), residual=p(residual),
                        out=p(out), partials=p(partials), logits_ws=p(logits_ws), topk_ids=p(topk_ids),
                        topk_weights=p(topk_weights), counter=p(counter), n_group=n_group, topk_group=topk_group,
                        norm_topk_prob=norm_topk, launch_mode=launch_mode, eps=float(eps),
                        routed_scaling_factor=scaling)
    lib = _lib(code, batch_tiles(b))
    raise_on_code(lib.cf_moe_block_launch(ctypes.byref(args), ctypes.byref(pl), stream_handle(x.device)),
                  "moe_block launch", lib, lib.cf_moe_block_error)


@torch.library.custom_op("clusterfuse::moe_block", mutates_args=())
def _moe_block_op(x: torch.Tensor, norm_weight: torch.Tensor, w_router: torch.Tensor, w_gate_up: torch.Tensor,
                  w_down: torch.Tensor, eps: float, top_k: int, n_group: int, topk_group: int, norm_topk_prob: int,
                  routed_scaling_factor: float, shared_gate_up: torch.Tensor | None,
                  shared_down: torch.Tensor | None, residual: torch.Tensor | None, cluster_size: int,
                  launch_mode: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = torch.empty(x.shape, dtype=x.dtype if residual is not None else torch.float32, device=x.device)
    topk_ids = torch.empty(x.shape[0], top_k, dtype=torch.int32, device=x.device)
    topk_weights = torch.empty(x.shape[0], top_k, dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        _launch(x, norm_weight, w_router, w_gate_up, w_down, eps,
                (n_group, topk_group, norm_topk_prob, routed_scaling_factor), shared_gate_up, shared_down,
                residual, out, topk_ids, topk_weights, cluster_size, launch_mode)
    return out, topk_ids, topk_weights


@_moe_block_op.register_fake
def _(x, norm_weight, w_router, w_gate_up, w_down, eps, top_k, n_group, topk_group, norm_topk_prob,
      routed_scaling_factor, shared_gate_up, shared_down, residual, cluster_size, launch_mode):
    return (x.new_empty(x.shape, dtype=x.dtype if residual is not None else torch.float32),
            x.new_empty((x.shape[0], top_k), dtype=torch.int32), x.new_empty((x.shape[0], top_k), dtype=torch.float32))


def _call(x, norm_weight, w_router, w_gate_up, w_down, eps, routing, shared_gate_up, shared_down, residual,
          cluster, launch_mode):
    return _moe_block_op(x, norm_weight, w_router, w_gate_up, w_down, float(eps), routing.top_k,
                         *_routing_fields(routing), shared_gate_up, shared_down, residual, cluster, launch_mode)


def choose_cluster(x: torch.Tensor, norm_weight: torch.Tensor, w_router: torch.Tensor, w_gate_up: torch.Tensor,
                   w_down: torch.Tensor, eps: float, routing: MoeRouting, *,
                   shared_gate_up: torch.Tensor | None = None, shared_down: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None, cluster_size: int | None = None,
                   options: KernelOptions = DEFAULT_KERNEL_OPTIONS) -> int:
    """The tuned cluster size for these shapes on this GPU (timed once, then cached). The time
    depends on how many experts the batch chooses: it is timed on ``x`` itself, so tune with
    representative inputs."""
    b, h = x.shape
    e, _, inter = w_down.shape
    key = TUNER.make_key("moe_block", x.device, {
        "dtype": str(x.dtype).removeprefix("torch."), "hidden": h, "intermediate": inter,
        "shared": 0 if shared_down is None else shared_down.shape[1], "experts": e, "top_k": routing.top_k,
        "batch": b, "cluster": cluster_size})
    cluster, _ = TUNER.choose_launch(
        "moe_block", key, cluster_size, "dsm", CLUSTER_SIZES, EXCHANGES,
        lambda c, _x: _call(x, norm_weight, w_router, w_gate_up, w_down, eps, routing, shared_gate_up, shared_down,
                            residual, c, options.launch_mode("ffn")),
        default_cluster=DEFAULT_CLUSTER_SIZE)
    return cluster


def moe_block(x: torch.Tensor, norm_weight: torch.Tensor, w_router: torch.Tensor, w_gate_up: torch.Tensor,
              w_down: torch.Tensor, eps: float, routing: MoeRouting, *, shared_gate_up: torch.Tensor | None = None,
              shared_down: torch.Tensor | None = None, residual: torch.Tensor | None = None,
              cluster_size: int | None = None, return_routing: bool = False,
              options: KernelOptions = DEFAULT_KERNEL_OPTIONS
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused MoE block; see the module docstring. Raises ValueError naming the bad argument."""
    _validate(x, norm_weight, w_router, w_gate_up, w_down, eps, routing, shared_gate_up, shared_down, residual,
              cluster_size)
    if not isinstance(options, KernelOptions):
        raise ValueError(f"options: expected a KernelOptions, got {type(options).__name__}")
    if not isinstance(return_routing, bool):
        raise ValueError(f"return_routing: expected a bool, got {return_routing!r}")
    if cluster_size is None:
        cluster_size = choose_cluster(x, norm_weight, w_router, w_gate_up, w_down, eps, routing,
                                      shared_gate_up=shared_gate_up, shared_down=shared_down, residual=residual,
                                      options=options)
    out, ids, weights = _call(x, norm_weight, w_router, w_gate_up, w_down, eps, routing, shared_gate_up,
                              shared_down, residual, cluster_size, options.launch_mode("ffn"))
    return (out, ids, weights) if return_routing else out
