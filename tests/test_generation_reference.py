"""End to end on the CPU with the embedded SmolLM2-135M-Instruct GGUF and the reference backend.

The greedy continuation must equal what Hugging Face transformers generates from the same
GGUF file (transformers dequantises GGUF itself through `gguf`), token for token.
"""

from __future__ import annotations

import pytest
import torch

from clusterfuse.engine.llm import LLM
from clusterfuse.engine.sampling import SamplingParams
from clusterfuse.models.embedded import embedded_gguf_path

PROMPT = "The three primary colors are"
TOKENS = 40


@pytest.fixture(scope="module")
def llm():
    return LLM(None, device="cpu", dtype="fp32", backend="reference", capacity=256, max_num_seqs=4, progress=False)


def test_greedy_matches_transformers_from_the_same_gguf(llm):
    transformers = pytest.importorskip("transformers")
    path = embedded_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           torch_dtype=torch.float32)
    hf.eval()
    ids = llm.tokenizer.encode(PROMPT)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=TOKENS, do_sample=False,
                          min_new_tokens=TOKENS, pad_token_id=hf.config.eos_token_id)
    expected = out[0, len(ids):].tolist()
    (res,) = llm.generate([ids], SamplingParams(max_tokens=TOKENS, ignore_eos=True))
    assert res.token_ids == expected
    assert len(res.token_ids) == TOKENS >= 32


def test_chat_answer_is_sensible(llm):
    res = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_tokens=24))
    assert "Paris" in res.text
    assert res.finish_reason == "stop"  # the end-of-turn token


def test_batch_of_different_lengths_equals_one_at_a_time(llm):
    prompts = ["Hello, my name is", "The quick brown fox jumps over the lazy dog because", "1, 2, 3,"]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    together = llm.generate(prompts, params)
    alone = [llm.generate(p, params)[0] for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_seeded_sampling_reproducible_on_a_real_model(llm):
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, max_tokens=16, seed=7, ignore_eos=True)
    a = llm.generate("Once upon a time", params)[0]
    b = llm.generate("Once upon a time", params)[0]
    assert a.token_ids == b.token_ids and a.text == b.text
