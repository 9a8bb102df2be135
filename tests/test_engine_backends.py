"""The engine over reference models other than SmolLM2, on the CPU: DeepSeek-V2 (MLA) over a paged
latent cache, and opening a Hugging Face directory that has no tokenizer."""

from __future__ import annotations

import logging

import pytest
import torch

from clusterfuse.engine.llm_engine import LLMEngine
from clusterfuse.engine.reference_backend import ReferenceBackend
from clusterfuse.engine.runtime import open_runtime
from clusterfuse.engine.sampling import SamplingParams
from clusterfuse.models.byte_tokenizer import ByteTokenizer
from clusterfuse.reference import build_reference_model

transformers = pytest.importorskip("transformers")
from test_reference_deepseek import tiny_deepseek  # noqa: E402
from test_reference_llama import hf_weights, our_config  # noqa: E402


class IdsOnly:
    """A tokenizer for a 128-id test vocabulary (too small for bytes): prompts are ids, text is empty."""

    eos_token_ids = ()

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


def greedy_contiguous(model, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding over the model's own contiguous cache: the expected tokens."""
    cache = model.new_cache(1, len(prompt) + n)
    logits = model.forward(torch.tensor([prompt]), cache)[0, -1]
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = model.forward(torch.tensor([[out[-1]]]), cache)[0, -1]
    return out


def test_mla_model_runs_the_scheduler_over_a_paged_latent_cache():
    hf = tiny_deepseek(q_lora_rank=24)
    config = our_config(hf)
    model = build_reference_model(config, hf_weights(hf, config))
    backend = ReferenceBackend(model, page_size=4, prefill_chunk=5)
    engine = LLMEngine(backend, IdsOnly(config.vocab_size), capacity=24, max_num_seqs=3, num_pages=8)
    assert len(engine.cache.pools[0]) == 1  # one latent pool per layer
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in (9, 3, 12)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert engine.stats().preemptions > 0  # 3 requests of up to 20 rows on 8 pages of 4
    for i, p in enumerate(prompts):
        assert done[str(i)] == greedy_contiguous(model, p, 8)


def test_hf_directory_without_tokenizer_is_not_called_random(tmp_path, caplog):
    """Issue 39: real weights without a tokenizer get a byte-level tokenizer and say so, not 'random weights'."""
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    hf.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="clusterfuse"):
        runtime = open_runtime(str(tmp_path), device="cpu", dtype="fp32", backend="reference", max_num_seqs=1,
                               progress=False)
    assert "has no tokenizer" in caplog.text and "random weights" not in caplog.text
    assert isinstance(runtime.engine.tokenizer, ByteTokenizer) and runtime.engine.capacity == 64


@pytest.mark.parametrize("name", ["meta", "mps", "tpu", "cuda:99" if torch.cuda.is_available() else "cuda"])
def test_devices_nothing_here_runs_on_are_refused(name) -> None:
    """The library refuses them up front with one ValueError naming ``device`` (the CLI already does at parse)."""
    with pytest.raises(ValueError, match="^device: "):
        open_runtime(None, device=name, progress=False)
