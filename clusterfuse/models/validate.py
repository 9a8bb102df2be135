"""Checks of untrusted model files before anything is allocated from them.

Checkpoints come from strangers: every number in a header or a config decides how much memory
is asked for, how long a loop runs, or what the math does.  So, before a loader allocates:

* config values (``config.json`` or GGUF metadata) are type- and range-checked one by one, and an
  error names the field (`config_int`, `config_float`, ...);
* a safetensors header is parsed here first: its size bounded, every tensor's byte range inside
  the file, matching its dtype and shape, and no two ranges overlapping (`check_safetensors_file`);
* a GGUF file is walked here first, without allocating: metadata counts and string lengths bounded
  by the bytes left in the file (the ``gguf`` reader itself would try to allocate a 2^40-element
  array), tensor byte ranges inside the file and not overlapping (`check_gguf_file`).

Every failure is a ``ConfigError`` or ``WeightsError`` (both ``ValueError``): one line, naming
the file and the field.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A model configuration that clusterfuse cannot run (unknown architecture, missing or bad field).

    Defined here (and re-exported by ``clusterfuse.models.config``) so that the config can use these checks."""

#: Upper bounds of config values: far above any released model, low enough that a bad value fails
#: here rather than in a loop or an allocation (``num_hidden_layers: 1e9``).
LIMITS: dict[str, int] = {
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "max_position_embeddings": 1 << 27,
    "kv_lora_rank": 1 << 15,
    "q_lora_rank": 1 << 17,
    "qk_nope_head_dim": 4096,
    "qk_rope_head_dim": 4096,
    "v_head_dim": 4096,
    "n_routed_experts": 4096,
    "num_experts_per_tok": 4096,
    "moe_intermediate_size": 1 << 20,
    "n_shared_experts": 4096,
    "first_k_dense_replace": 1024,
    "moe_layer_freq": 1024,
    "n_group": 4096,
    "topk_group": 4096,
    "original_max_position_embeddings": 1 << 27,
}
#: Token ids are int32 in the engine.
MAX_TOKEN_ID = (1 << 31) - 1
#: JSON files next to a checkpoint (config, tokenizer config, index) are read whole: bounded.
MAX_JSON_BYTES = 64 << 20
#: The safetensors format's own limit on its JSON header.
MAX_SAFETENSORS_HEADER = 100 << 20


def _type_name(value: Any) -> str:
    return "an array" if isinstance(value, list) else "an object" if isinstance(value, dict) else repr(value)


def config_int(value: Any, field: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]`` (default maximum: ``LIMITS[field]``), else a
    ConfigError naming ``field``.  Floats are refused even when whole (``1e9`` is a typo, not a size)."""
    maximum = LIMITS.get(field, MAX_TOKEN_ID) if maximum is None else maximum
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{field}: expected an integer, got {_type_name(value)}")
    if not minimum <= value <= maximum:
        raise ConfigError(f"{field}: expected an integer from {minimum} to {maximum}, got {value}")
    return value


def config_float(value: Any, field: str, *, minimum: float = 0.0, maximum: float = 1e12,
                 inclusive: bool = False) -> float:
    """``value`` as a finite float above ``minimum`` (at or above, if ``inclusive``) and at most ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{field}: expected a number, got {_type_name(value)}")
    x = float(value)
    ok = math.isfinite(x) and (x >= minimum if inclusive else x > minimum) and x <= maximum
    if not ok:
        bound = f"{'>=' if inclusive else '>'} {minimum:g} and <= {maximum:g}"
        raise ConfigError(f"{field}: expected a finite number {bound}, got {value!r}")
    return x


def config_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{field}: expected true or false, got {_type_name(value)}")
    return value


