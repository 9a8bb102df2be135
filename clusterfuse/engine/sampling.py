"""Token sampling: greedy, temperature, top-k and top-p, seeded for reproducibility.

Sampling runs on the logits' device with a seeded ``torch.Generator`` so the same
seed gives the same tokens on the same device, and no host synchronisation is needed
until the caller reads the ids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

#: The seeds a torch.Generator takes (a signed or an unsigned 64-bit integer); others fail in the engine.
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token and when to stop.

    ``temperature == 0`` means greedy (argmax); ``top_k == 0`` and ``top_p == 1`` disable
    those filters.  ``seed`` makes sampling reproducible (None: a random seed).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 128
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature: expected a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k: expected an integer >= 0 (0 disables), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: expected a value in (0, 1], got {self.top_p!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens: expected an integer >= 1, got {self.max_tokens!r}")
        if isinstance(self.stop, str):  # a lone string would otherwise stop on each of its characters
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop: expected non-empty strings, got {list(self.stop)!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise ValueError(f"seed: expected an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]} or None, "
                             f"got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator on ``device``, seeded with ``seed`` or from the OS when None."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) sets to -inf.  logits: [B, V] fp32."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p; the first token always stays.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of ``logits [B, V]``, row ``i`` drawn with ``params[i]`` from its own
    ``generators[i]``: a seeded request draws the same numbers whatever else shares its batch.
    Greedy rows share one argmax; each sampled row is drawn on its own. Nothing waits for the device."""
    if all(p.greedy for p in params):
        return torch.argmax(logits, dim=-1)
    best = torch.argmax(logits, dim=-1)
    rows = [best[i:i + 1] if p.greedy else sample(logits[i:i + 1], p, g)
            for i, (p, g) in enumerate(zip(params, generators, strict=True))]
    return torch.cat(rows)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V]; returns int64 ids [B] on the logits' device."""
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [batch, vocab], got shape {tuple(logits.shape)}")
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    scaled = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(scaled, dim=-1)
    # An exponential race: with E_i ~ Exp(1) drawn independently, argmax_i p_i / E_i is token i with
    # probability p_i (one multinomial draw). Unlike torch.multinomial, whose input checks read back
    # to the host in some torch releases, it never waits for the GPU. E is kept off 0, so filtered
    # tokens (p = 0) score 0 and are never picked.
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return torch.argmax(probs / race, dim=-1)
