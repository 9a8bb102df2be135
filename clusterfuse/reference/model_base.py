"""What every reference model shares: weight bookkeeping, the residual stream, the cache
step, RoPE tables, the final norm and the LM head.

A decoder layer is, for every family we run::

    h = x + attention(x)       # attention starts with input_layernorm
    x = h + ffn(h)             # ffn starts with post_attention_layernorm

Blocks compute in fp32 and return fp32; the residual stream is kept in the activation
dtype (the embedding's dtype), so each block boundary rounds exactly once, as a fused
kernel that writes the stream back to memory does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch

from clusterfuse.models.config import ModelConfig
from clusterfuse.reference.kv_cache import KVCache
from clusterfuse.reference.ops import linear, rms_norm
from clusterfuse.reference.rope import rope_cos_sin


class ReferenceModel(ABC):
    """A decoder-only model over Hugging Face-named weights, run one step at a time.

    ``weights`` maps Hugging Face parameter names to tensors (``lm_head.weight`` may be absent
    when embeddings are tied); every weight must be used, so a naming mismatch fails loudly.
    Tensors are moved to ``device`` (default: the embedding's device) and keep their dtype,
    which becomes the activation dtype.
    """

    def __init__(self, config: ModelConfig, weights: Mapping[str, torch.Tensor], *,
                 device: torch.device | str | None = None) -> None:
        self.config = config
        self._weights = dict(weights)
        first = self._weights.get("model.embed_tokens.weight")
        self.device = torch.device(device) if device is not None else getattr(first, "device", torch.device("cpu"))
        self.embed = self._take("model.embed_tokens.weight")
        self.dtype = self.embed.dtype
        lm_head = self._take_optional("lm_head.weight")
        if lm_head is None and not config.tie_word_embeddings:
            raise ValueError("weights: missing 'lm_head.weight' (and tie_word_embeddings is False)")
        self.lm_head = self.embed if lm_head is None else lm_head
        self.final_norm = self._take("model.norm.weight")
        self.input_norms = [self._take(f"model.layers.{i}.input_layernorm.weight")
                            for i in range(config.num_hidden_layers)]
        self.post_attention_norms = [self._take(f"model.layers.{i}.post_attention_layernorm.weight")
                                     for i in range(config.num_hidden_layers)]
        #: RoPE tables [positions, rotary_dim / 2]; `forward` grows them to cover its positions.
        self.cos = self.sin = torch.empty(0)

    # ------------------------------------------------------------------ weights
    def _take(self, name: str) -> torch.Tensor:
        """Remove weight ``name`` from the pending set and return it on the model's device."""
        if name not in self._weights:
            raise ValueError(f"weights: missing {name!r} for a {self.config.architecture} model")
        return self._weights.pop(name).to(self.device)

    def _take_optional(self, name: str) -> torch.Tensor | None:
        return self._take(name) if name in self._weights else None

    def _finish_loading(self) -> None:
        """Called at the end of a subclass ``__init__``: every weight must have been used."""
        if self._weights:
            names = sorted(self._weights)
            shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
            raise ValueError(f"weights: {len(names)} unexpected tensors for a {self.config.architecture} "
                             f"model: {shown}")
        del self._weights

    # ------------------------------------------------------------------ family-specific parts
    @property
    @abstractmethod
    def rotary_dim(self) -> int:
        """Width of the rotated part of a query/key head."""

    @abstractmethod
    def new_cache(self, max_batch: int, capacity: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for ``max_batch`` slots of ``capacity`` tokens (dtype: activation dtype)."""

    @abstractmethod
    def attention(self, layer: int, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                  slots: list[int], starts: list[int]) -> torch.Tensor:
        """Attention block of ``layer`` (norm included, residual not): ``x [B, T, H]`` -> fp32 ``[B, T, H]``.

        Row ``i`` is cache slot ``slots[i]``, holding ``starts[i]`` rows; ``positions [B, T]``;
        ``self.cos`` / ``self.sin`` already cover every position."""

    @abstractmethod
    def ffn(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Feed-forward block of ``layer`` (norm included, residual not): ``h [N, H]`` -> fp32 ``[N, H]``."""

    # ------------------------------------------------------------------ running
    def rope_tables(self, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables covering at least ``num_positions`` positions (grown by doubling)."""
        if self.cos.shape[0] < num_positions:
            size = 1 << max(num_positions - 1, 1).bit_length()
            self.cos, self.sin = rope_cos_sin(self.config.rope, self.rotary_dim, size, self.device)
        return self.cos, self.sin

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: KVCache, slots: Sequence[int] | None = None, *,
                logits: str = "all") -> torch.Tensor:
        """Run ``input_ids [B, T]`` (prefill: T > 1, decode: T = 1) and return fp32 logits ``[B, T, vocab]``
        (``logits="last"``: only the last position's, ``[B, 1, vocab]``; a prefill chunk needs no more,
        and the LM head over every position of a long chunk would cost more than the chunk).

        Row ``i`` continues the sequence in cache slot ``slots[i]`` (default ``range(B)``); slots
        may hold different lengths.  The tokens are appended to the cache; token ``t`` of row ``i``
        sits at position ``cache.lengths[slots[i]] + t`` and sees every earlier row of its slot.
        A step that would overflow a slot raises ``ValueError`` before the cache is touched.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError("input_ids: expected a LongTensor [batch, tokens], got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                             f"{list(getattr(input_ids, 'shape', []))}")
        if logits not in ("all", "last"):
            raise ValueError(f"logits: expected 'all' or 'last', got {logits!r}")
        B, T = input_ids.shape
        if B == 0 or T == 0:
            raise ValueError(f"input_ids: expected at least one row and one token, got shape {[B, T]}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size:
            raise ValueError(f"input_ids: token ids must lie in [0, {self.config.vocab_size})")
        if len(cache.stores) != self.config.num_hidden_layers:
            raise ValueError(f"cache: has {len(cache.stores)} layers, the model {self.config.num_hidden_layers}")
        slots = list(range(B)) if slots is None else [int(s) for s in slots]
        if len(slots) != B:
            raise ValueError(f"slots: expected {B} slots (one per input row), got {len(slots)}")
        cache.check_room(slots, T)

        starts = cache.slot_lengths(slots)
        positions = (torch.tensor(starts, device=self.device)[:, None]
                     + torch.arange(T, device=self.device)[None, :])
        self.rope_tables(max(starts) + T)
        x = self.embed[input_ids.to(self.device)]
        for layer in range(self.config.num_hidden_layers):
            h = (x.float() + self.attention(layer, x, positions, cache, slots, starts)).to(self.dtype)
            x = (h.float() + self.ffn(layer, h.reshape(B * T, -1)).view(B, T, -1)).to(self.dtype)
        cache.advance(slots, T)
        if logits == "last":
            x = x[:, -1:]
        return linear(rms_norm(x, self.final_norm, self.config.rms_norm_eps), self.lm_head)

    __call__ = forward
