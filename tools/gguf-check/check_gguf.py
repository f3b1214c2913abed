#!/usr/bin/env python3
"""Reads the GGUF files candle-qat exported with llama.cpp's own `gguf` package (gguf-py,
pinned in .ci/run) and checks them against what the exporting test says they hold.

Usage: check_gguf.py [DIR]   (default: $QAT_GGUF_DIR)

DIR is where tests/gguf_llama.rs leaves `<name>.gguf` and `<name>.expect.json`. For each
pair this checks, independently of candle:
  - the file parses (magic, version, alignment, offsets) with gguf.GGUFReader;
  - metadata: exactly the expected keys, each with its expected GGUF value type and value,
    and, whatever the expectation says, the keys and value types candle-transformers'
    quantized_llama requires (U32 counts, F32 epsilon and rotary base, the architecture);
  - tensors: the expected names in the expected order, every name one that llama.cpp's
    `llama` architecture defines (gguf.MODEL_TENSORS / TENSOR_NAMES), each with its GGML
    type and shape (PyTorch order), and its values (sum and sum of squares, dequantized by
    gguf.quants) equal to what the exporter computed from the same tensor.
Exits 1 on the first file with a failure, after printing every failure of that file.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

# What ModelWeights::from_gguf reads (candle-transformers 0.11.1), with the one value type
# it accepts for each key (Value::to_u32 / to_f32 / to_string refuse any other type).
QUANTIZED_LLAMA_KEYS = {
    "general.architecture": GGUFValueType.STRING,
    "llama.attention.head_count": GGUFValueType.UINT32,
    "llama.attention.head_count_kv": GGUFValueType.UINT32,
    "llama.block_count": GGUFValueType.UINT32,
    "llama.embedding_length": GGUFValueType.UINT32,
    "llama.rope.dimension_count": GGUFValueType.UINT32,
    "llama.attention.layer_norm_rms_epsilon": GGUFValueType.FLOAT32,
    "llama.rope.freq_base": GGUFValueType.FLOAT32,
}


def field_value(field):
    """The scalar value of a metadata field (string, int or float)."""
    main = field.types[0]
    if main == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]][0].item()


def llama_tensor_names(block_count: int) -> set[str]:
    names = set()
    for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA]:
        fmt = gguf.TENSOR_NAMES[t]
        if "{bid}" in fmt:
            names.update(fmt.format(bid=b) + ".weight" for b in range(block_count))
        else:
            names.add(fmt + ".weight")
    return names


def check_file(d: Path, expect_path: Path) -> list[str]:
    expect = json.loads(expect_path.read_text())
    path = d / expect["file"]
    errors: list[str] = []
    reader = GGUFReader(path)

    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    want_meta = expect["metadata"]
    if sorted(fields) != sorted(want_meta):
        errors.append(f"metadata keys {sorted(fields)} != expected {sorted(want_meta)}")
    for key, (type_name, value) in want_meta.items():
        f = fields.get(key)
        if f is None:
            continue
        if list(f.types) != [GGUFValueType[type_name]]:
            errors.append(f"{key}: types {[t.name for t in f.types]} != [{type_name}]")
            continue
        got = field_value(f)
        if type_name == "FLOAT32":
            ok = np.float32(got) == np.float32(value)
        else:
            ok = got == value
        if not ok:
            errors.append(f"{key}: value {got!r} != expected {value!r}")
    for key, t in QUANTIZED_LLAMA_KEYS.items():
        f = fields.get(key)
        if f is None:
            errors.append(f"{key}: missing (quantized_llama requires it)")
        elif list(f.types) != [t]:
            errors.append(f"{key}: type {[x.name for x in f.types]}, quantized_llama takes {t.name}")
    if "general.architecture" in fields and field_value(fields["general.architecture"]) != "llama":
        errors.append("general.architecture is not 'llama'")

    block_count = field_value(fields["llama.block_count"]) if "llama.block_count" in fields else 0
    known = llama_tensor_names(block_count)
    got_names = [t.name for t in reader.tensors]
    want_names = [t["name"] for t in expect["tensors"]]
    if got_names != want_names:
        errors.append(f"tensor names/order {got_names} != expected {want_names}")
    for name in got_names:
        if name not in known:
            errors.append(f"{name}: not a tensor name of llama.cpp's llama architecture")
    by_name = {t.name: t for t in reader.tensors}
    for want in expect["tensors"]:
        t = by_name.get(want["name"])
        if t is None:
            continue
        qtype = GGMLQuantizationType[want["type"].upper()]
        if t.tensor_type != qtype:
            errors.append(f"{t.name}: type {t.tensor_type.name} != {qtype.name}")
            continue
        shape = [int(x) for x in reversed(t.shape.tolist())]  # GGUF stores ne0 (columns) first
        if shape != want["shape"]:
            errors.append(f"{t.name}: shape {shape} != {want['shape']}")
            continue
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
        if values.size != math.prod(want["shape"]):
            errors.append(f"{t.name}: {values.size} values for shape {want['shape']}")
            continue
        # Both sides sum the same f32 values in f64, in different orders: equal to ~1e-15
        # of the sum of magnitudes.
        magnitude = float(np.abs(values).sum())
        for what, got, exp, scale in (
            ("sum", float(values.sum()), want["sum"], magnitude),
            ("sum of squares", float((values * values).sum()), want["sum_sq"], abs(want["sum_sq"])),
        ):
            if abs(got - exp) > 1e-9 * max(scale, 1e-30):
                errors.append(f"{t.name}: {what} {got!r} != {exp!r}")
    print(
        f"{path.name}: GGUF v{field_value(reader.fields['GGUF.version'])}, "
        f"{len(fields)} metadata keys, {len(reader.tensors)} tensors "
        f"({', '.join(sorted({t.tensor_type.name for t in reader.tensors}))}): "
        + ("ok" if not errors else f"{len(errors)} failure(s)")
    )
    return errors


def main() -> int:
    arg = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("QAT_GGUF_DIR")
    if not arg:
        print("usage: check_gguf.py DIR (or set QAT_GGUF_DIR)", file=sys.stderr)
        return 2
    d = Path(arg)
    expects = sorted(d.glob("*.expect.json"))
    if not expects:
        print(f"no *.expect.json in {d}: run `cargo test --test gguf_llama` first", file=sys.stderr)
        return 1
    print(f"gguf-py {importlib.metadata.version('gguf')}")
    for e in expects:
        errors = check_file(d, e)
        for msg in errors:
            print(f"  FAIL {msg}", file=sys.stderr)
        if errors:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
