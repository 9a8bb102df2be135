"""The reference DeepSeek-V2 (MLA over a latent cache, YaRN, MoE) against ``transformers`` (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch
from test_reference_llama import assert_matches_hf, hf_weights, our_config, rel_err, tiny

from clusterfuse.models.config import MoEConfig
from clusterfuse.reference import build_reference_model
from clusterfuse.reference.moe import route

pytest.importorskip("transformers")

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}


def tiny_deepseek(seed: int = 0, **overrides) -> torch.nn.Module:
    kwargs = dict(num_hidden_layers=3, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
                  v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                  n_shared_experts=2, first_k_dense_replace=1, rope_parameters=YARN,
                  max_position_embeddings=32)  # = original 8 x factor 4
    kwargs.update(overrides)
    return tiny("DeepseekV2ForCausalLM", seed=seed, **kwargs)


CASES = {
    "plain_q_greedy": {},
    "q_lora_group_limited": {"q_lora_rank": 24, "topk_method": "group_limited_greedy", "n_group": 4,
                             "topk_group": 2, "routed_scaling_factor": 2.5, "num_experts_per_tok": 3},
    "yarn_mscale_differs": {"rope_parameters": {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5}, "n_shared_experts": 1},
    "default_rope_two_dense": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                               "first_k_dense_replace": 2},
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case: str) -> None:
    assert_matches_hf(tiny_deepseek(seed=len(case), **CASES[case]))


def test_config_and_cache_shape() -> None:
    model = tiny_deepseek(**CASES["q_lora_group_limited"])
    config = our_config(model)
    assert config.mla.q_lora_rank == 24 and config.rope.kind == "yarn" and config.rope.factor == 4.0
    assert config.moe.topk_method == "group_limited_greedy" and config.moe.first_k_dense_replace == 1
    cache = build_reference_model(config, hf_weights(model, config)).new_cache(2, 16)
    (latent,) = cache.stores[0]
    assert tuple(latent.buffer.shape) == (2, 16, 32 + 8)


@torch.no_grad()
def test_batch_with_different_lengths_matches_each_sequence_alone() -> None:
    model = tiny_deepseek(q_lora_rank=24)
    config = our_config(model)
    ours = build_reference_model(config, hf_weights(model, config))
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 128, (1, n), generator=g) for n in (6, 3)]
    steps = torch.randint(0, 128, (2, 3), generator=g)
    alone = []
    for seq, nxt in zip(seqs, steps, strict=True):
        cache = ours.new_cache(1, 12)
        ours.forward(seq, cache)
        alone.append(torch.cat([ours.forward(nxt[t].view(1, 1), cache) for t in range(3)], dim=1))
    cache = ours.new_cache(2, 12)
    for slot, seq in enumerate(seqs):
        ours.forward(seq, cache, slots=[slot])
    batched = torch.cat([ours.forward(steps[:, t:t + 1], cache) for t in range(3)], dim=1)
    for i in range(2):
        assert rel_err(batched[i], alone[i][0]) < 1e-5


def test_norm_topk_prob_normalises_instead_of_scaling() -> None:
    """DeepSeek-V2's own code: normalised top-k weights (then no routed scaling); transformers 5 lacks it."""
    g = torch.Generator().manual_seed(0)
    x, gate = torch.randn(5, 16, generator=g), torch.randn(8, 16, generator=g)
    moe = MoEConfig(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=4, routed_scaling_factor=3.0)
    scaled, experts = route(x, gate, moe)
    normed, experts2 = route(x, gate, MoEConfig(**{**moe.__dict__, "norm_topk_prob": True}))
    assert torch.equal(experts, experts2)
    torch.testing.assert_close(normed.sum(-1), torch.ones(5))
    torch.testing.assert_close(normed, scaled / scaled.sum(-1, keepdim=True))
    probs = (x @ gate.T).softmax(-1)
    torch.testing.assert_close(scaled, 3.0 * probs.gather(1, experts))


def test_unsupported_routing_is_rejected() -> None:
    model = tiny_deepseek()
    config = our_config(model)
    bad = config.replace(moe=MoEConfig(**{**config.moe.__dict__, "scoring_func": "sigmoid"}))
    with pytest.raises(ValueError, match="scoring_func"):
        build_reference_model(bad, hf_weights(model, config))
