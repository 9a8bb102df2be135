"""clusterfuse.engine.parity on the CPU, with the reference backend on both sides."""

from __future__ import annotations

import pytest
import torch

from clusterfuse.engine.parity import near_tie, teacher_forced
from clusterfuse.models.config import ModelConfig, RopeConfig
from clusterfuse.models.random_init import random_weights
from clusterfuse.reference import build_reference_model

CONFIG = ModelConfig(family="llama", architecture="LlamaForCausalLM", vocab_size=96, hidden_size=64,
                     intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, rms_norm_eps=1e-6, rope=RopeConfig(theta=10000.0), max_position_embeddings=64)


def _model(seed: int):
    return build_reference_model(CONFIG, random_weights(CONFIG, dtype=torch.float32, seed=seed), device="cpu")


def test_a_backend_against_itself_agrees_exactly():
    model = _model(0)
    r = teacher_forced(model, model, CONFIG.vocab_size, prompt_len=4, steps=6)
    assert r.errors == [0.0] * 6 and r.worst == 0.0
    assert r.agreement == 1.0 and r.not_ties == []


def test_different_weights_show_in_every_step():
    r = teacher_forced(_model(1), _model(2), CONFIG.vocab_size, prompt_len=4, steps=6)
    assert len(r.errors) == 6 and min(r.errors) > 0.1
    # Every disagreement is either counted as a near tie or listed.
    assert r.agreement * 6 + len(r.not_ties) <= 6


def test_near_tie_is_relative_to_the_logits_spread():
    logits = torch.tensor([0.0, 1.0, 0.99, -1.0])
    assert near_tie(logits, 1) and near_tie(logits, 2)
    assert not near_tie(logits, 0) and not near_tie(logits, 3)
    assert near_tie(logits, 0, tolerance=2.0)


def test_bad_lengths_are_named():
    model = _model(0)
    with pytest.raises(ValueError, match="prompt_len, steps"):
        teacher_forced(model, model, CONFIG.vocab_size, steps=0)


def test_problems_name_each_broken_part_of_the_rule():
    from clusterfuse.engine.parity import MIN_AGREEMENT, TeacherForced

    ok = TeacherForced(errors=[1e-2, 1.5e-2], agreement=MIN_AGREEMENT, not_ties=[])
    assert ok.problems(2e-2) == []
    bad = TeacherForced(errors=[1e-2, float("inf")], agreement=MIN_AGREEMENT - 0.01, not_ties=[7])
    found = bad.problems(2e-2)
    assert len(found) == 3
    assert "logits error" in found[0] and "[7]" in found[1] and "agreement" in found[2]
    assert TeacherForced(errors=[2e-2], agreement=1.0).problems(2e-2)  # the bound is strict
