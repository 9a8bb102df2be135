"""The fused kernels' C ABI, mirrored once: one ``ctypes.Structure`` per struct of
``clusterfuse/kernels/include/clusterfuse/abi/{attention_block,ffn_block,mla_block,moe_block,decode_step}.h``
(same fields, same order, same types; tests/test_kernel_abi.py compiles the headers and checks every
offset), and `bind_attention_block` / `bind_ffn_block` / `bind_mla_block` / `bind_moe_block` /
`bind_decode_step`, which declare a loaded library's entry points."""

from __future__ import annotations

import ctypes

i32, f32, ptr = ctypes.c_int32, ctypes.c_float, ctypes.c_void_p
ATTENTION_BLOCK_MAX_CLUSTER = 16  # CF_ATTENTION_BLOCK_MAX_CLUSTER


class AttentionBlockSpec(ctypes.Structure):
    _fields_ = [("dtype", i32), ("head_dim", i32), ("gqa", i32), ("max_batch", i32), ("timeline_slots", i32),
                ("threads", i32), ("qk_norm", i32), ("window", i32)]


class AttentionBlockShape(ctypes.Structure):
    _fields_ = [("batch", i32), ("hidden", i32), ("heads", i32), ("kv_heads", i32), ("cluster", i32),
                ("exchange", i32)]


class AttentionBlockPlan(ctypes.Structure):
    _fields_ = [("smem_bytes", i32), ("k_chunk", i32), ("ksplit_o", i32), ("coresident", i32),
                ("active_clusters", i32), ("partial_floats", i32), ("ksplit_qkv", i32 * ATTENTION_BLOCK_MAX_CLUSTER)]


class AttentionBlockArgs(ctypes.Structure):
    _fields_ = [("shape", AttentionBlockShape),
                *((name, ptr) for name in (
                    "hidden", "norm_w", "w_qkv", "b_qkv", "w_o", "cos", "sin", "positions", "k_cache", "v_cache",
                    "cache_lens", "block_table", "residual", "out", "partials", "ws_qkv", "ws_attn", "counters",
                    "group_counters", "error", "timeline")),
                *((name, i32) for name in ("max_pos", "positions_int64", "page_size", "max_pages", "num_pages",
                                           "kv_prefetch_keys", "launch_mode")),
                ("eps", f32), ("q_norm_w", ptr), ("k_norm_w", ptr), ("window", i32)]


class FfnBlockShape(ctypes.Structure):
    _fields_ = [("dtype", i32), ("batch", i32), ("hidden", i32), ("intermediate", i32), ("cluster", i32),
                ("dsm", i32)]


class FfnBlockPlan(ctypes.Structure):
    _fields_ = [("num_clusters", i32), ("smem_bytes", i32), ("lmax", i32), ("ksplit1", i32), ("ksplit2", i32)]


class FfnBlockArgs(ctypes.Structure):
    _fields_ = [("shape", FfnBlockShape),
                *((name, ptr) for name in ("x", "norm_w", "w_gate_up", "w_down", "residual", "out", "partials",
                                           "act_ws", "counter")),
                ("launch_mode", i32), ("eps", f32)]


