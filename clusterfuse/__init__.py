"""clusterfuse: cluster-fused LLM decoding on NVIDIA Hopper GPUs.

    from clusterfuse import LLM, SamplingParams

    llm = LLM()  # the embedded SmolLM2-135M-Instruct; or a preset, a HF directory, a .gguf file
    print(llm.generate("The capital of France is", SamplingParams(max_tokens=16))[0].text)

Layers (each a sub-package, each using only the one below it):
``kernels`` (CUDA: cluster primitives and fused blocks) → ``ops`` (Python launchers,
JIT build) → ``reference`` (PyTorch oracle) and ``models`` (configs, weights,
tokenizers) → ``engine`` (KV cache, scheduler, the Python API) → ``cli``.

The API names below are imported on first use, so ``import clusterfuse`` stays cheap (no torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "LLM": "clusterfuse.engine.llm",
    "AsyncLLM": "clusterfuse.engine.async_engine",
    "LLMEngine": "clusterfuse.engine.llm_engine",
    "SamplingParams": "clusterfuse.engine.sampling",
    "RequestOutput": "clusterfuse.engine.outputs",
    "EngineStats": "clusterfuse.engine.outputs",
}

__all__ = ["AsyncLLM", "EngineStats", "LLM", "LLMEngine", "RequestOutput", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from clusterfuse.engine.async_engine import AsyncLLM
    from clusterfuse.engine.llm import LLM
    from clusterfuse.engine.llm_engine import LLMEngine
    from clusterfuse.engine.outputs import EngineStats, RequestOutput
    from clusterfuse.engine.sampling import SamplingParams


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'clusterfuse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
