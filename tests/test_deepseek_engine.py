"""DeepSeek-V2 on the fused backend, the parts that run without a GPU: the GPU prefill's math in fp32
against the reference (logits and the latent rows it writes, chunked and continuing a slot), and
the weights the fused ops get (`prepare_layers`: MLA packing, experts stacked) against the
reference's layout, held once. The decode step itself (the fused ops) runs in
tests/gpu/test_deepseek_engine_gpu.py."""

from __future__ import annotations

import pytest
import torch

from clusterfuse.engine.deepseek_layers import DeepseekPrefill
from clusterfuse.engine.llama_layers import Fp32Matmul
from clusterfuse.engine.prefill import PrefillOptions
from clusterfuse.engine.reference_backend import ReferenceBackend
from clusterfuse.models.random_init import random_weights
from clusterfuse.reference.deepseek_v2 import DeepseekV2ReferenceModel
from tests.deepseek_fixtures import narrow_lite_config


def _reference(config, dtype=torch.float32, seed=3) -> DeepseekV2ReferenceModel:
    return DeepseekV2ReferenceModel(config, random_weights(config, dtype=dtype, seed=seed))


@pytest.mark.parametrize(("changes", "chunk"), [({}, 2048), ({}, 5),
                                                ({"topk_method": "group_limited_greedy", "n_group": 4,
                                                  "topk_group": 2, "routed_scaling_factor": 2.5}, 7)])
def test_prefill_matches_the_reference_fp32(changes: dict, chunk: int) -> None:
    """Two prompts into two slots (the second continued by a second prompt: a chunk attends to the
    slot's earlier pages), every position's logits and every latent row equal to the reference's
    up to fp32 rounding: the latent row layout is the reference's, which the MLA kernel reads."""
    config = narrow_lite_config(**changes)
    ours, ref = _reference(config), ReferenceBackend(_reference(config))
    prefill = DeepseekPrefill(ours, PrefillOptions(chunk=chunk), Fp32Matmul())
    ours_cache, ref_cache = ref.new_cache(3, 64), ref.new_cache(3, 64)
    g = torch.Generator().manual_seed(5)
    for slot, n in ((2, 13), (0, 9), (2, 6)):
        ids = torch.randint(0, config.vocab_size, (n,), generator=g)
        got = prefill.run(ids, ours_cache, slot, logits="all")
        want = ref.forward(ids[None], ref_cache, [slot])[0]
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert ours_cache.lengths.tolist() == ref_cache.lengths.tolist() == [9, 0, 19]
    assert ours_cache.block_table.tolist() == ref_cache.block_table.tolist()
    for layer in range(config.num_hidden_layers):
        assert torch.allclose(ours_cache.k_pools[layer], ref_cache.k_pools[layer], rtol=1e-5, atol=1e-5)


def test_prefill_last_logits_are_the_last_of_all() -> None:
    config = narrow_lite_config(num_layers=2)
    model = _reference(config)
    prefill = DeepseekPrefill(model, PrefillOptions(chunk=4), Fp32Matmul())
    backend = ReferenceBackend(model)
    ids = torch.randint(0, config.vocab_size, (11,), generator=torch.Generator().manual_seed(1))
    every = prefill.run(ids, backend.new_cache(2, 32), 0, logits="all")
    last = prefill.run(ids, backend.new_cache(2, 32), 0, logits="last")
    assert last.shape == (1, config.vocab_size)
    assert torch.allclose(last[0], every[-1], rtol=1e-5, atol=1e-5)  # one GEMM row vs several: BLAS rounding


def test_prepared_weights_are_the_references_held_once() -> None:
    """`prepare_layers`: the dense layer keeps its SwiGLU weights; an MoE layer's experts are stacked
    [E, 2I, H] / [E, H, I] in expert order, the reference's per-expert lists become views of them
    (same storage), the shared experts and router are the reference's own; the MLA weights are
    packed as `prepare_mla_weights` does and the reference's w_q / w_kv_a are views of w_qa."""
    from clusterfuse.engine.fused_deepseek import DenseFfnWeights, MoeLayerWeights, prepare_layers

    config = narrow_lite_config()
    ref = _reference(config, dtype=torch.bfloat16)
    before = [dict(m) for m in ref.mlp]
    before_experts = [[t.clone() for t in m.get("experts_gate_up", [])] for m in ref.mlp]
    w_q, w_kv_a = [a.w_q.clone() for a in ref.attn], [a.w_kv_a.clone() for a in ref.attn]
    layers = prepare_layers(ref)
    assert isinstance(layers[0].ffn, DenseFfnWeights)
    assert layers[0].ffn.gate_up is before[0]["gate_up"] and layers[0].ffn.down is before[0]["down"]
    E, I, H = 8, 32, config.hidden_size
    for layer in (1, 2):
        ffn, mlp = layers[layer].ffn, ref.mlp[layer]
        assert isinstance(ffn, MoeLayerWeights)
        assert ffn.gate_up.shape == (E, 2 * I, H) and ffn.down.shape == (E, H, I)
        assert ffn.gate_up.is_contiguous() and ffn.down.is_contiguous()
        for e in range(E):
            assert torch.equal(ffn.gate_up[e], before_experts[layer][e])
            assert mlp["experts_gate_up"][e].data_ptr() == ffn.gate_up[e].data_ptr()
            assert mlp["experts_down"][e].data_ptr() == ffn.down[e].data_ptr()
        assert ffn.router is mlp["gate"]
        assert ffn.shared_gate_up is mlp["shared"][0] and ffn.shared_down is mlp["shared"][1]
        assert ffn.shared_gate_up.shape == (2 * 2 * I, H)
    for layer, a in enumerate(ref.attn):
        packed = layers[layer].attention
        assert torch.equal(packed.w_qa, torch.cat([w_q[layer], w_kv_a[layer]]))
        assert a.w_q.data_ptr() == packed.w_qa.data_ptr() and torch.equal(a.w_q, w_q[layer])
        assert torch.equal(a.w_kv_a, w_kv_a[layer])
        assert torch.equal(packed.w_uk.flatten(0, 1), a.w_kv_b.view(16, 256, 512)[:, :128].flatten(0, 1))


def test_fused_backend_builds_on_the_cpu_without_graphs() -> None:
    """The backend's load-time work runs anywhere (the fused ops only at decode): its cache is the
    latent layout the MLA kernel reads, sized by latent rows; fp32 weights and a Llama config are
    refused naming the argument."""
    from clusterfuse.engine.fused_deepseek import FusedDeepseekModel

    config = narrow_lite_config()
    weights = random_weights(config, dtype=torch.bfloat16, seed=1)
    model = FusedDeepseekModel(config, weights, device="cpu", capture_graphs=False)
    cache = model.new_cache(2, 40)
    assert len(cache.k_pools) == 3 and cache.v_pools == []
    assert cache.k_pools[0].shape == (cache.num_pages, 16, 576) and cache.k_pools[0].dtype == torch.bfloat16
    assert cache.max_batch == 3 and cache.pages_of(2) != []  # the scratch slot holds its page
    assert model.page_bytes() == 3 * 16 * 576 * 2
    assert model.routing.top_k == 2 and model.routing.n_group == 0
    with pytest.raises(ValueError, match="dtype: the fused kernels run bf16 or fp16"):
        FusedDeepseekModel(config, random_weights(config, dtype=torch.float32), device="cpu", capture_graphs=False)
    from tests.test_prefill import CONFIGS

    with pytest.raises(ValueError, match="config.family: the fused backend runs the deepseek_v2 family"):
        FusedDeepseekModel(CONFIGS["gqa"], {}, device="cpu", capture_graphs=False)
