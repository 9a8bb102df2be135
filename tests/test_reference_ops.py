"""The reference fused-block ops (their contracts, contiguous vs paged caches, argument checks),
the RoPE tables against ``transformers``, and the KV cache."""

from __future__ import annotations

import pytest
import torch
from test_reference_llama import hf_weights, our_config, tiny

from clusterfuse.models.config import RopeConfig, rope_from_hf
from clusterfuse.reference import KVCache, attention_block, build_reference_model, ffn_block, rope_cos_sin
from clusterfuse.reference.kv_storage import PagedRowStore

transformers = pytest.importorskip("transformers")

LENS, CAPACITY, PAGE = [0, 5, 15], 16, 4  # 15 + 1 = CAPACITY: a sequence that fills the cache


@pytest.fixture(scope="module")
def qwen2():
    """A tiny Qwen2 (GQA, q/k/v bias) as HF model and as our reference model."""
    hf = tiny("Qwen2ForCausalLM", seed=5, num_key_value_heads=2)
    config = our_config(hf)
    return hf, build_reference_model(config, hf_weights(hf, config))


def poisoned_cache(model, lens: list[int], seed: int = 0) -> KVCache:
    """A cache whose rows below ``lens`` are random and every other row NaN."""
    cache = model.new_cache(len(lens), CAPACITY)
    g = torch.Generator().manual_seed(seed)
    for layer in cache.stores:
        for store in layer:
            store.buffer.copy_(torch.randn(store.buffer.shape, generator=g))
            for b, n in enumerate(lens):
                store.buffer[b, :, n:] = float("nan")
    cache.set_lengths(range(len(lens)), lens)
    return cache


def block_args(model, cache: KVCache, hidden: torch.Tensor) -> dict:
    """attention_block's arguments for layer 0 of ``model`` over ``cache`` (cloned)."""
    c = model.config
    k, v = (s.buffer.clone() for s in cache.stores[0])
    cos, sin = model.rope_tables(CAPACITY)
    return dict(hidden=hidden, norm_weight=model.input_norms[0], w_qkv=model.w_qkv[0],
                b_qkv=model.b_qkv[0], w_o=model.w_o[0], cos=cos, sin=sin, positions=cache.lengths.clone(),
                k_cache=k, v_cache=v, cache_lens=cache.lengths.clone(), num_heads=c.num_attention_heads,
                num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, eps=c.rms_norm_eps)


def bf16_args(args: dict) -> dict:
    """``args`` with every floating tensor but the RoPE tables in bf16."""
    return {k: v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in ("cos", "sin")
            else v for k, v in args.items()}


def same_with_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def to_paged(args: dict, seed: int = 0) -> dict:
    """The same cache contents in a NaN-poisoned page pool, pages in shuffled order."""
    B, nkv, _, hd = args["k_cache"].shape
    pages_per_seq = CAPACITY // PAGE
    num_pages = B * pages_per_seq + 3  # some pages belong to nobody
    order = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed))
    table = order[: B * pages_per_seq].view(B, pages_per_seq).to(torch.int32)
    paged = dict(args, block_table=table, page_size=PAGE)
    for name in ("k_cache", "v_cache"):
        pool = torch.full((num_pages, nkv, PAGE, hd), float("nan"))
        for b in range(B):
            for p in range(pages_per_seq):
                pool[table[b, p]] = args[name][b, :, p * PAGE:(p + 1) * PAGE]
        paged[name] = pool
    return paged


# ----------------------------------------------------------------------------------- attention_block
@torch.no_grad()
def test_attention_block_equals_model_attention_and_writes_only_row_cache_lens(qwen2) -> None:
    _, model = qwen2
    cache = poisoned_cache(model, LENS)
    hidden = torch.randn(len(LENS), model.config.hidden_size)
    args = block_args(model, cache, hidden)
    before = args["k_cache"].clone(), args["v_cache"].clone()
    out = attention_block(**args)

    positions = cache.lengths[:, None]
    expected = model.attention(0, hidden[:, None], positions, cache, list(range(len(LENS))), LENS)[:, 0]
    assert out.dtype == torch.float32 and out.isfinite().all()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for after, old, store in zip((args["k_cache"], args["v_cache"]), before, cache.stores[0], strict=True):
        assert same_with_nan(after, store.buffer)  # identical cache contents to the model's
        for b, n in enumerate(LENS):
            assert after[b, :, n].isfinite().all()
            untouched = torch.ones(CAPACITY, dtype=torch.bool)
            untouched[n] = False
            assert same_with_nan(after[b, :, untouched], old[b, :, untouched])
    assert args["cache_lens"].tolist() == LENS  # the caller advances


