"""Write the first N layers of the embedded SmolLM2-135M-Instruct GGUF to a smaller GGUF file.

The full file (93 MB) is larger than what one GPU-machine call may carry (64 MiB), so GPU
tests that need SmolLM2's real weights run on this subset: the real embedding, the real
first layers, the real final norm, with the metadata's block count set to N.  The tensors
keep their quantised bytes as they are (no re-quantisation).

    python tools/make_smollm2_subset.py [--layers 4] [--out .weights/smollm2-135m-4layers.gguf]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import gguf

from clusterfuse.models.embedded import embedded_gguf_path

DEFAULT_OUT = Path(".weights")


def subset(src: Path, dst: Path, layers: int) -> None:
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # written by the writer itself
        value = field.contents()
        if key == f"{arch}.block_count":
            value = layers
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, vtype)
    for t in reader.tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m and int(m.group(1)) >= layers:
            continue
        # t.data holds the stored bytes (rows of quant blocks), which is what raw_dtype expects.
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    dst.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    out = args.out or DEFAULT_OUT / f"smollm2-135m-{args.layers}layers.gguf"
    subset(embedded_gguf_path(), out, args.layers)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
