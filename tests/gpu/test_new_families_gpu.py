"""Issue 40's families on a GPU: Qwen3 (QK-norm; 0.6B's heads x head_dim != hidden), Llama-3.2-1B,
Mistral with a window shorter than the context, Phi-3-mini (head_dim 96, fused projections in the file).

* checkpoints written by transformers at the real layer shapes (a few layers, a smaller vocabulary
  where the real one only costs disk) load from the directory, and our fp32 reference on the GPU
  matches transformers on the GPU with the same weights;
* the torch backend (bf16, CUDA graphs) passes teacher-forced parity against the reference;
* ``auto`` on this Hopper GPU picks fused where the kernels compute the model (Qwen3's QK-norm,
  Llama-3.2-1B, Mistral's window) and falls back to torch, saying why, where they do not (Phi-3's
  head_dim 96);
* the fused backend (bf16, CUDA graphs) passes teacher-forced parity against the reference for those
  families, past the window for Mistral;
* the fused engine on Mistral's window returns the pages that fall out of the window (poisoned with
  NaN as they go back) and generates exactly what it generates keeping every page.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from clusterfuse.engine.backend import detect_platform, resolve_backend
from clusterfuse.engine.fused_model import FusedModel
from clusterfuse.engine.llm_engine import LLMEngine
from clusterfuse.engine.paged_cache import PagedKVCache, pages_for
from clusterfuse.engine.parity import fp32_oracle, teacher_forced
from clusterfuse.engine.sampling import SamplingParams
from clusterfuse.engine.torch_model import TorchModel
from clusterfuse.models.byte_tokenizer import ByteTokenizer
from clusterfuse.models.loader import load_model
from clusterfuse.reference import build_reference_model
from tests.gpu.test_prefill_gpu import rel_err

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.gpu

#: transformers class, its config's arguments (real per-layer shapes, few layers), and why auto passes
#: over the fused kernels (None: it picks them).
CASES = {
    "qwen3-0.6b": ("Qwen3ForCausalLM", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=3, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, rope_theta=1000000.0, tie_word_embeddings=True,
        max_position_embeddings=40960), None),
    "qwen3-8b": ("Qwen3ForCausalLM", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=12288, num_hidden_layers=2, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, rope_theta=1000000.0, max_position_embeddings=40960), None),
    "llama-3.2-1b": ("LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=3, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}), None),
    "mistral-window": ("MistralForCausalLM", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, sliding_window=96, max_position_embeddings=4096), None),
    "phi3-mini": ("Phi3ForCausalLM", dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        sliding_window=None), "shape"),  # head_dim 96: not a kernel specialisation
}


def _saved(name: str, path: Path) -> torch.nn.Module:
    """The case's transformers model (seeded, fp32, on the GPU), written to ``path`` by save_pretrained."""
    cls_name, kwargs, _ = CASES[name]
    config = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # O(1) activations: attention far from uniform, norms away from 1
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in pname else noise / p.shape[-1] ** 0.5)
    model.save_pretrained(path)
    return model.cuda().eval()


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_reference_matches_transformers_on_the_gpu(name: str, tmp_path: Path) -> None:
    hf = _saved(name, tmp_path)
    loaded = load_model(str(tmp_path), device="cuda", dtype=torch.float32, progress=False)
    ours = build_reference_model(loaded.config, loaded.weights, device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    ids = torch.randint(loaded.config.vocab_size, (1, 200), device="cuda", generator=gen)
    cache = ours.new_cache(1, 208)
    mine = ours.forward(ids, cache)
    theirs = hf(ids).logits.float()
    err = rel_err(mine, theirs)
    print(f"{name}: reference vs transformers (fp32, 200 tokens) relative error {err:.2e}")
    assert err < 1e-3


@pytest.mark.parametrize("name", list(CASES))
def test_torch_backend_teacher_forced_and_auto_choice(name: str, tmp_path: Path, caplog) -> None:
    _saved(name, tmp_path)
    loaded = load_model(str(tmp_path), device="cuda", dtype=torch.bfloat16, progress=False)
    why = CASES[name][2]
    with caplog.at_level(logging.INFO, logger="clusterfuse"):
        chosen = resolve_backend("auto", detect_platform(torch.device("cuda")), config=loaded.config,
                                 dtype=torch.bfloat16)
    if why is None:
        assert chosen == "fused"
    else:
        assert chosen == "torch" and len(caplog.records) == 1 and why in caplog.records[0].getMessage()
    _check_teacher_forced(TorchModel(loaded.config, loaded.weights, device="cuda"), loaded, f"{name}: torch backend")


def _check_teacher_forced(ours, loaded, what: str) -> None:
    """``ours`` (a GPU backend over ``loaded``) against the fp32 oracle on the same weights, teacher-forced
    over 40 prompt + 160 decoded tokens (past Mistral's window of 96), within the bf16 reference's own
    error (the yardstick rule of `clusterfuse.engine.parity`)."""
    reference = build_reference_model(loaded.config, loaded.weights, device="cuda")
    r = teacher_forced(ours, fp32_oracle(loaded.config, loaded.weights, "cuda"), loaded.config.vocab_size,
                       prompt_len=40, steps=160, yardstick=reference)
    print(f"{what}: {r.summary()}")
    assert not r.problems(), r.problems()


#: The families the fused kernels compute (auto picks them: `CASES` with no reason).
FUSED_CASES = [name for name, case in CASES.items() if case[2] is None]


@pytest.mark.parametrize("name", FUSED_CASES)
def test_fused_backend_teacher_forced(name: str, tmp_path: Path) -> None:
    """The fused kernels (QK-norm, Qwen3-0.6B's heads x head_dim != hidden, Mistral's window of 96 over a
    200-token stream) against the reference on the same checkpoint, teacher-forced, bf16."""
    _saved(name, tmp_path)
    loaded = load_model(str(tmp_path), device="cuda", dtype=torch.bfloat16, progress=False)
    _check_teacher_forced(FusedModel(loaded.config, loaded.weights, device="cuda"), loaded, f"{name}: fused backend")


def _poison_returned_pages(cache: PagedKVCache) -> None:
    """Fill every page ``cache`` returns to the pool with NaN in all layers: a kernel or prefill that
    still read one (it is reused only by rows written before they are read) would make NaN logits."""
    release = cache.release_before

    def release_before(slot: int, row: int) -> int:
        held = cache.pages_of(slot)
        n = release(slot, row)
        if n:
            gone = torch.tensor(held[:n], device=cache.block_table.device)
            for pool in (*cache.k_pools, *cache.v_pools):
                pool[gone] = float("nan")
        return n

    cache.release_before = release_before


def test_fused_engine_frees_pages_out_of_the_window(tmp_path: Path) -> None:
    """Mistral's window (96) on the fused engine (bf16, CUDA graphs), two requests generating 600 and
    450 tokens after prompts of 150 and 37 (past six windows): returning the pages that fall out of the
    window (NaN-poisoned) gives the same greedy tokens as keeping every page, and after the prompts the
    pages in use stay within a window's per request (without freeing they grow to the sequences')."""
    _saved("mistral-window", tmp_path)
    loaded = load_model(str(tmp_path), device="cuda", dtype=torch.bfloat16, progress=False)
    backend = FusedModel(loaded.config, loaded.weights, device="cuda")
    window, page = loaded.config.sliding_window, backend.page_size
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, loaded.config.vocab_size, (n,), generator=gen).tolist() for n in (150, 37)]
    runs = {}
    for free in (True, False):
        engine = LLMEngine(backend, ByteTokenizer(loaded.config.vocab_size), capacity=1024, max_num_seqs=2,
                           free_window_pages=free)
        if free:
            _poison_returned_pages(engine.cache)
        for i, (p, n) in enumerate(zip(prompts, (600, 450), strict=True)):
            engine.add_request(str(i), p, SamplingParams(max_tokens=n, ignore_eos=True))
        done, used = {}, []
        while engine.has_unfinished():
            done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
            used.append(engine.stats().kv_pages_used)
        runs[free] = (done, used)
        backend.release_graphs(engine.cache)
    (freed, used_freed), (kept, used_kept) = runs[True], runs[False]
    assert freed == kept and [len(freed[k]) for k in ("0", "1")] == [600, 450]
    per_request = pages_for(window + 15, page) + 1  # the window's rows from its first 16-key tile
    assert max(used_freed[10:]) <= 2 * per_request
    assert max(used_kept) >= pages_for(150 + 450, page) + pages_for(37 + 450, page) - 2  # both near their ends