@pytest.mark.parametrize(("qk_norm", "window"), [(True, None), (False, 4), (True, 7)])
@torch.no_grad()
def test_attention_block_with_qk_norm_and_window_equals_model_attention(qk_norm, window) -> None:
    """The op's q_norm / k_norm / window (the fused op's arguments) compute what a Qwen3 / Mistral-style
    model's attention does, with heads x head_dim (4 x 32) != hidden (64)."""
    from test_prefill import tiny_config

    from clusterfuse.models.random_init import random_weights

    config = tiny_config(head_dim=32, qk_norm=qk_norm, window=window)
    model = build_reference_model(config, random_weights(config, dtype=torch.float32, seed=3))
    cache = poisoned_cache(model, LENS)
    hidden = torch.randn(len(LENS), config.hidden_size)
    features = dict(window=window)
    if qk_norm:
        features.update(q_norm=model.q_norms[0], k_norm=model.k_norms[0])
    out = attention_block(**block_args(model, cache, hidden), **features)
    expected = model.attention(0, hidden[:, None], cache.lengths[:, None], cache, list(range(len(LENS))), LENS)[:, 0]
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    if window is not None:  # the window changes the result of the sequence longer than it
        no_window = attention_block(**block_args(model, poisoned_cache(model, LENS), hidden),
                                    **dict(features, window=None))
        assert not torch.allclose(no_window[2], out[2]) and torch.allclose(no_window[0], out[0])


