"""Teacher-forced parity of two backends: both read the same token stream (a prompt, then fixed
random tokens), so every step's logits can be compared even where greedy choices would differ.

Used by the GPU tests (fused against reference) and by ``bench.flat_pdl_race``. Any two objects
with the backends' ``new_cache(batch, capacity)`` and ``forward(ids, cache)`` and a ``device``
attribute can be compared.

The bound on the logits error is a yardstick where one fits: the tested bf16 backend against the
fp32 oracle (`fp32_oracle`: the reference over the same weights in fp32) may be at most 1.25 times
as far as the plain reference in bf16 (the yardstick) is from that oracle, on the same steps
(`within_yardstick`, as the GPU prefill test bounds the prefill). An absolute bound reads bf16 noise
as a fault once a model is deep enough (SmolLM2's 30 layers: the bf16 reference itself is 2.0e-2
from the oracle) or routes (DeepSeek-V2's top-6 of 64 experts: where the 6th and 7th are a near
tie, a bf16 run may choose the other one and that step's error jumps 2-3x; `router_tie`). Measured
on the CPU by ``tools/parity_yardstick.py``. Where no fp32 copy fits (the whole DeepSeek-V2-Lite),
tests keep an absolute bound against the bf16 reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from clusterfuse.reference import ReferenceModel, build_reference_model
from clusterfuse.reference.ops import linear, rms_norm

#: A top-1 disagreement is a near tie if the reference logits of the two tokens differ by less
#: than this share of the reference logits' standard deviation.
TIE_TOLERANCE = 0.05

#: The least top-1 agreement the parity rule accepts, a floor against broken kernels: above it each
#: disagreement must be a near tie. Not higher: two correct bf16 implementations on random weights
#: (flat logits) flip 2-4 % of top-1 choices, every flip a near tie (H100, 7c6d531: the fused step
#: 96.9-97.7 %, the plain PyTorch bf16 step 95.7 %, after prompts prefilled in bf16).
MIN_AGREEMENT = 0.95

#: With a yardstick, the agreement floor is the lower of `MIN_AGREEMENT` and the yardstick's own
#: agreement with the oracle minus this: a plain bf16 implementation need not reach 95 % on every
#: model (the 3-layer DeepSeek-V2-Lite shape, CPU, tools/parity_yardstick.py deepseek3: 95.3 % for
#: the bf16 reference, 94.9 % for the bf16 prefill + reference decode, every flip a near tie). 3 %
#: is about two standard deviations of the difference of two such runs' flip counts over 256 steps.
AGREEMENT_SLACK = 0.03

#: An MoE routing is a near tie (`router_tie`) if the router logits of its k-th and k+1-th expert
#: differ by at most this share of the router logits' standard deviation. Wider than `TIE_TOLERANCE`:
#: on the 3-layer DeepSeek-V2-Lite-shaped random model (top-6 of 64, tools/parity_yardstick.py
#: deepseek3, CPU), bf16 runs chose another set than the fp32 oracle in 43 of 512 routings, at
#: oracle gaps up to 0.052 x std; 0.1 leaves room above that.
ROUTER_TIE_TOLERANCE = 0.1

#: A tested backend's per-step logits errors against the fp32 oracle may be this many times a plain
#: bf16 implementation's (the yardstick), plus `YARDSTICK_SLACK`: the GPU prefill test's rule.
YARDSTICK_RATIO = 1.25
YARDSTICK_SLACK = 1e-3


class Backend(Protocol):
    device: torch.device

    def new_cache(self, max_batch: int, capacity: int): ...

    def forward(self, input_ids: torch.Tensor, cache) -> torch.Tensor: ...


@dataclass
class TeacherForced:
    """A teacher-forced comparison against the reference (the oracle): per-step relative logits errors
    of the tested backend (inf where its logits are not finite), the share of steps whose top-1
    tokens agree, and the steps whose disagreement is no near tie; with a yardstick, the same errors
    of a plain bf16 implementation against the same oracle, and the steps (indices into ``errors``)
    where the oracle's routing is a near tie (`router_tie`) in some MoE layer."""

    errors: list[float] = field(default_factory=list)
    agreement: float = 0.0
    not_ties: list[int] = field(default_factory=list)
    yardstick: list[float] = field(default_factory=list)
    yardstick_agreement: float | None = None
    routing_ties: list[int] = field(default_factory=list)

    @property
    def worst(self) -> float:
        return max(self.errors)

    @property
    def mean(self) -> float:
        return sum(self.errors) / len(self.errors)

    def problems(self, max_error: float | None = None) -> list[str]:
        """Where this comparison breaks the engine's parity rule (empty: it holds): the errors within
        the yardstick's (`within_yardstick`, where there is one) and every step's below ``max_error``
        (where given; required without a yardstick), every top-1 disagreement a near tie, and the
        agreement at least `agreement_floor`."""
        if max_error is None and not self.yardstick:
            raise ValueError("max_error: required for a comparison without a yardstick")
        found = []
        if self.yardstick:
            found += within_yardstick(self.errors, self.yardstick, excused=self.routing_ties)
        if max_error is not None and not self.worst < max_error:
            found.append(f"worst per-step logits error {self.worst:.3e} >= {max_error:.1e}")
        if self.not_ties:
            found.append(f"top-1 disagreements that are no near tie at steps {self.not_ties}")
        if self.agreement < self.agreement_floor:
            found.append(f"top-1 agreement {self.agreement:.2%} < {self.agreement_floor:.2%}")
        return found

    @property
    def agreement_floor(self) -> float:
        """`MIN_AGREEMENT`, or with a yardstick the lower of it and the yardstick's agreement minus
        `AGREEMENT_SLACK`."""
        if self.yardstick_agreement is None:
            return MIN_AGREEMENT
        return min(MIN_AGREEMENT, self.yardstick_agreement - AGREEMENT_SLACK)

    def summary(self) -> str:
        """One line for the test log: worst and mean error, agreement, and the yardstick's."""
        line = f"worst logits error {self.worst:.2e}, mean {self.mean:.2e}, top-1 agreement {self.agreement:.2%}"
        if self.yardstick:
            line += (f"; bf16 yardstick: worst {max(self.yardstick):.2e}, mean {_mean(self.yardstick):.2e}, "
                     f"agreement {self.yardstick_agreement:.2%}")
        if self.routing_ties:
            line += f"; {len(self.routing_ties)} steps with a near tie in the oracle's routing"
        return line


