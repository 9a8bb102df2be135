"""Argument validation of the primitives' ops that needs no GPU (runs in CI).

Validation happens before any build or launch, so a CPU tensor is rejected with a
ValueError naming the argument even on a machine with neither CUDA nor nvcc."""

import pytest
import torch

from clusterfuse.ops import primitives as P


def test_cpu_tensor_rejected():
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        P.cluster_reduce(torch.ones(1, 4, 8))
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        P.cluster_gather(torch.ones(1, 4, 8))
    with pytest.raises(ValueError, match="m: expected a CUDA tensor"):
        P.softmax_merge(torch.ones(1, 4, 2), torch.ones(1, 4, 2), torch.ones(1, 4, 2, 8))