@torch.no_grad()
def test_attention_block_paged_equals_contiguous(qwen2) -> None:
    _, model = qwen2
    args = block_args(model, poisoned_cache(model, LENS, seed=1), torch.randn(len(LENS), model.config.hidden_size))
    paged = to_paged(args)
    pools_before = paged["k_cache"].clone()
    out = attention_block(**args)
    out_paged = attention_block(**paged)
    torch.testing.assert_close(out_paged, out, rtol=0, atol=0)
    expected = to_paged(args)  # the contiguous cache after the call, laid out in the same pages
    assert same_with_nan(paged["k_cache"], expected["k_cache"])
    assert same_with_nan(paged["v_cache"], expected["v_cache"])
    changed = (paged["k_cache"].nan_to_num(1e9) != pools_before.nan_to_num(1e9)).any(dim=(1, 2, 3))
    table = paged["block_table"]
    assert sorted(changed.nonzero().flatten().tolist()) == sorted(int(table[b, n // PAGE]) for b, n in enumerate(LENS))


@torch.no_grad()
def test_attention_block_sums_residual_partials(qwen2) -> None:
    _, model = qwen2
    cache = poisoned_cache(model, LENS)
    hidden = torch.randn(len(LENS), model.config.hidden_size)
    partials = torch.randn(3, *hidden.shape)
    with_partials = attention_block(**dict(block_args(model, cache, hidden), residual_partials=partials))
    summed = attention_block(**block_args(model, cache, hidden + partials.sum(0)))
    torch.testing.assert_close(with_partials, summed, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_residual_keyword_returns_the_next_residual_stream(qwen2) -> None:
    """``residual=`` (the fused ops' form) equals adding the residual by hand, in its dtype."""
    _, model = qwen2
    hidden = torch.randn(len(LENS), model.config.hidden_size).bfloat16()
    low = bf16_args(block_args(model, poisoned_cache(model, LENS), hidden))
    out = attention_block(**low)
    with_residual = attention_block(**low, residual=hidden)  # rewrites the same cache rows
    assert with_residual.dtype == torch.bfloat16
    assert torch.equal(with_residual, (hidden.float() + out).to(torch.bfloat16))
    c = model.config
    w = (model.post_attention_norms[0].bfloat16(), model.w_gate_up[0].bfloat16(), model.w_down[0].bfloat16())
    ffn_out = ffn_block(hidden, *w, c.rms_norm_eps)
    assert torch.equal(ffn_block(hidden, *w, c.rms_norm_eps, residual=hidden), (hidden.float() + ffn_out).bfloat16())
    with pytest.raises(ValueError, match="residual"):
        ffn_block(hidden, *w, c.rms_norm_eps, residual=hidden.float())


@torch.no_grad()
def test_attention_block_bf16_returns_fp32(qwen2) -> None:
    _, model = qwen2
    cache = poisoned_cache(model, LENS)
    hidden = torch.randn(len(LENS), model.config.hidden_size)
    args = block_args(model, cache, hidden)
    ref = attention_block(**args)
    out = attention_block(**bf16_args(block_args(model, cache, hidden)))
    assert out.dtype == torch.float32
    assert float((out - ref).norm() / ref.norm()) < 3e-2


# ----------------------------------------------------------------------------------------- ffn_block
@torch.no_grad()
def test_ffn_block_equals_transformers_mlp(qwen2) -> None:
    hf, model = qwen2
    x = torch.randn(5, model.config.hidden_size)
    layer = hf.model.layers[1]
    expected = layer.mlp(layer.post_attention_layernorm(x))
    out = ffn_block(x, model.post_attention_norms[1], model.w_gate_up[1], model.w_down[1], model.config.rms_norm_eps)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.ffn(1, x), out, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ argument checks
ATTENTION_ERRORS = {
    "hidden": lambda a: {**a, "hidden": a["hidden"][None]},
    "hidden ": lambda a: {**a, "hidden": a["hidden"].long()},
    "residual_partials": lambda a: {**a, "residual_partials": a["hidden"][None].double()},
    "norm_weight": lambda a: {**a, "norm_weight": a["norm_weight"][:-1]},
    "w_qkv": lambda a: {**a, "w_qkv": a["w_qkv"][:-1]},
    "b_qkv": lambda a: {**a, "b_qkv": a["b_qkv"][:-1]},
    "w_o": lambda a: {**a, "w_o": a["w_o"][:, :-1]},
    "cos": lambda a: {**a, "cos": a["cos"][:, :-1]},
    "sin": lambda a: {**a, "sin": a["sin"].double()},
    "positions": lambda a: {**a, "positions": a["positions"].float()},
    "positions ": lambda a: {**a, "positions": a["positions"] + 10 * CAPACITY},
    "k_cache": lambda a: {**a, "k_cache": a["k_cache"].half()},
    "v_cache": lambda a: {**a, "v_cache": a["v_cache"][:, :, :-1]},
    "cache_lens": lambda a: {**a, "cache_lens": a["cache_lens"][:-1]},
    "exceeds the cache capacity 16": lambda a: {**a, "cache_lens": a["cache_lens"] + 1},
    "num_kv_heads": lambda a: {**a, "num_kv_heads": 3},
    "head_dim": lambda a: {**a, "head_dim": 0},
    "page_size": lambda a: {**a, "page_size": PAGE},
    "page_size ": lambda a: {**to_paged(a), "page_size": None},
    "k_cache ": lambda a: {**to_paged(a), "page_size": 2 * PAGE},
    "block_table": lambda a: {**to_paged(a), "block_table": to_paged(a)["block_table"][:, :, None]},
    r"block_table\[1\]": lambda a: _poke_table(to_paged(a)),
    "q_norm": lambda a: {**a, "q_norm": torch.ones(a["head_dim"])},  # without k_norm
    "k_norm": lambda a: {**a, "q_norm": torch.ones(a["head_dim"]), "k_norm": torch.ones(a["head_dim"] + 1)},
    "window": lambda a: {**a, "window": 0},
}


def _poke_table(paged: dict) -> dict:
    table = paged["block_table"].clone()
    table[1, 0] = paged["k_cache"].shape[0]  # a page that does not exist, in use by sequence 1
    return {**paged, "block_table": table}


@pytest.mark.parametrize("name", list(ATTENTION_ERRORS))
def test_attention_block_rejects_bad_arguments(qwen2, name: str) -> None:
    _, model = qwen2
    args = block_args(model, poisoned_cache(model, LENS), torch.randn(len(LENS), model.config.hidden_size))
    with pytest.raises(ValueError, match=name.strip()):
        attention_block(**ATTENTION_ERRORS[name](args))


def test_attention_block_accepts_unused_invalid_pages(qwen2) -> None:
    """Pages past a sequence's length may be unallocated (e.g. -1): they are never read."""
    _, model = qwen2
    paged = to_paged(block_args(model, poisoned_cache(model, LENS), torch.randn(len(LENS), model.config.hidden_size)))
    paged["block_table"][0, 1:] = -1  # sequence 0 holds 0 rows: only its first page is touched
    assert attention_block(**paged).isfinite().all()


FFN_ERRORS = {
    "x": lambda a: {**a, "x": a["x"][0]},
    "norm_weight": lambda a: {**a, "norm_weight": a["norm_weight"].half()},
    "w_gate_up": lambda a: {**a, "w_gate_up": a["w_gate_up"][:-1]},
    "w_down": lambda a: {**a, "w_down": a["w_down"][:, :-1]},
}


@pytest.mark.parametrize("name", list(FFN_ERRORS))
def test_ffn_block_rejects_bad_arguments(qwen2, name: str) -> None:
    _, model = qwen2
    args = dict(x=torch.randn(2, model.config.hidden_size), norm_weight=model.post_attention_norms[0],
                w_gate_up=model.w_gate_up[0], w_down=model.w_down[0], eps=1e-6)
    with pytest.raises(ValueError, match=name):
        ffn_block(**FFN_ERRORS[name](args))


# ----------------------------------------------------------------------------------------- RoPE tables
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("kind", list(ROPES))
def test_rope_tables_match_transformers_llama(kind: str) -> None:
    config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=4096,
                                      rope_parameters=ROPES[kind])
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    positions = torch.arange(2048)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    ours_cos, ours_sin = rope_cos_sin(rope_from_hf(config.to_dict()), 64, 2048)
    torch.testing.assert_close(ours_cos, cos[0, :, :32])
    torch.testing.assert_close(ours_sin, sin[0, :, :32])


@pytest.mark.parametrize(("mscale", "mscale_all_dim"), [(0.707, 0.707), (1.0, 0.5)])
def test_rope_tables_match_transformers_deepseek_yarn(mscale: float, mscale_all_dim: float) -> None:
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": mscale, "mscale_all_dim": mscale_all_dim}
    config = transformers.DeepseekV2Config(hidden_size=256, num_attention_heads=4, qk_rope_head_dim=64,
                                           max_position_embeddings=163840, rope_parameters=rope)
    rotary = transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2RotaryEmbedding(config)
    freqs_cis = rotary(torch.zeros(1), torch.arange(0, 20000, 7)[None])[0]
    cos, sin = rope_cos_sin(rope_from_hf(config.to_dict()), 64, 20000)
    torch.testing.assert_close(cos[::7], freqs_cis.real, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin[::7], freqs_cis.imag, rtol=1e-5, atol=1e-5)


def test_rope_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rotary_dim"):
        rope_cos_sin(RopeConfig(), 7, 16)
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        rope_cos_sin(RopeConfig(kind="yarn", factor=4.0), 8, 16)


# ------------------------------------------------------------------------------------------- KV cache
def test_kv_cache_append_read_reset() -> None:
    cache = KVCache.for_heads(2, max_batch=3, capacity=6, num_kv_heads=2, head_dim=4, dtype=torch.float32,
                              device="cpu")
    k, v = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)  # [B, heads, T, D] for slots 2 and 0
    cache.append(1, [2, 0], k, v)
    cache.advance([2, 0], 4)
    assert cache.lengths.tolist() == [4, 0, 4]
    got_k, got_v = cache.read(1, 2, 4)
    assert torch.equal(got_k, k[0]) and torch.equal(got_v, v[0])
    with pytest.raises(ValueError, match="sequence of 8 tokens exceeds the cache capacity 6"):
        cache.append(1, [0], k[:1], v[:1])
    cache.reset(2)
    assert cache.lengths.tolist() == [4, 0, 0]
    with pytest.raises(ValueError, match="slots"):
        cache.reset(3)
    with pytest.raises(ValueError, match="capacity"):
        KVCache.for_latent(1, max_batch=1, capacity=0, latent_dim=8, dtype=torch.float32, device="cpu")


def test_paged_row_store_round_trip() -> None:
    pool = torch.full((5, 3, 2, 4), float("nan"))  # [pages, heads, page_size, D]
    store = PagedRowStore(pool, torch.tensor([[4, 0, 2]]))
    rows = torch.randn(3, 5, 4)
    store.write(0, 0, rows[:, :3])
    store.write(0, 3, rows[:, 3:])
    assert store.capacity == 6
    assert torch.equal(store.read(0, 5), rows)
    assert pool[1].isnan().all() and pool[3].isnan().all()