def within_yardstick(errors: list[float], yardstick: list[float], excused: list[int] | tuple[int, ...] = (),
                     ratio: float = YARDSTICK_RATIO, slack: float = YARDSTICK_SLACK) -> list[str]:
    """Where per-step errors against the fp32 oracle exceed those of a plain bf16 implementation
    against the same oracle (``yardstick``, step by step; an empty list: nowhere). The rule of the
    prefill test (tests/gpu/test_prefill_gpu.py) over the steps:

    * the mean error at most ``ratio`` × the yardstick's mean + ``slack`` (a systematic loss of
      precision shows here even where no single step stands out);
    * the worst error at most ``ratio`` × the yardstick's worst + ``slack``;
    * and the same over the steps not ``excused`` (indices into ``errors``: the steps where the
      oracle's routing is a near tie, `router_tie`, so that either implementation may choose another
      expert there and the step's error jump): a step where no expert can flip is held to the
      yardstick's steps where none can. Excusing only tightens the rule on the other steps.

    NaN and inf never pass."""
    if len(errors) != len(yardstick) or not errors:
        raise ValueError(f"yardstick: expected one error per step ({len(errors)}), got {len(yardstick)}")
    found = []
    mean, ymean = _mean(errors), _mean(yardstick)
    if not mean <= ratio * ymean + slack:
        found.append(f"mean per-step logits error {mean:.3e} > {ratio} x the bf16 yardstick's {ymean:.3e} "
                     f"+ {slack:.0e}")
    found += _worst_within(errors, yardstick, list(range(len(errors))), "every step", ratio, slack)
    if excused:
        kept = [i for i in range(len(errors)) if i not in set(excused)]
        found += _worst_within(errors, yardstick, kept, "the steps with no near tie in the routing", ratio, slack)
    return found


def _worst_within(errors: list[float], yardstick: list[float], steps: list[int], which: str, ratio: float,
                  slack: float) -> list[str]:
    if not steps:
        return []
    worst, yworst = max(errors[i] for i in steps), max(yardstick[i] for i in steps)
    if worst <= ratio * yworst + slack:
        return []
    return [f"worst per-step logits error over {which} {worst:.3e} > {ratio} x the bf16 yardstick's {yworst:.3e} "
            f"+ {slack:.0e}"]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def near_tie(reference_logits: torch.Tensor, token: int, tolerance: float = TIE_TOLERANCE) -> bool:
    """Whether ``token``'s reference logit is within ``tolerance`` × the logits' standard
    deviation of the reference's best logit."""
    gap = float(reference_logits.max() - reference_logits[token])
    return gap <= tolerance * float(reference_logits.std())


def router_tie(router_logits: torch.Tensor, k: int, tolerance: float = ROUTER_TIE_TOLERANCE) -> bool:
    """Whether the ``k``-th and ``k+1``-th largest of ``router_logits [experts]`` (one token's) are a
    near tie: within ``tolerance`` × the router logits' standard deviation, as `near_tie` for top-1
    tokens. There the chosen set of ``k`` experts may differ between two correct implementations."""
    ordered = router_logits.float().sort(descending=True).values
    return float(ordered[k - 1] - ordered[k]) <= tolerance * float(router_logits.float().std())


