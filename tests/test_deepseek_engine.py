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


def _checked_call(real, fake):
    """``fake`` under ``real``'s signature: a call the real op would refuse to bind fails here."""
    import inspect

    signature = inspect.signature(real)

    def call(*args, **kwargs):
        signature.bind(*args, **kwargs)
        return fake(*args, **kwargs)
    return call


def test_decode_step_wiring_with_the_ops_reference_math(monkeypatch) -> None:
    """The fused backend's decode step (eager) with the three fused ops replaced by their reference
    math, called with the real ops' signatures: the arguments it passes (packed MLA weights, the
    layer's latent pool, cache lengths as positions and as the row to write, the block table, page
    size, residual, stacked experts, routing) reproduce the reference backend up to fp32 summation
    order. Batch of 3 sequences of different lengths over pages of 16 rows (prefilled by the
    reference into the backend's paged latent cache, so that only the decode step differs), 4 steps."""
    import clusterfuse.engine.fused_deepseek as fd
    from clusterfuse.ops.moe_block import MoeRouting
    from clusterfuse.reference import moe as ref_moe
    from clusterfuse.reference import ops as ref_ops
    from clusterfuse.reference.kv_storage import PagedRowStore
    from clusterfuse.reference.mla import MLAWeights, mla_self_attention

    config = narrow_lite_config()
    mla = config.mla

    def mla_math(hidden, norm_weight, weights, cos, sin, positions, latent_cache, cache_lens, *, eps, softmax_scale,
                 block_table, page_size, residual, options):
        assert latent_cache.shape[1] == page_size and residual is hidden
        nq = config.num_attention_heads * mla.qk_head_dim
        w = MLAWeights(w_kv_a=weights.w_qa[nq:], kv_a_norm=weights.kv_a_norm, w_o=weights.w_o, w_q=weights.w_qa[:nq],
                       w_kv_b=torch.cat([weights.w_uk, weights.w_uv], dim=1).flatten(0, 1))
        lens = cache_lens.tolist()
        out = mla_self_attention(ref_ops.rms_norm(hidden, norm_weight, eps)[:, None], w, mla,
                                 config.num_attention_heads, cos, sin, positions.long()[:, None],
                                 PagedRowStore(latent_cache, block_table), list(range(len(lens))), lens,
                                 softmax_scale)[:, 0]
        return (residual.float() + out).to(hidden.dtype)

    def moe_math(x, norm_weight, w_router, w_gate_up, w_down, eps, routing, *, shared_gate_up, shared_down, residual,
                 options):
        assert routing == MoeRouting.from_config(config.moe) and residual is x
        return ref_moe.moe_block(x, norm_weight, w_router, w_gate_up, w_down, eps, config.moe,
                                 shared=(shared_gate_up, shared_down), residual=residual)

    def ffn_math(x, norm_weight, w_gate_up, w_down, eps, *, residual, options):
        return ref_ops.ffn_block(x, norm_weight, w_gate_up, w_down, eps, residual=residual)

    monkeypatch.setattr(fd, "mla_block", _checked_call(fd.mla_block, mla_math))
    monkeypatch.setattr(fd, "moe_block", _checked_call(fd.moe_block, moe_math))
    monkeypatch.setattr(fd, "ffn_block", _checked_call(fd.ffn_block, ffn_math))
    weights = random_weights(config, dtype=torch.bfloat16, seed=2)
    fused = fd.FusedDeepseekModel(config, weights, device="cpu", capture_graphs=False)
    ref = ReferenceBackend(DeepseekV2ReferenceModel(config, weights))
    ours_cache, ref_cache = fused.new_cache(3, 64), ref.new_cache(3, 64)
    g = torch.Generator().manual_seed(6)
    for slot, n in enumerate((3, 17, 30)):
        ids = torch.randint(0, config.vocab_size, (1, n), generator=g)
        fused.ref.forward(ids, ours_cache, [slot], logits="last")
        ref.forward(ids, ref_cache, [slot], logits="last")
    for _ in range(4):
        ids = torch.randint(0, config.vocab_size, (3, 1), generator=g)
        got, want = fused.forward(ids, ours_cache, [2, 0, 1])[:, 0], ref.forward(ids, ref_cache, [2, 0, 1])[:, 0]
        assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert ours_cache.lengths[:3].tolist() == [7, 21, 34]


def test_a_deepseek2_gguf_loads_into_the_fused_backend(tmp_path) -> None:
    """A llama.cpp ``deepseek2`` GGUF (kv_b split into k_b / v_b, as llama.cpp writes it now) of a
    DeepSeek-V2-Lite-attention model loads into the fused backend: the kernels' packed weights equal
    those prepared from the original weights."""
    from gguf import GGMLQuantizationType as Q

    from clusterfuse.engine.fused_deepseek import FusedDeepseekModel
    from clusterfuse.models.loader import load_model
    from tests.fixtures_models import write_gguf

    config = narrow_lite_config(num_layers=2)
    weights = random_weights(config, dtype=torch.float32, seed=4)
    rope = config.rope
    write_gguf(tmp_path / "lite.gguf", config, weights, arch="deepseek2", qtype=Q.F32, split_kv_b=True,
               rope_yarn={"factor": rope.factor, "original": rope.original_max_position_embeddings,
                          "mscale_all_dim": rope.mscale_all_dim})
    loaded = load_model(str(tmp_path / "lite.gguf"), dtype=torch.bfloat16, progress=False)
    assert loaded.config.mla == config.mla and loaded.config.moe == config.moe
    from_gguf = FusedDeepseekModel(loaded.config, loaded.weights, device="cpu", capture_graphs=False)
    direct = FusedDeepseekModel(config, {k: v.to(torch.bfloat16) for k, v in weights.items()}, device="cpu",
                                capture_graphs=False)
    for a, b in zip(from_gguf.layers, direct.layers, strict=True):
        for name in ("w_qa", "kv_a_norm", "w_uk", "w_uv", "w_o"):
            assert torch.equal(getattr(a.attention, name), getattr(b.attention, name)), name
    assert torch.equal(from_gguf.layers[1].ffn.gate_up, direct.layers[1].ffn.gate_up)
    assert torch.equal(from_gguf.layers[1].ffn.down, direct.layers[1].ffn.down)


def test_bf16_prefill_writes_the_first_layers_latent_rows_as_the_reference() -> None:
    """In bf16 the prefill's first-layer latent rows are the reference's up to GEMM summation order (its
    RMSNorms round as the reference's, its projections come out in fp32 and are rounded once): what
    the MLA kernel reads from a prefilled prompt is what it would have written itself."""
    config = narrow_lite_config(num_layers=1)
    weights = random_weights(config, dtype=torch.bfloat16, seed=8)
    ours, ref = DeepseekV2ReferenceModel(config, weights), ReferenceBackend(DeepseekV2ReferenceModel(config, weights))
    prefill = DeepseekPrefill(ours, PrefillOptions(chunk=16), Fp32Matmul())
    ours_cache, ref_cache = ref.new_cache(1, 64), ref.new_cache(1, 64)
    ids = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(2))
    prefill.run(ids, ours_cache, 0)
    ref.forward(ids[None], ref_cache, [0])
    got, want = (c.stores[0][0].read(0, 40).float() for c in (ours_cache, ref_cache))
    assert ((got - want).norm() / want.norm()).item() < 1e-3
