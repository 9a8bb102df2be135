"""Checkpoints that store projections fused (Phi-3, Phi-4): their tensor names, and the split into ours.

Phi-3 writes ``self_attn.qkv_proj.weight`` (q rows, then k rows, then v rows) and
``mlp.gate_up_proj.weight`` (gate rows, then up rows).  The weight contract
(`clusterfuse.models.weights`) names the parts separately, as every other family does, so the
loaders split them as they read: the header check sees the fused shapes, the weight dict the parts.
"""

from __future__ import annotations

import torch

from clusterfuse.models.config import ModelConfig

#: Architectures whose checkpoints hold fused projections.
FUSED_ARCHITECTURES = ("Phi3ForCausalLM",)

#: A fused tensor's parts: (our tensor name, rows), in the order the fused tensor stacks them.
Parts = list[tuple[str, int]]


def fused_tensors(config: ModelConfig) -> dict[str, Parts]:
    """Fused checkpoint tensor name → its parts, for every layer; empty for other architectures."""
    if config.architecture not in FUSED_ARCHITECTURES:
        return {}
    d = config.head_dim
    q, kv, inter = config.num_attention_heads * d, config.num_key_value_heads * d, config.intermediate_size
    out: dict[str, Parts] = {}
    for i in range(config.num_hidden_layers):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out[attn + "qkv_proj.weight"] = [(attn + "q_proj.weight", q), (attn + "k_proj.weight", kv),
                                         (attn + "v_proj.weight", kv)]
        out[mlp + "gate_up_proj.weight"] = [(mlp + "gate_proj.weight", inter), (mlp + "up_proj.weight", inter)]
    return out


def stored_shapes(config: ModelConfig, expected: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """``expected`` (our names) as the checkpoint stores them: each fused tensor in place of its parts."""
    fused = fused_tensors(config)
    if not fused:
        return expected
    part_of = {part: name for name, parts in fused.items() for part, _ in parts}
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in expected.items():
        whole = part_of.get(name)
        if whole is None:
            out[name] = shape
        elif whole not in out:
            out[whole] = (sum(rows for _, rows in fused[whole]), shape[1])
    return out


def split_fused(parts: Parts, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The parts of one fused ``tensor`` (rows split as ``parts`` says), each its own contiguous tensor."""
    pieces = tensor.split([rows for _, rows in parts], dim=0)
    return {name: piece.contiguous() for (name, _), piece in zip(parts, pieces, strict=True)}