def relative_error(tested: torch.Tensor, reference: torch.Tensor) -> float:
    """``‖tested − reference‖ / ‖reference‖`` in fp32; inf where it is not finite (NaN never passes)."""
    err = float((tested.float() - reference.float()).norm() / reference.float().norm())
    return err if math.isfinite(err) else math.inf


def fp32_oracle(config, weights: Mapping[str, torch.Tensor], device: torch.device | str) -> ReferenceModel:
    """The oracle of a model with low-precision ``weights``: the reference over the same weight values
    in fp32, so with fp32 activations (the plain reference over ``weights`` is the bf16 yardstick)."""
    return build_reference_model(config, {k: v.float() for k, v in weights.items()}, device=device)


def teacher_stream(vocab: int, prompt_len: int, steps: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    """The token stream ``[1, prompt_len + steps]`` every teacher-forced comparison reads."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(vocab, (1, prompt_len + steps), device=device, generator=gen)


class RouterWatch:
    """The router logits a DeepSeek-V2 reference model (`DeepseekV2ReferenceModel`) computes at each MoE
    layer while it runs, in call order: its ``ffn`` is wrapped (on this instance only, until `close`)
    to record ``linear(RMSNorm(h), gate)`` of the last token, the logits its routing ranks
    (`clusterfuse.reference.moe.route`), before running as before."""

    def __init__(self, model) -> None:
        self.model = model
        self.logits: list[torch.Tensor] = []
        self._ffn = model.ffn
        model.ffn = self._recording_ffn

    def _recording_ffn(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        mlp = self.model.mlp[layer]
        if "gate" in mlp:
            x = rms_norm(h[-1:], self.model.post_attention_norms[layer], self.model.config.rms_norm_eps)
            self.logits.append(linear(x, mlp["gate"])[0])
        return self._ffn(layer, h)

    def take(self) -> list[torch.Tensor]:
        """The logits recorded since the last call ([experts] each), oldest first."""
        out, self.logits = self.logits, []
        return out

    def close(self) -> None:
        del self.model.ffn  # the class's method again


def teacher_forced(tested: Backend, reference: Backend, vocab: int, *, prompt_len: int = 16, steps: int = 256,
                   seed: int = 1, yardstick: Backend | None = None, routing_ties: bool = False) -> TeacherForced:
    """Prefill the backends with the same ``prompt_len`` random tokens, then feed them the same
    ``steps`` random tokens one at a time and compare the last position's logits of ``tested`` (and
    of ``yardstick``, a plain bf16 implementation, where given) with ``reference``'s at each step.

    ``routing_ties``: ``reference`` is a DeepSeek-V2 reference model (MoE); the steps where its
    routing is a near tie (`router_tie`) in some MoE layer are listed (`TeacherForced.routing_ties`)."""
    if prompt_len < 1 or steps < 1:
        raise ValueError(f"prompt_len, steps: expected >= 1, got {prompt_len}, {steps}")
    if routing_ties and getattr(getattr(reference, "config", None), "moe", None) is None:
        raise ValueError("routing_ties: the reference must be a reference model with MoE layers")
    device = reference.device
    stream = teacher_stream(vocab, prompt_len, steps, device, seed)
    runs = [tested, reference] + ([yardstick] if yardstick is not None else [])
    caches = [b.new_cache(1, prompt_len + steps + 1) for b in runs]
    for b, cache in zip(runs, caches, strict=True):
        b.forward(stream[:, :prompt_len], cache)
    out = TeacherForced()
    agree = yagree = 0
    watch = RouterWatch(reference) if routing_ties else None
    try:
        for t in range(prompt_len, prompt_len + steps):
            ids = stream[:, t:t + 1]
            logits = [b.forward(ids, cache)[0, -1].float() for b, cache in zip(runs, caches, strict=True)]
            lt, lr = logits[0], logits[1]
            out.errors.append(relative_error(lt, lr))
            top = int(lt.argmax())
            agree += int(top == int(lr.argmax()))
            if top != int(lr.argmax()) and not near_tie(lr, top):
                out.not_ties.append(t)
            if yardstick is not None:
                out.yardstick.append(relative_error(logits[2], lr))
                yagree += int(int(logits[2].argmax()) == int(lr.argmax()))
            if watch is not None and any(router_tie(r, reference.config.moe.num_experts_per_tok)
                                         for r in watch.take()):
                out.routing_ties.append(t - prompt_len)
    finally:
        if watch is not None:
            watch.close()
    out.agreement = agree / steps
    if yardstick is not None:
        out.yardstick_agreement = yagree / steps
    return out
