#!/usr/bin/env python3
"""Reads a GGUF file with the `gguf` package (llama.cpp's gguf-py, `pip install gguf`; an implementation
independent of Bessie's writer) and prints what it finds as JSON, for tests/export.rs to check:

    python3 read_gguf.py FILE

{"metadata": {key: value, ...}, "tensors": [{"name", "type" (ggml type name), "shape" (ggml order,
innermost first), and for the seven ternary matrices of each block: "scale" (max |x| of the dequantized
values), "plus", "zero", "minus" (counts of sign(x)) and "checksum" (sum_i sign(x_i) * ((i * 7919) % 10007)
over the row-major [rows, cols] values, so that a value in the wrong place changes it)}]}.

Dequantization is gguf-py's own for TQ2_0 and F16 (`gguf.quants.dequantize`), so those values are decoded
without any of Bessie's code. gguf-py does not know bitnet.cpp's I2_S (ggml type 36, in no gguf-py
release): it is registered here so that gguf-py parses the container, and its bytes are decoded below as
bitnet.cpp's `quantize_i2_s` (src/ggml-bitnet-mad.cpp) lays them out: the row-major matrix in blocks of 128
weights, 32 bytes each, byte j holding weights j, j+32, j+64, j+96 at bits 6, 4, 2, 0 as code = value + 1,
then the f32 scale (`n / 4 + 32` bytes in all).
"""
import json
import sys

import numpy as np
import gguf

TERNARY = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}

I2_S = int.__new__(gguf.GGMLQuantizationType, 36)
I2_S._name_, I2_S._value_ = "I2_S", 36
gguf.GGMLQuantizationType._value2member_map_[36] = I2_S
gguf.GGMLQuantizationType._member_map_["I2_S"] = I2_S
# Four weights a byte; the 32 bytes after them (the scale) are read from the file separately.
gguf.GGML_QUANT_SIZES[I2_S] = (4, 1)


def i2_s(reader, t):
    n = int(np.prod(t.shape))
    codes = np.asarray(t.data, dtype=np.uint8).reshape(-1, 32)
    shifts = np.array([6, 4, 2, 0], dtype=np.uint8)
    # [blocks, 4 groups, 32 positions]: group g of a block holds its weights 32 g .. 32 g + 31.
    values = ((codes[:, None, :] >> shifts[None, :, None]) & 3).astype(np.int64) - 1
    assert not (values > 1).any(), "code 3 in an I2_S tensor"
    start = t.data_offset + n // 4
    scale = np.frombuffer(bytes(reader.data[start : start + 4]), dtype="<f4")[0]
    assert not bytes(reader.data[start + 4 : start + 32]).strip(b"\0"), "I2_S tail beyond the scale is not zero"
    return values.reshape(-1) * np.float64(scale)


def summarize(reader, t):
    if t.tensor_type == I2_S:
        x = i2_s(reader, t)
    else:
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
    s = np.sign(x).astype(np.int64)
    idx = np.arange(s.size, dtype=np.int64)
    return {
        "scale": float(np.abs(x).max()),
        "plus": int((s == 1).sum()),
        "zero": int((s == 0).sum()),
        "minus": int((s == -1).sum()),
        "checksum": int((s * ((idx * 7919) % 10007)).sum()),
    }


def main():
    reader = gguf.GGUFReader(sys.argv[1])
    metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    metadata["GGUF.version"] = reader.fields["GGUF.version"].contents()
    tensors = []
    for t in reader.tensors:
        entry = {"name": t.name, "type": t.tensor_type.name, "shape": [int(d) for d in t.shape]}
        parts = t.name.split(".")
        if parts[0] == "blk" and parts[2] in TERNARY:
            entry.update(summarize(reader, t))
        tensors.append(entry)
    json.dump({"metadata": metadata, "tensors": tensors}, sys.stdout)


if __name__ == "__main__":
    main()
