#!/usr/bin/env python3
"""transformers' own BitNet packing (integrations/bitnet.py: pack_weights, unpack_weights) of fixed ternary
matrices, the oracle for model::bitnet_packed (tests/bitnet_packed.rs). Row counts cover a multiple of 4 and
the short last blocks pack_weights allows; unpack_weights returns ceil(out/4) x 4 rows, the padding as -1.

    python3 bitnet_pack.py tests/fixtures/bitnet_pack.json
"""
import sys
from pathlib import Path

import torch
import transformers
from transformers.integrations.bitnet import pack_weights, unpack_weights

sys.path.insert(0, str(Path(__file__).parent))
import fixture_json

gen = torch.Generator().manual_seed(158)
cases = []
for out, cols in [(4, 3), (8, 5), (12, 2), (1, 4), (5, 3), (6, 2), (7, 3), (10, 2)]:
    values = torch.randint(-1, 2, (out, cols), generator=gen)
    packed = pack_weights(values.clone())
    unpacked = unpack_weights(packed, torch.float32).to(torch.int64)
    cases.append({"out": out, "cols": cols, "values": values.flatten().tolist(),
                  "packed": packed.flatten().tolist(), "unpacked": unpacked.flatten().tolist()})
fixture_json.write(Path(sys.argv[1]), {"transformers": transformers.__version__, "torch": torch.__version__},
                   {"cases": cases})
print("wrote", sys.argv[1])
