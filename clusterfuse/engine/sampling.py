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

from clusterfuse.reference.kv_cache import host_tensor

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


def filter_logits(logits: torch.Tensor, top_k: int | torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) sets to -inf.  logits: [B, V] fp32.

    ``top_k``, ``top_p``: one value for every row (0 and 1 disable them), or one per row as [B, 1]
    tensors on the logits' device holding the effective values (k = V and p = inf keep every
    token; `sample_rows` builds them with `row_values`). A row's result does not depend on the
    other rows. Ties with the k-th largest logit stay; the nucleus is the smallest prefix, in
    descending order, whose mass reaches top_p."""
    vocab = logits.shape[-1]
    per_row_k, per_row_p = isinstance(top_k, torch.Tensor), isinstance(top_p, torch.Tensor)
    k_on = per_row_k or 0 < top_k < vocab
    p_on = per_row_p or top_p < 1.0
    if not (k_on or p_on):
        return logits
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    if k_on:
        kth = ordered.gather(-1, top_k - 1) if per_row_k else ordered[:, top_k - 1:top_k]
        logits = logits.masked_fill(logits < kth, float("-inf"))
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))  # still in descending order
    if p_on:
        probs = torch.softmax(ordered, dim=-1)
        # Drop a token when the mass before it already reaches top_p; the first token always stays.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def row_values(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> float | torch.Tensor:
    """One sampling parameter per row: the value itself where every row has the same one, else a
    [B, 1] tensor on ``device``, copied from pinned memory without waiting for the device."""
    if all(v == values[0] for v in values):
        return values[0]
    return host_tensor(list(values), dtype, device).to(device, non_blocking=True)[:, None]


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of ``logits [B, V]``, row ``i`` drawn with ``params[i]`` from its own
    ``generators[i]``: a seeded request draws the same numbers whatever else shares its batch.

    Batched: the sampled rows are scaled, filtered and drawn together, with per-row temperatures
    and filters where the rows differ; only the noise is drawn row by row (one call per row, each
    from its row's generator). At batch 16 with top-p that is 30 torch ops (GPU kernel launches)
    where a draw per row took 242, and each row's token is the one it would get alone. Greedy rows
    take the argmax. Nothing waits for the device."""
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return torch.argmax(logits, dim=-1)
    device, vocab = logits.device, logits.shape[-1]
    index = None if len(rows) == len(params) else host_tensor(rows, torch.long, device).to(device, non_blocking=True)
    sampled = logits if index is None else logits.index_select(0, index)
    chosen = [params[i] for i in rows]
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in chosen]
    ps = [p.top_p for p in chosen]
    # Where the rows differ, per row: the effective k (V keeps every token) and threshold (inf keeps all).
    top_k = ks[0] if len(set(ks)) == 1 else row_values([k or vocab for k in ks], torch.long, device)
    top_p = ps[0] if len(set(ps)) == 1 else row_values([p if p < 1.0 else math.inf for p in ps], torch.float32,
                                                       device)
    temperature = row_values([p.temperature for p in chosen], torch.float32, device)
    scaled = filter_logits(sampled.float() / temperature, top_k, top_p)
    probs = torch.softmax(scaled, dim=-1)
    noise = torch.empty_like(probs)
    for row, i in enumerate(rows):
        noise[row].exponential_(generator=generators[i])
    tokens = _exponential_race(probs, noise)
    if index is None:
        return tokens
    return torch.argmax(logits, dim=-1).index_copy(0, index, tokens)  # the greedy rows' argmax


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V] with the same params, all rows' noise from one
    generator; returns int64 ids [B] on the logits' device."""
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [batch, vocab], got shape {tuple(logits.shape)}")
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    scaled = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(scaled, dim=-1)
    return _exponential_race(probs, torch.empty_like(probs).exponential_(generator=generator))


def _exponential_race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """With E_i ~ Exp(1) drawn independently (``noise``, overwritten), argmax_i p_i / E_i is token i
    with probability p_i (one multinomial draw per row). Unlike torch.multinomial, whose input checks
    read back to the host in some torch releases, it never waits for the GPU. E is kept off 0, so
    filtered tokens (p = 0) score 0 and are never picked."""
    return torch.argmax(probs / noise.clamp_min_(torch.finfo(probs.dtype).tiny), dim=-1)
