"""The PyTorch baseline of the fused MoE block (DeepSeek-V2 MoE layer at decode time), capturable
in one CUDA graph: static shapes, no host synchronisation, so no per-expert loop over the batch's
choices. It gathers the chosen experts' weights per (sequence, slot) and runs batched GEMVs over
them, as gpt-fast's MoE does; a sequence's choices are each read (and copied by the gather) once per
slot, so at batch > 1 an expert two sequences chose is read twice.

    block = TorchMoEBlock(preset("deepseek-v2-lite"), dtype=torch.bfloat16, device="cuda", seed=0)
    y = block(x)   # x + MoE(RMSNorm(x)), x's dtype

The weights are in the layouts `clusterfuse.ops.moe_block` takes (routed experts stacked:
``w_gate_up [E, 2I, H]``, ``w_down [E, H, I]``; the shared experts as one MLP), so a benchmark
runs both on the same tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.baselines.torch_blocks import Device, random_tensor
from clusterfuse.models.config import ModelConfig


class TorchMoEBlock:
    """RMSNorm → fp32 router → softmax → (group-limited) top-k → gathered experts' SwiGLU →
    weighted sum + shared experts' SwiGLU → residual add."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype = torch.bfloat16, device: Device = "cuda",
                 seed: int = 0) -> None:
        moe = config.moe
        if moe is None:
            raise ValueError(f"config: {config.name} has no mixture of experts")
        self.config, self.moe = config, moe
        h, e, i = config.hidden_size, moe.n_routed_experts, moe.moe_intermediate_size
        s = moe.n_shared_experts * i
        gen = torch.Generator(device=device).manual_seed(seed)
        self.norm_weight = random_tensor(gen, (h,), 0.1, dtype, device, shift=1.0)
        self.router = random_tensor(gen, (e, h), 2.0 * h**-0.5, dtype, device)  # varied routing
        self.w_gate_up = random_tensor(gen, (e, 2 * i, h), h**-0.5, dtype, device)
        self.w_down = random_tensor(gen, (e, h, i), i**-0.5, dtype, device)
        self.shared_gate_up = random_tensor(gen, (2 * s, h), h**-0.5, dtype, device) if s else None
        self.shared_down = random_tensor(gen, (h, s), s**-0.5, dtype, device) if s else None

    def route(self, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights (fp32) and experts ``[B, k]`` of the normed x, as Hugging Face's MoEGate does."""
        moe = self.moe
        scores = F.linear(normed.float(), self.router.float()).softmax(dim=-1)
        if moe.topk_method == "group_limited_greedy":
            b, per_group = scores.shape[0], moe.n_routed_experts // moe.n_group
            group_best = scores.view(b, moe.n_group, per_group).max(dim=-1).values
            kept = torch.topk(group_best, k=moe.topk_group, dim=-1).indices
            mask = torch.zeros_like(group_best).scatter_(1, kept, 1.0).bool()
            scores = scores.masked_fill(~mask.repeat_interleave(per_group, dim=1), 0.0)
        weights, experts = torch.topk(scores, k=moe.num_experts_per_tok, dim=-1)
        if moe.norm_topk_prob and moe.num_experts_per_tok > 1:
            return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20), experts
        return weights * moe.routed_scaling_factor, experts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x, (x.shape[-1],), self.norm_weight, self.config.rms_norm_eps)
        weights, experts = self.route(normed)
        gate, up = torch.einsum("bh,bkoh->bko", normed, self.w_gate_up[experts]).chunk(2, dim=-1)
        routed = torch.einsum("bki,bkhi->bkh", F.silu(gate) * up, self.w_down[experts])
        y = (routed.float() * weights[..., None]).sum(dim=1)
        if self.shared_gate_up is not None:
            gate, up = F.linear(normed, self.shared_gate_up).chunk(2, dim=-1)
            y = y + F.linear(F.silu(gate) * up, self.shared_down).float()
        return (x.float() + y).to(x.dtype)
