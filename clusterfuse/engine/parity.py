"""Teacher-forced parity of two backends: both read the same token stream (a prompt, then fixed
random tokens), so every step's logits can be compared even where greedy choices would differ.

Used by the GPU tests (fused against reference) and by ``bench.flat_pdl_race``. Any two objects
with the backends' ``new_cache(batch, capacity)`` and ``forward(ids, cache)`` and a ``device``
attribute can be compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

#: A top-1 disagreement is a near tie if the reference logits of the two tokens differ by less
#: than this share of the reference logits' standard deviation.
TIE_TOLERANCE = 0.05

#: The least top-1 agreement the parity rule accepts, a floor against broken kernels: above it each
#: disagreement must be a near tie. Not higher: two correct bf16 implementations on random weights
#: (flat logits) flip 2-4 % of top-1 choices, every flip a near tie (H100, 7c6d531: the fused step
#: 96.9-97.7 %, the plain PyTorch bf16 step 95.7 %, after prompts prefilled in bf16).
MIN_AGREEMENT = 0.95


class Backend(Protocol):
    device: torch.device

    def new_cache(self, max_batch: int, capacity: int): ...

    def forward(self, input_ids: torch.Tensor, cache) -> torch.Tensor: ...


@dataclass
class TeacherForced:
    """Per-step relative logits errors (inf where the tested logits are not finite), the share
    of steps whose top-1 tokens agree, and the steps whose disagreement is no near tie."""

    errors: list[float] = field(default_factory=list)
    agreement: float = 0.0
    not_ties: list[int] = field(default_factory=list)

    @property
    def worst(self) -> float:
        return max(self.errors)

    def problems(self, max_error: float) -> list[str]:
        """Where this comparison breaks the engine's parity rule (empty: it holds): every step's
        relative logits error below ``max_error``, every top-1 disagreement a near tie, and the
        agreement at least `MIN_AGREEMENT`."""
        found = []
        if not self.worst < max_error:
            found.append(f"worst per-step logits error {self.worst:.3e} >= {max_error:.1e}")
        if self.not_ties:
            found.append(f"top-1 disagreements that are no near tie at steps {self.not_ties}")
        if self.agreement < MIN_AGREEMENT:
            found.append(f"top-1 agreement {self.agreement:.2%} < {MIN_AGREEMENT:.0%}")
        return found


def near_tie(reference_logits: torch.Tensor, token: int, tolerance: float = TIE_TOLERANCE) -> bool:
    """Whether ``token``'s reference logit is within ``tolerance`` × the logits' standard
    deviation of the reference's best logit."""
    gap = float(reference_logits.max() - reference_logits[token])
    return gap <= tolerance * float(reference_logits.std())


def teacher_forced(tested: Backend, reference: Backend, vocab: int, *, prompt_len: int = 16, steps: int = 256,
                   seed: int = 1) -> TeacherForced:
    """Prefill both backends with the same ``prompt_len`` random tokens, then feed both the same
    ``steps`` random tokens one at a time and compare the last position's logits at each step."""
    if prompt_len < 1 or steps < 1:
        raise ValueError(f"prompt_len, steps: expected >= 1, got {prompt_len}, {steps}")
    device = reference.device
    gen = torch.Generator(device=device).manual_seed(seed)
    stream = torch.randint(vocab, (1, prompt_len + steps), device=device, generator=gen)
    tcache, rcache = (b.new_cache(1, prompt_len + steps + 1) for b in (tested, reference))
    tested.forward(stream[:, :prompt_len], tcache)
    reference.forward(stream[:, :prompt_len], rcache)
    out = TeacherForced()
    agree = 0
    for t in range(prompt_len, prompt_len + steps):
        ids = stream[:, t:t + 1]
        lt = tested.forward(ids, tcache)[0, -1].float()
        lr = reference.forward(ids, rcache)[0, -1].float()
        err = float((lt - lr).norm() / lr.norm())
        out.errors.append(err if math.isfinite(err) else math.inf)
        top = int(lt.argmax())
        agree += int(top == int(lr.argmax()))
        if top != int(lr.argmax()) and not near_tie(lr, top):
            out.not_ties.append(t)
    out.agreement = agree / steps
    return out
