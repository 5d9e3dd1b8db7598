#!/usr/bin/env python3
"""Reads a GGUF file with the `gguf` package (llama.cpp's gguf-py, `pip install gguf`; an implementation
independent of Bessie's writer) and prints what it finds as JSON, for tests/export.rs to check:

    python3 read_gguf.py FILE

{"metadata": {key: value, ...}, "tensors": [{"name", "type" (ggml type name), "shape" (ggml order,
innermost first), and for the seven ternary matrices of each block: "scale" (max |x| of the dequantized
values), "plus", "zero", "minus" (counts of sign(x)) and "checksum" (sum_i sign(x_i) * ((i * 7919) % 10007)
over the row-major [rows, cols] values, so that a value in the wrong place changes it)}]}.

Dequantization is gguf-py's own (`gguf.quants.dequantize`, which implements TQ2_0), so the ternary values
are decoded without any of Bessie's code.
"""
import json
import sys

import numpy as np
import gguf

TERNARY = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}


def summarize(t):
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
            entry.update(summarize(t))
        tensors.append(entry)
    json.dump({"metadata": metadata, "tensors": tensors}, sys.stdout)


if __name__ == "__main__":
    main()
