"""Opening a model for generation: load weights and tokenizer, pick device/dtype/backend, build the engine."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from clusterfuse.engine.backend import Platform, detect_platform, resolve_backend, resolve_device, resolve_dtype
from clusterfuse.engine.generate import Engine
from clusterfuse.models.byte_tokenizer import ByteTokenizer
from clusterfuse.models.loader import LoadedModel, load_model

log = logging.getLogger("clusterfuse")

#: Default KV-cache capacity when neither the user nor the model asks for less.
DEFAULT_CAPACITY = 4096


@dataclass
class Runtime:
    """An engine plus what was chosen to build it."""

    engine: Engine
    model: LoadedModel
    platform: Platform
    backend: str


def open_runtime(model: str | None, *, device: str = "auto", dtype: str = "auto", backend: str = "auto",
                 capacity: int | None = None, max_batch: int = 1, seed: int | None = None,
                 progress: bool = True) -> Runtime:
    """Load ``model`` (see `load_model`) and build an `Engine` on the chosen backend."""
    dev = resolve_device(device)
    platform = detect_platform(dev)
    if backend != "auto":  # a bad or unavailable forced backend fails before the (slow) loading
        resolve_backend(backend, platform)
    loaded = load_model(model, device=dev, dtype=resolve_dtype(dtype, dev), seed=seed or 0, progress=progress)
    chosen = resolve_backend(backend, platform, loaded.config.family)
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        log.warning("%s has random weights and no tokenizer: using a byte-level tokenizer, the text is noise "
                    "(the timings are real)", loaded.source)
        tokenizer = ByteTokenizer(loaded.config.vocab_size, loaded.config.bos_token_id, loaded.config.eos_token_ids)
    cap = capacity or min(loaded.config.max_position_embeddings, DEFAULT_CAPACITY)
    if chosen == "fused":  # needs a Hopper GPU
        from clusterfuse.engine.fused_model import FusedModel

        model_backend = FusedModel(loaded.config, loaded.weights, device=dev)
    else:
        from clusterfuse.reference import build_reference_model

        model_backend = build_reference_model(loaded.config, loaded.weights, device=dev)
    loaded.weights = {}  # the backend holds what it needs (repacked); drop the loader's copies
    engine = Engine(model_backend, tokenizer, eos_token_ids=loaded.config.eos_token_ids,
                    capacity=cap, max_batch=max_batch)
    log.debug("model %s on %s (%s), backend %s, capacity %d", loaded.source, dev, platform.device_name, chosen, cap)
    return Runtime(engine, loaded, platform, chosen)