class MlaBlockSpec(ctypes.Structure):
    _fields_ = [(name, i32) for name in ("dtype", "heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                         "v_head_dim", "max_batch", "cluster", "threads", "key_mma")]


class MlaBlockShape(ctypes.Structure):
    _fields_ = [("batch", i32), ("hidden", i32)]


class MlaBlockPlan(ctypes.Structure):
    _fields_ = [(name, i32) for name in ("num_clusters", "smem_bytes", "key_splits", "ksplit_proj", "ksplit_o",
                                         "partial_floats")]


class MlaBlockArgs(ctypes.Structure):
    _fields_ = [("shape", MlaBlockShape),
                *((name, ptr) for name in (
                    "hidden", "norm_w", "w_qa", "kv_norm_w", "w_uk", "w_uv", "w_o", "cos", "sin", "positions",
                    "cache", "cache_lens", "block_table", "residual", "out", "ws_proj", "ws_q", "ws_state", "ws_v",
                    "ws_y", "counter", "error")),
                *((name, i32) for name in ("max_pos", "positions_int64", "page_size", "max_pages", "num_pages")),
                ("eps", f32), ("softmax_scale", f32)]
MOE_BLOCK_MAX_EXPERTS = 256  # CF_MOE_BLOCK_MAX_EXPERTS
MOE_BLOCK_MAX_TOP_K = 16  # CF_MOE_BLOCK_MAX_TOP_K
MOE_BLOCK_MAX_GROUPS = 32  # CF_MOE_BLOCK_MAX_GROUPS


class MoeBlockShape(ctypes.Structure):
    _fields_ = [(name, i32) for name in ("dtype", "batch", "hidden", "intermediate", "shared_intermediate",
                                         "experts", "top_k", "cluster")]


class MoeBlockPlan(ctypes.Structure):
    _fields_ = [(name, i32) for name in ("num_clusters", "smem_bytes", "piece_max", "router_kparts",
                                         "router_kchunk", "ksplit_router", "ksplit1", "ksplit2")]


class MoeBlockArgs(ctypes.Structure):
    _fields_ = [("shape", MoeBlockShape),
                *((name, ptr) for name in ("x", "norm_w", "w_router", "w_gate_up", "w_down", "w_shared_gate_up",
                                           "w_shared_down", "residual", "out", "partials", "logits_ws", "topk_ids",
                                           "topk_weights", "counter")),
                *((name, i32) for name in ("n_group", "topk_group", "norm_topk_prob", "launch_mode")),
                ("eps", f32), ("routed_scaling_factor", f32)]


class DecodeStepSpec(ctypes.Structure):
    _fields_ = [(name, i32) for name in ("dtype", "head_dim", "gqa", "max_batch", "threads", "qk_norm", "window",
                                         "timeline_head", "timeline_layer_slots")]


class DecodeStepShape(ctypes.Structure):
    _fields_ = [*((name, i32) for name in ("batch", "hidden", "heads", "kv_heads", "intermediate", "layers",
                                           "cluster", "max_clusters")),
                ("attention", AttentionBlockPlan), ("ffn", FfnBlockPlan)]


class DecodeStepPlan(ctypes.Structure):
    _fields_ = [(name, i32) for name in ("smem_bytes", "clusters", "active_clusters", "partial_floats")]


class DecodeStepLayer(ctypes.Structure):
    _fields_ = [(name, ptr) for name in ("attn_norm_w", "w_qkv", "b_qkv", "w_o", "q_norm_w", "k_norm_w", "k_cache",
                                         "v_cache", "ffn_norm_w", "w_gate_up", "w_down")]


class DecodeStepArgs(ctypes.Structure):
    _fields_ = [("shape", DecodeStepShape),
                *((name, ptr) for name in ("layers", "hidden", "mid", "tmp", "out", "cos", "sin", "positions",
                                           "cache_lens", "block_table", "partials", "counter", "error")),
                *((name, i32) for name in ("max_pos", "positions_int64", "page_size", "max_pages", "num_pages",
                                           "kv_prefetch_keys", "window")),
                ("eps", f32), ("timeline", ptr)]


#: Every mirrored struct by its C name (the test walks these).
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "CfAttentionBlockSpec": AttentionBlockSpec, "CfAttentionBlockShape": AttentionBlockShape,
    "CfAttentionBlockPlan": AttentionBlockPlan, "CfAttentionBlockArgs": AttentionBlockArgs,
    "CfFfnBlockShape": FfnBlockShape, "CfFfnBlockPlan": FfnBlockPlan, "CfFfnBlockArgs": FfnBlockArgs,
    "CfMlaBlockSpec": MlaBlockSpec, "CfMlaBlockShape": MlaBlockShape, "CfMlaBlockPlan": MlaBlockPlan,
    "CfMlaBlockArgs": MlaBlockArgs,
    "CfMoeBlockShape": MoeBlockShape, "CfMoeBlockPlan": MoeBlockPlan, "CfMoeBlockArgs": MoeBlockArgs,
    "CfDecodeStepSpec": DecodeStepSpec, "CfDecodeStepShape": DecodeStepShape, "CfDecodeStepPlan": DecodeStepPlan,
    "CfDecodeStepLayer": DecodeStepLayer, "CfDecodeStepArgs": DecodeStepArgs,
}


def _declare(lib: ctypes.CDLL, op: str, shape: type, plan: type, args: type) -> ctypes.CDLL:
    """Declares ``cf_<op>_plan``, ``cf_<op>_launch`` and ``cf_<op>_error`` of a library."""
    P = ctypes.POINTER
    for name, argtypes, restype in (("plan", [P(shape), P(plan)], ctypes.c_int),
                                    ("launch", [P(args), P(plan), ptr], ctypes.c_int),
                                    ("error", [ctypes.c_int], ctypes.c_char_p)):
        fn = getattr(lib, f"cf_{op}_{name}")
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def bind_attention_block(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declares the attention library's entry points (abi/attention_block.h)."""
    lib.cf_attention_block_spec.argtypes = [ctypes.POINTER(AttentionBlockSpec)]
    lib.cf_attention_block_spec.restype = None
    return _declare(lib, "attention_block", AttentionBlockShape, AttentionBlockPlan, AttentionBlockArgs)


def bind_ffn_block(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declares the FFN library's entry points (abi/ffn_block.h)."""
    return _declare(lib, "ffn_block", FfnBlockShape, FfnBlockPlan, FfnBlockArgs)


def bind_mla_block(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declares the MLA library's entry points (abi/mla_block.h)."""
    lib.cf_mla_block_spec.argtypes = [ctypes.POINTER(MlaBlockSpec)]
    lib.cf_mla_block_spec.restype = None
    return _declare(lib, "mla_block", MlaBlockShape, MlaBlockPlan, MlaBlockArgs)


def bind_moe_block(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declares the MoE library's entry points (abi/moe_block.h)."""
    return _declare(lib, "moe_block", MoeBlockShape, MoeBlockPlan, MoeBlockArgs)


def bind_decode_step(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declares the persistent decode step library's entry points (abi/decode_step.h)."""
    lib.cf_decode_step_spec.argtypes = [ctypes.POINTER(DecodeStepSpec)]
    lib.cf_decode_step_spec.restype = None
    return _declare(lib, "decode_step", DecodeStepShape, DecodeStepPlan, DecodeStepArgs)
