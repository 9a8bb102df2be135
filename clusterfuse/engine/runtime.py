"""Opening a model for generation: load weights and tokenizer, pick device/dtype/backend, build the engine."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import PurePath

from clusterfuse.engine.backend import (
    Platform,
    build_backend,
    detect_platform,
    resolve_backend,
    resolve_device,
    resolve_dtype,
)
from clusterfuse.engine.llm_engine import LLMEngine
from clusterfuse.models.byte_tokenizer import ByteTokenizer
from clusterfuse.models.loader import LoadedModel, load_model

log = logging.getLogger("clusterfuse")

#: Default KV-cache capacity when neither the user nor the model asks for less.
DEFAULT_CAPACITY = 4096


@dataclass
class Runtime:
    """An engine plus what was chosen to build it."""

    engine: LLMEngine
    model: LoadedModel
    platform: Platform
    backend: str


def open_runtime(model: str | None = None, *, device: str = "auto", dtype: str = "auto", backend: str = "auto",
                 capacity: int | None = None, max_num_seqs: int = 16, num_pages: int | None = None,
                 seed: int | None = None, progress: bool = True) -> Runtime:
    """Load ``model`` (see `load_model`) and build an `LLMEngine` on the chosen backend.

    ``capacity``: prompt + generated tokens per request (default: the model's context, at most
    `DEFAULT_CAPACITY`); ``max_num_seqs``: requests running at once; ``num_pages``: KV pages in the
    pool (default: the backend's choice, sized to memory)."""
    if capacity is not None and capacity < 2:
        raise ValueError(f"capacity: expected at least 2 tokens, got {capacity}")
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs: expected a positive integer, got {max_num_seqs}")
    dev = resolve_device(device)
    platform = detect_platform(dev)
    if backend != "auto":  # a bad or unavailable forced backend fails before the (slow) loading
        resolve_backend(backend, platform)
    weights_dtype = resolve_dtype(dtype, dev)
    loaded = load_model(model, device=dev, dtype=weights_dtype, seed=seed or 0, progress=progress)
    positions = loaded.config.max_position_embeddings
    if capacity is not None and capacity > positions:  # RoPE past the trained context gives noise, not an error
        raise ValueError(f"capacity: {capacity} tokens exceed the model's context of {positions} positions "
                         "(max_position_embeddings)")
    cap = capacity or min(positions, DEFAULT_CAPACITY)
    chosen = resolve_backend(backend, platform, config=loaded.config, dtype=weights_dtype)
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        if loaded.source.startswith("preset:"):
            log.warning("%s has random weights and no tokenizer: using a byte-level tokenizer, the text is noise "
                        "(the timings are real)", loaded.source)
        else:
            log.warning("%s has no tokenizer: using a byte-level tokenizer (prompts are read as UTF-8 bytes, "
                        "generated ids outside the byte range print as <id>)", loaded.source)
        tokenizer = ByteTokenizer(loaded.config.vocab_size, loaded.config.bos_token_id, loaded.config.eos_token_ids)
    if chosen in ("fused", "torch"):
        model_backend = build_backend(chosen, loaded.config, loaded.weights, device=dev)
    else:
        from clusterfuse.engine.reference_backend import ReferenceBackend
        from clusterfuse.reference import build_reference_model

        model_backend = ReferenceBackend(build_reference_model(loaded.config, loaded.weights, device=dev))
    loaded.weights = {}  # the backend holds what it needs (repacked); drop the loader's copies
    engine = LLMEngine(model_backend, tokenizer, eos_token_ids=loaded.config.eos_token_ids, capacity=cap,
                       max_num_seqs=max_num_seqs, num_pages=num_pages, seed=seed,
                       model_name=model_display_name(loaded.source), backend_name=chosen)
    log.debug("model %s on %s (%s), backend %s, capacity %d", loaded.source, dev, platform.device_name, chosen, cap)
    return Runtime(engine, loaded, platform, chosen)


def model_display_name(source: str) -> str:
    """A short model name from a `LoadedModel.source` (``gguf:/a/b/SmolLM2.gguf`` -> ``SmolLM2``)."""
    kind, _, where = source.partition(":")
    return where if kind == "preset" else PurePath(where).stem if kind == "gguf" else PurePath(where).name
