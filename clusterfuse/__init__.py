"""clusterfuse: cluster-fused LLM decoding on NVIDIA Hopper GPUs.

Layers (each a sub-package, each using only the one below it):
``kernels`` (CUDA: cluster primitives and fused blocks) → ``ops`` (Python launchers,
JIT build) → ``reference`` (PyTorch oracle) and ``models`` (configs, weights,
tokenizers) → ``engine`` (KV cache, generation) → ``cli``.
"""

__version__ = "0.1.0"
