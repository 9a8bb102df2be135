"""DeepSeek-V2 mixture of experts: top-k routing, routed SwiGLU experts, always-on shared experts."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clusterfuse.models.config import MoEConfig
from clusterfuse.reference.ops import gated_mlp, linear, rms_norm

TOPK_METHODS = ("greedy", "group_limited_greedy")


def check_moe_config(moe: MoEConfig) -> None:
    """Raise ``ValueError`` for routing settings the reference does not implement."""
    if moe.scoring_func != "softmax":
        raise ValueError(f"moe.scoring_func: only 'softmax' is supported, got {moe.scoring_func!r}")
    if moe.topk_method not in TOPK_METHODS:
        raise ValueError(f"moe.topk_method: expected one of {TOPK_METHODS}, got {moe.topk_method!r}")
    if moe.topk_method == "group_limited_greedy":
        if not moe.n_group or not moe.topk_group or moe.n_routed_experts % moe.n_group:
            raise ValueError(f"moe.n_group: group_limited_greedy needs n_group dividing n_routed_experts "
                             f"({moe.n_routed_experts}) and topk_group, got n_group={moe.n_group}, "
                             f"topk_group={moe.topk_group}")


def topk_lowest_index_first(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest of ``values`` along the last dimension, largest first, and their indices;
    equal values in index order (the lower index first, and so also the one kept at the cut).

    ``torch.topk`` leaves the order of equal values to the implementation (the CPU one returns
    them in no fixed order), so routing would depend on the device on exact ties; this is the
    rule the fused MoE kernel implements (clusterfuse/kernels/include/clusterfuse/moe/)."""
    ordered, order = torch.sort(values, dim=-1, descending=True, stable=True)
    return ordered[..., :k], order[..., :k]


def route(x: torch.Tensor, gate_weight: torch.Tensor, moe: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``num_experts_per_tok`` experts per token of ``x [N, H]``: returns fp32 weights and
    expert indices, both ``[N, k]``.

    Scores are the softmax of the router logits.  ``group_limited_greedy`` first keeps the
    ``topk_group`` groups with the best single expert, then picks the top k inside them (the
    other groups' scores count as 0).  Ties go to the lower index (`topk_lowest_index_first`).
    Following DeepSeek-V2's own modelling code, the chosen scores are either normalised to sum
    to 1 (``norm_topk_prob`` with k > 1) or multiplied by ``routed_scaling_factor``
    (transformers 5.x always does the latter; all released V2 checkpoints have
    ``norm_topk_prob = False``, where the two agree).
    """
    scores = linear(x, gate_weight).softmax(dim=-1)
    if moe.topk_method == "group_limited_greedy":
        n, per_group = moe.n_group, moe.n_routed_experts // moe.n_group
        group_best = scores.view(-1, n, per_group).max(dim=-1).values
        kept_groups = topk_lowest_index_first(group_best, moe.topk_group)[1]
        group_mask = torch.zeros_like(group_best).scatter_(1, kept_groups, 1.0)
        scores = scores.masked_fill(~group_mask.bool().repeat_interleave(per_group, dim=1), 0.0)
    weights, experts = topk_lowest_index_first(scores, moe.num_experts_per_tok)
    if moe.norm_topk_prob and moe.num_experts_per_tok > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        weights = weights * moe.routed_scaling_factor
    return weights, experts


def moe_ffn(x: torch.Tensor, gate_weight: torch.Tensor, experts_gate_up: Sequence[torch.Tensor],
            experts_down: Sequence[torch.Tensor], shared: tuple[torch.Tensor, torch.Tensor] | None,
            moe: MoEConfig) -> torch.Tensor:
    """MoE feed-forward of the normed ``x [N, H]`` -> fp32 ``[N, H]`` (residual not added).

    ``experts_gate_up[e] [2*I, H]`` / ``experts_down[e] [H, I]`` are routed expert ``e``'s
    weights (gate rows then up rows); ``shared`` the shared experts' as one wider MLP.
    """
    weights, experts = route(x, gate_weight, moe)
    return routed_experts_ffn(x, weights, experts, experts_gate_up, experts_down, shared)


def routed_experts_ffn(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                       experts_gate_up: Sequence[torch.Tensor], experts_down: Sequence[torch.Tensor],
                       shared: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """`moe_ffn` after the routing: the experts ``experts [N, k]`` chose with ``weights [N, k]``
    (fp32), each applied to its tokens and weighted, plus the shared MLP; fp32 ``[N, H]``."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in experts.unique().tolist():
        tokens, slot = (experts == e).nonzero(as_tuple=True)
        y = gated_mlp(x[tokens], experts_gate_up[e], experts_down[e])
        out.index_add_(0, tokens, y * weights[tokens, slot, None])
    if shared is not None:
        out += gated_mlp(x, *shared)
    return out


def moe_block(x: torch.Tensor, norm_weight: torch.Tensor, w_router: torch.Tensor, w_gate_up: torch.Tensor,
              w_down: torch.Tensor, eps: float, moe: MoEConfig, *,
              shared: tuple[torch.Tensor, torch.Tensor] | None = None,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """The fused MoE block op's math (`clusterfuse.ops.moe_block`): ``moe_ffn`` of
    ``RMSNorm(x) · norm_weight`` with the routed experts stacked (``w_gate_up [E, 2I, H]``,
    ``w_down [E, H, I]``); fp32 ``[B, H]``, or with ``residual`` the next residual stream
    ``(residual.float() + out).to(residual.dtype)``."""
    check_moe_config(moe)
    y = moe_ffn(rms_norm(x, norm_weight, eps), w_router, list(w_gate_up), list(w_down), shared, moe)
    return y if residual is None else (residual.float() + y).to(residual.dtype)
