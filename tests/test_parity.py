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


# ---------------------------------------------------------------------------- the bf16 yardstick


def test_within_yardstick_holds_for_the_yardstick_itself_and_a_little_more():
    from clusterfuse.engine.parity import within_yardstick

    yard = [1e-2, 1.2e-2, 2e-2, 1.1e-2]
    assert within_yardstick(yard, yard) == []
    assert within_yardstick([e * 1.25 for e in yard], yard) == []  # the ratio itself, and the slack
    assert within_yardstick([1.2e-2, 0.9e-2, 1.5e-2, 2.4e-2], yard) == []  # per step it may differ


def test_within_yardstick_names_a_systematic_loss_and_a_worse_worst_step():
    from clusterfuse.engine.parity import within_yardstick

    yard = [1e-2] * 8
    found = within_yardstick([1.4e-2] * 8, yard)  # 1.4 x on every step: mean and worst
    assert len(found) == 2 and "mean" in found[0] and "worst" in found[1]
    found = within_yardstick([1e-2] * 7 + [1.5e-2], yard)  # one step: the mean holds, the worst not
    assert len(found) == 1 and "worst per-step logits error over every step 1.500e-02" in found[0]
    assert within_yardstick([1e-2] * 7 + [float("inf")], yard)  # inf (a NaN step) never passes
    with pytest.raises(ValueError, match="yardstick: expected one error per step"):
        within_yardstick([1e-2] * 3, yard)


def test_excused_steps_tighten_the_others_and_stay_under_the_yardsticks_worst():
    """Steps with a routing near tie may reach the yardstick's worst over every step (where the yardstick's
    own jump is); the other steps are held to the yardstick's worst over the other steps."""
    from clusterfuse.engine.parity import within_yardstick

    yard = [1e-2, 1e-2, 4e-2, 1e-2, 1e-2, 1e-2, 1e-2, 1e-2]  # the yardstick jumps at step 2 (a flip there)
    jump_elsewhere = [1e-2, 1e-2, 1e-2, 1e-2, 1e-2, 4e-2, 1e-2, 1e-2]  # ours at step 5 instead
    assert within_yardstick(jump_elsewhere, yard) == []  # without excused steps: only the overall worst
    assert within_yardstick(jump_elsewhere, yard, excused=[2, 5]) == []  # both steps near ties: fine
    found = within_yardstick(jump_elsewhere, yard, excused=[2])  # step 5 no tie: no jump allowed there
    assert len(found) == 1 and "no near tie in the routing" in found[0]
    found = within_yardstick([1e-2] * 5 + [6e-2, 1e-2, 1e-2], yard, excused=[2, 5])  # above 1.25 x 4e-2
    assert len(found) == 1 and "every step" in found[0]


def test_problems_with_a_yardstick_need_no_absolute_bound():
    from clusterfuse.engine.parity import AGREEMENT_SLACK, MIN_AGREEMENT, TeacherForced

    with pytest.raises(ValueError, match="max_error"):
        TeacherForced(errors=[1e-2], agreement=1.0).problems()
    r = TeacherForced(errors=[3e-2, 2e-2], agreement=1.0, yardstick=[2.8e-2, 2e-2], yardstick_agreement=1.0)
    assert r.problems() == []
    assert len(r.problems(2e-2)) == 1  # an absolute bound, where a test gives one, still applies
    assert "yardstick" in r.summary() and "3.00e-02" in r.summary()
    # The agreement floor follows a yardstick that is itself below MIN_AGREEMENT, never above it.
    low = TeacherForced(errors=[1e-2], agreement=0.93, yardstick=[1e-2], yardstick_agreement=0.949)
    assert low.agreement_floor == pytest.approx(0.949 - AGREEMENT_SLACK) and low.problems() == []
    high = TeacherForced(errors=[1e-2], agreement=0.94, yardstick=[1e-2], yardstick_agreement=1.0)
    assert high.agreement_floor == MIN_AGREEMENT and "agreement" in high.problems()[0]


def test_teacher_forced_with_a_yardstick_against_the_fp32_oracle():
    """bf16 weights: the tested model and the yardstick are the same plain reference, so their errors
    against the fp32 oracle are equal step by step, and non-zero (the bf16 activations)."""
    from clusterfuse.engine.parity import fp32_oracle

    weights = random_weights(CONFIG, dtype=torch.bfloat16, seed=3)
    bf16 = build_reference_model(CONFIG, weights, device="cpu")
    r = teacher_forced(bf16, fp32_oracle(CONFIG, weights, "cpu"), CONFIG.vocab_size, prompt_len=4, steps=6,
                       yardstick=build_reference_model(CONFIG, weights, device="cpu"))
    assert r.errors == r.yardstick and min(r.errors) > 0
    assert r.yardstick_agreement == r.agreement and r.routing_ties == []
    assert r.problems() == [] or all("agreement" in p or "near tie" in p for p in r.problems())


# ---------------------------------------------------------------------------- routing near ties


def test_router_tie_is_relative_to_the_router_logits_spread():
    from clusterfuse.engine.parity import router_tie

    logits = torch.tensor([3.0, 2.0, 1.0, 0.99, -1.0, -2.0])  # std ~1.8: 2nd/3rd gap 1.0, 3rd/4th 0.01
    assert router_tie(logits, 3) and not router_tie(logits, 2)
    assert router_tie(logits, 2, tolerance=1.0)


def test_router_watch_records_the_oracles_routing_and_teacher_forced_lists_its_ties():
    """On a narrow DeepSeek-V2 model (2 MoE layers): the watch records one row of router logits per MoE
    layer and decode step, the model's logits are those it gives unwatched, and the steps listed as
    routing near ties are those whose recorded logits are a near tie in some layer."""
    from clusterfuse.engine.parity import RouterWatch, router_tie
    from tests.deepseek_fixtures import narrow_lite_config

    config = narrow_lite_config(3)
    weights = random_weights(config, dtype=torch.float32, seed=2)
    model = build_reference_model(config, weights, device="cpu")
    stream = torch.randint(config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    plain = model.forward(stream, model.new_cache(1, 16))
    watch = RouterWatch(model)
    watched = model.forward(stream, model.new_cache(1, 16))
    recorded = watch.take()
    watch.close()
    assert torch.equal(plain, watched) and "ffn" not in vars(model)
    assert len(recorded) == 2 and recorded[0].shape == (config.moe.n_routed_experts,)

    k = config.moe.num_experts_per_tok
    r = teacher_forced(model, model, config.vocab_size, prompt_len=3, steps=20, routing_ties=True)
    expected = []
    watch = RouterWatch(model)
    cache = model.new_cache(1, 32)
    stream = torch.randint(config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(1))
    model.forward(stream[:, :3], cache)
    watch.take()
    for i in range(20):
        model.forward(stream[:, 3 + i:4 + i], cache)
        if any(router_tie(logits, k) for logits in watch.take()):
            expected.append(i)
    watch.close()
    assert r.routing_ties == expected and 0 < len(expected) < 20
    with pytest.raises(ValueError, match="routing_ties"):
        teacher_forced(_model(0), _model(0), CONFIG.vocab_size, steps=2, routing_ties=True)
