"""The torch backend (`clusterfuse.engine.torch_model`) on the CPU, decode step run eagerly
(``capture_graphs=False``), against the fp32 reference: teacher-forced parity, batches of
sequences at different lengths, and the backend protocol's attributes and errors."""

from __future__ import annotations

import pytest
import torch

from clusterfuse.engine.decode_graphs import bucket_for, seq_class_for, seq_classes
from clusterfuse.engine.parity import teacher_forced
from clusterfuse.engine.prefill import PrefillOptions
from clusterfuse.engine.torch_model import TORCH_BATCH_BUCKETS, TorchModel
from clusterfuse.models.random_init import random_weights
from clusterfuse.reference import build_reference_model
from tests.test_prefill import CONFIGS, rel_err


def models(name: str = "gqa", dtype: torch.dtype = torch.float32):
    config = CONFIGS[name]
    weights = random_weights(config, dtype=dtype, seed=2)
    return (TorchModel(config, weights, device="cpu", capture_graphs=False, prefill=PrefillOptions(chunk=8)),
            build_reference_model(config, weights))


@pytest.mark.parametrize("name", ["gqa", "mha", "gqa4_llama3_rope", "qkv_bias_tied", "qk_norm_wide_heads",
                                  "sliding_window"])
def test_teacher_forced_parity_fp32(name: str) -> None:
    ours, ref = models(name)
    r = teacher_forced(ours, ref, 97, prompt_len=11, steps=40)  # crosses pages of 16 rows
    assert r.worst < 1e-5, r.errors
    assert r.agreement == 1.0


def test_batched_decode_at_different_lengths_matches_each_alone() -> None:
    ours, ref = models("gqa4_llama3_rope")
    gen = torch.Generator().manual_seed(1)
    prompts = {0: 5, 2: 17, 3: 33}  # slot -> prompt length
    oc, rc = ours.new_cache(4, 64), ref.new_cache(4, 64)
    for slot, n in prompts.items():
        ids = torch.randint(97, (1, n), generator=gen)
        ours.forward(ids, oc, [slot], logits="last")
        ref.forward(ids, rc, [slot])
    slots = [3, 0, 2]
    for _ in range(6):
        ids = torch.randint(97, (3, 1), generator=gen)
        assert rel_err(ours.forward(ids, oc, slots), ref.forward(ids, rc, slots)) < 1e-5
    assert oc.slot_lengths(slots) == [39, 11, 23]


def test_bf16_decode_within_tolerance() -> None:
    ours, ref = models("gqa", dtype=torch.bfloat16)
    r = teacher_forced(ours, ref, 97, prompt_len=9, steps=20)
    assert r.worst < 3e-2 and not r.not_ties  # two bf16 roundings of a 64-wide toy model (see test_prefill)


def test_protocol_attributes() -> None:
    ours, _ = models()
    assert ours.prefill_chunk == 8
    assert ours.max_decode_batch == TORCH_BATCH_BUCKETS[-1] == 64
    assert bucket_for(17, TORCH_BATCH_BUCKETS) == 32
    with pytest.raises(ValueError, match="at most 64"):
        bucket_for(65, TORCH_BATCH_BUCKETS)
    assert seq_class_for(1500, 3000) == 3000 and seq_classes(3000) == [1024, 3000]


def test_graph_capture_needs_a_gpu() -> None:
    config = CONFIGS["gqa"]
    with pytest.raises(ValueError, match="capture_graphs"):
        TorchModel(config, random_weights(config, dtype=torch.float32), device="cpu")


def test_decode_checks_its_arguments() -> None:
    ours, _ = models()
    cache = ours.new_cache(2, 16)
    with pytest.raises(ValueError, match="slots"):
        ours.forward(torch.zeros(2, 1, dtype=torch.long), cache, [0, 0])
    with pytest.raises(ValueError, match="input_ids"):
        ours.forward(torch.zeros(1, 1, dtype=torch.int32), cache, [0])
    with pytest.raises(ValueError, match="cache"):
        ours.forward(torch.zeros(1, 1, dtype=torch.long), object(), [0])
    ours.forward(torch.zeros(1, 16, dtype=torch.long), cache, [0])
    with pytest.raises(ValueError, match="capacity"):  # full slot: nothing written
        ours.forward(torch.zeros(1, 1, dtype=torch.long), cache, [0])
    assert cache.slot_lengths([0]) == [16]
