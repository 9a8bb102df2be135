"""Load a Hugging Face checkpoint's ``*.safetensors`` into our weight dict.

Accepts ``model.safetensors`` or a sharded ``model.safetensors.index.json``.  Order of
work, so that nothing is ever half-loaded:

1. read every file's header (cheap: no tensor data) and check names and shapes against
   ``expected_shapes`` — a wrong config or a wrong file fails here, in a second, before
   gigabytes are read;
2. read the tensors with ``safe_open(..., device=...)`` straight onto the target device,
   cast to the target dtype there;
3. ``validate_weights`` on the finished dict, then return it.

Fused projections (Phi-3's ``qkv_proj`` / ``gate_up_proj``) are checked at their stored shape and
split into our names as they are read (`clusterfuse.models.fused_checkpoint`).

Any failure is a ``WeightsError`` naming the file (and the tensor where there is one).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from clusterfuse.models.config import ConfigError, ModelConfig
from clusterfuse.models.fused_checkpoint import fused_tensors, split_fused, stored_shapes
from clusterfuse.models.validate import check_safetensors_file, read_json_object
from clusterfuse.models.weights import WeightsError, expected_shapes, validate_weights

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

#: Tensors some checkpoints carry that are not parameters (recomputed buffers).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Tensor name → the file that holds it, from the index (sharded) or the single file's header."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = read_json_object(index).get("weight_map")
        except ConfigError as e:
            raise WeightsError(str(e)) from e
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index}: weight_map: expected a JSON object of tensor name -> file name, "
                               f"got {type(weight_map).__name__}")
        files = {}
        for name, file in weight_map.items():
            # a shard is a file of this directory: no absolute path, no way out of it
            if not isinstance(file, str) or not file or Path(file).is_absolute() or ".." in Path(file).parts:
                raise WeightsError(f"{index}: weight_map[{name!r}]: expected a file name inside {path}, got {file!r}")
            files[name] = path / file
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        return {name: single for name in _open(single, "cpu", lambda f: list(f.keys()))}
    raise WeightsError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")


def _open(file: Path, device: str, action):  # noqa: ANN001, ANN202 - small private helper
    """Run ``action(handle)`` on an open safetensors file; every failure becomes a WeightsError naming it."""
    if not file.is_file():
        raise WeightsError(f"{file}: file listed in the index does not exist")
    check_safetensors_file(file)  # header bounded, ranges inside the file and disjoint, before safetensors maps it
    try:
        with safe_open(str(file), framework="pt", device=device) as f:
            return action(f)
    except WeightsError:
        raise
    except Exception as e:  # safetensors raises SafetensorError, OSError, RuntimeError...
        raise WeightsError(f"{file}: cannot read safetensors file (truncated or corrupt?): {e}") from e


def load_safetensors_weights(path: str | Path, config: ModelConfig, *, device: str | torch.device = "cpu",
                             dtype: torch.dtype | None = torch.bfloat16,
                             progress: bool = True) -> dict[str, torch.Tensor]:
    """Read the checkpoint in ``path`` as our weight dict on ``device``.

    ``dtype=None`` keeps the checkpoint's own dtype (that of ``model.embed_tokens.weight``),
    applied to every tensor so the dict is uniform.
    """
    path = Path(path)
    device_str = str(torch.device(device))
    files = checkpoint_files(path)
    expected = stored_shapes(config, expected_shapes(config))  # the names and shapes as the files hold them
    fused = fused_tensors(config)
    wanted = {n: f for n, f in files.items() if not n.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        wanted.pop("lm_head.weight", None)  # some tied checkpoints store a copy; we never read it

    order = {n: i for i, n in enumerate(expected)}  # report problems in model order, not file order
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, file in sorted(wanted.items(), key=lambda item: order.get(item[0], len(order))):
        by_file[file].append(name)

    # 1. headers: names, shapes, storage dtype
    stored_dtype: dict[str, str] = {}

    def check_header(file: Path, names: list[str]):  # noqa: ANN202
        def action(f):  # noqa: ANN001, ANN202
            keys = set(f.keys())
            for name in names:
                if name not in keys:
                    raise WeightsError(f"{file}: tensor {name!r} is listed in the index but not in the file")
                sl = f.get_slice(name)
                shape = tuple(sl.get_shape())
                if name in expected and shape != expected[name]:
                    raise WeightsError(
                        f"{file}: tensor {name!r}: wrong shape, expected {expected[name]}, got {shape}")
                stored_dtype[name] = sl.get_dtype()
                if stored_dtype[name] not in _DTYPES:  # integers, bools, or FP8 that needs scales we do not read
                    raise WeightsError(f"{file}: tensor {name!r}: dtype {stored_dtype[name]} is not a weight dtype "
                                       f"this loader reads (expected one of {', '.join(_DTYPES)})")
        _open(file, "cpu", action)

    for file, names in by_file.items():
        check_header(file, names)
    missing = [n for n in expected if n not in wanted]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise WeightsError(f"{path}: missing tensor {missing[0]!r}{more} (not in any checkpoint file)")
    unexpected = sorted(n for n in wanted if n not in expected)
    if unexpected:
        raise WeightsError(f"{path}: unexpected tensor {unexpected[0]!r} in {wanted[unexpected[0]]}"
                           f" (not part of {config.architecture})")

    if dtype is None:
        dtype = _DTYPES.get(stored_dtype["model.embed_tokens.weight"], torch.float32)

    # 2. data, straight to the device
    weights: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(wanted), desc=f"loading {path.name}", unit="tensor", file=sys.stderr,
               disable=not progress)
    try:
        for file, names in by_file.items():
            def read(f, names=names, file=file):  # noqa: ANN001, ANN202
                for name in names:
                    try:
                        t = f.get_tensor(name)
                    except Exception as e:
                        raise WeightsError(f"{file}: cannot read tensor {name!r} (truncated or corrupt?): {e}") from e
                    t = t.to(dtype=dtype)
                    weights.update(split_fused(fused[name], t) if name in fused else {name: t})
                    bar.update(1)
            _open(file, device_str, read)
    finally:
        bar.close()

    # 3. the whole dict, or nothing
    validate_weights(config, weights)
    return weights