def config_str(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{field}: expected a string, got {_type_name(value)}")
    return value


def token_ids(value: Any, field: str) -> tuple[int, ...]:
    """A token id or a list of them (``eos_token_id`` is either), each a non-negative int."""
    values = value if isinstance(value, list) else [value]
    if len(values) > 1024:
        raise ConfigError(f"{field}: expected at most 1024 token ids, got {len(values)}")
    return tuple(config_int(v, field, minimum=0, maximum=MAX_TOKEN_ID) for v in values)


def json_object(value: Any, what: str) -> dict[str, Any]:
    """``value`` if it is a JSON object (dict), else a ConfigError saying what ``what`` should be."""
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", type(None): "null"}.get(type(value), type(value).__name__)
        raise ConfigError(f"{what}: expected a JSON object, got {kind}")
    return value


def read_json_object(file: Path, what: str | None = None) -> dict[str, Any]:
    """Parse ``file`` (bounded in size) and require a JSON object; every failure is a ConfigError naming it."""
    what = what or str(file)
    try:
        size = file.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ConfigError(f"{what}: {size} bytes, more than the {MAX_JSON_BYTES >> 20} MiB a JSON file may hold")
        text = file.read_bytes().decode("utf-8")
        data = json.loads(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except (json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{what}: not valid JSON ({str(e)[:200]})") from e
    except OSError as e:
        raise ConfigError(f"{what}: cannot read ({e.strerror})") from e
    return json_object(data, what)


# ------------------------------------------------------------------------------------- byte ranges
def check_byte_ranges(ranges: list[tuple[str, int, int]], size: int, what: str, error: type[ValueError]) -> None:
    """Each ``(name, start, end)`` inside ``[0, size]`` and no two overlapping (tensors sharing bytes
    make a small file load as a huge model)."""
    previous: tuple[str, int, int] | None = None
    for name, start, end in sorted(ranges, key=lambda r: (r[1], r[2])):
        if not 0 <= start <= end <= size:
            raise error(f"{what}: tensor {name!r}: data [{start}, {end}) lies outside the file's {size} data bytes")
        if previous is not None and start < previous[2] and end > start:
            raise error(f"{what}: tensors {previous[0]!r} and {name!r} share data bytes (overlapping ranges)")
        if end > start:
            previous = (name, start, end)


# ------------------------------------------------------------------------------------- safetensors
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                           "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors_file(file: Path) -> None:
    """Validate ``file``'s header: size bounded, a JSON object of tensors with known dtypes, shapes of
    non-negative ints whose byte size equals the data range, ranges inside the file and disjoint."""
    from clusterfuse.models.weights import WeightsError

    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{file}: not a safetensors file ({size} bytes, shorter than its header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_SAFETENSORS_HEADER or n > size - 8:
                raise WeightsError(f"{file}: safetensors header declares {n} bytes; the file has {size - 8} after "
                                   f"the size field (limit {MAX_SAFETENSORS_HEADER >> 20} MiB)")
            raw = f.read(n)
    except OSError as e:
        raise WeightsError(f"{file}: cannot read ({e.strerror})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WeightsError(f"{file}: safetensors header is not valid JSON ({str(e)[:200]})") from e
    if not isinstance(header, dict):
        raise WeightsError(f"{file}: safetensors header: expected a JSON object, got {_type_name(header)}")
    data_bytes = size - 8 - n
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise WeightsError(f"{file}: safetensors __metadata__: expected an object of strings")
            continue
        where = f"{file}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise WeightsError(f"{where}: expected an object with dtype, shape, data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPE_BYTES:
            raise WeightsError(f"{where}: dtype: expected one of {', '.join(SAFETENSORS_DTYPE_BYTES)}, got {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise WeightsError(f"{where}: shape: expected a list of at most 8 non-negative integers, got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise WeightsError(f"{where}: data_offsets: expected [begin, end] integers, got {offsets!r}")
        start, end = offsets
        nbytes = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
        if end - start != nbytes:
            raise WeightsError(f"{where}: data_offsets {offsets} hold {end - start} bytes; dtype {dtype} and shape "
                               f"{shape} need {nbytes}")
        ranges.append((name, start, end))
    check_byte_ranges(ranges, data_bytes, str(file), WeightsError)


# -------------------------------------------------------------------------------------------- GGUF
GGUF_MAGIC = b"GGUF"
#: Bytes of a GGUF scalar value, by value type (strings and arrays are walked).
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_UINT_FORMATS = {0: "B", 2: "H", 4: "I", 10: "Q"}
_GGML_MAX_DIMS = 4
_MAX_GGUF_TENSORS = 1 << 20


class _GGUFWalker:
    """Reads a GGUF file's header sequentially from a bytes-like buffer, bounding every count by the
    bytes left so that nothing can ask for more than the file holds."""

    def __init__(self, buf: Any, file: Path) -> None:
        from clusterfuse.models.weights import WeightsError

        self.buf, self.file, self.pos, self.error = buf, file, 0, WeightsError
        self.endian = "<"

    def fail(self, message: str) -> None:
        raise self.error(f"{self.file}: not a valid GGUF file: {message}")

    def take(self, n: int, what: str, read: bool = True) -> bytes:
        """The next ``n`` bytes (copied: no view of the map outlives the walk), or only skip them."""
        if n < 0 or n > len(self.buf) - self.pos:
            self.fail(f"{what} needs {n} bytes at offset {self.pos}; the file has {len(self.buf) - self.pos} left")
        out = self.buf[self.pos:self.pos + n] if read else b""
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(self.endian + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("Q", f"{what} length")
        return bytes(self.take(n, what)).decode("utf-8", errors="replace")

    def skip_strings(self, count: int, what: str) -> None:
        """Skip ``count`` length-prefixed strings (vocabularies: 100k+ of them, so a tight loop)."""
        buf, pos, end, fmt, unpack_from = self.buf, self.pos, len(self.buf), self.endian + "Q", struct.unpack_from
        for i in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.fail(f"{what}: string {i} of {count} runs past the end of the file")
            pos += 8 + unpack_from(fmt, buf, pos)[0]
            if pos > end:
                self.fail(f"{what}: string {i} of {count} runs past the end of the file")
        self.pos = pos

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        """Skip (or, for small scalars, return) one value of type ``vtype``."""
        if vtype in _GGUF_SCALAR:
            raw = self.take(_GGUF_SCALAR[vtype], what)
            fmt = _GGUF_UINT_FORMATS.get(vtype)
            return struct.unpack(self.endian + fmt, raw)[0] if fmt else None
        if vtype == _GGUF_STRING:
            self.take(self.unpack("Q", f"{what} length"), what, read=False)
            return None
        if vtype == _GGUF_ARRAY:
            if depth > 2:
                self.fail(f"{what}: arrays nested deeper than 3")
            etype = self.unpack("I", f"{what} element type")
            count = self.unpack("Q", f"{what} element count")
            smallest = _GGUF_SCALAR.get(etype, 8 if etype in (_GGUF_STRING, _GGUF_ARRAY) else 0)
            if smallest == 0:
                self.fail(f"{what}: unknown element type {etype}")
            if count * smallest > len(self.buf) - self.pos:
                self.fail(f"{what}: array of {count} elements cannot fit in the {len(self.buf) - self.pos} "
                          "bytes left in the file")
            if etype in _GGUF_SCALAR:
                self.take(count * smallest, what, read=False)
            elif etype == _GGUF_STRING:
                self.skip_strings(count, what)
            else:
                for _ in range(count):
                    self.value(etype, what, depth + 1)
            return None
        self.fail(f"{what}: unknown value type {vtype}")
        return None


def check_gguf_file(file: Path) -> None:
    """Walk ``file``'s header without allocating from it: version 2 or 3, metadata counts, string and
    array lengths bounded by the bytes left, tensor dims and types valid, tensor data inside the file
    and not overlapping.  Call before handing the file to ``gguf.GGUFReader``."""
    import mmap

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from clusterfuse.models.weights import WeightsError

    try:
        with open(file, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise WeightsError(f"{file}: not a valid GGUF file: {size} bytes, shorter than its header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                _walk_gguf(_GGUFWalker(mm, file), size, GGML_QUANT_SIZES, GGMLQuantizationType)
    except OSError as e:
        raise WeightsError(f"{file}: cannot read ({e.strerror})") from e


def _walk_gguf(w: _GGUFWalker, size: int, quant_sizes: dict, quant_types: type) -> None:
    try:
        if bytes(w.take(4, "magic")) != GGUF_MAGIC:
            w.fail("wrong magic (expected 'GGUF')")
        version = w.unpack("I", "version")
        if version & 0xFFFF == 0:  # written big-endian
            w.endian = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in (2, 3):
            w.fail(f"version {version} (supported: 2, 3)")
        n_tensors = w.unpack("Q", "tensor count")
        n_kv = w.unpack("Q", "metadata count")
        # each metadata entry takes at least 12 bytes (key length + type), each tensor info at least 24
        if n_kv * 12 > size or n_tensors * 24 > size or n_tensors > _MAX_GGUF_TENSORS:
            w.fail(f"declares {n_kv} metadata entries and {n_tensors} tensors, more than {size} bytes can hold")
        alignment = 32
        for _ in range(n_kv):
            key = w.string("metadata key")
            vtype = w.unpack("I", f"metadata {key!r} type")
            value = w.value(vtype, f"metadata {key!r}")
            if key == "general.alignment":
                if vtype != 4 or not value or value & (value - 1) or value > 1 << 20:
                    w.fail(f"general.alignment: expected a uint32 power of two, got {value!r}")
                alignment = value
        infos = []
        for _ in range(n_tensors):
            name = w.string("tensor name")
            n_dims = w.unpack("I", f"tensor {name!r} dimension count")
            if not 1 <= n_dims <= _GGML_MAX_DIMS:
                w.fail(f"tensor {name!r}: {n_dims} dimensions (expected 1 to {_GGML_MAX_DIMS})")
            dims = [w.unpack("Q", f"tensor {name!r} dimensions") for _ in range(n_dims)]
            ttype = w.unpack("I", f"tensor {name!r} type")
            offset = w.unpack("Q", f"tensor {name!r} offset")
            try:
                block, type_bytes = quant_sizes[quant_types(ttype)]
            except (ValueError, KeyError):
                w.fail(f"tensor {name!r}: unknown ggml type {ttype}")
            elements = math.prod(dims)
            if dims[0] % block:
                w.fail(f"tensor {name!r}: first dimension {dims[0]} is not a multiple of its block size {block}")
            infos.append((name, offset, offset + elements // block * type_bytes))
        start = -(-w.pos // alignment) * alignment
        if len({name for name, _, _ in infos}) != len(infos):
            w.fail("two tensors have the same name")
        check_byte_ranges(infos, max(size - start, 0), f"{w.file}: GGUF", w.error)
    except struct.error as e:  # unreachable through take(); kept so no parse error escapes as a traceback
        w.fail(str(e))
