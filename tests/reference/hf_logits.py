#!/usr/bin/env python3
"""Logits and greedy tokens of checkpoints as transformers computes them: AutoModelForCausalLM.from_pretrained
with no remote code, on the CPU in float32 (the file's values, widened), the oracle for tests/hf_bitnet.rs. A latent checkpoint's
`bitnet` quantization_config (autobitlinear, online) quantizes on the fly; a packed one (offline) reads
the 2-bit codes and weight_scale. Prints one JSON object: per directory, the logits of every prompt
position, STEPS greedy tokens (argmax, no stopping) and the class transformers made of q_proj.

    python3 hf_logits.py IDS_JSON STEPS DIR...

With HF_LOGITS_DEVICE=cuda the models run on the GPU in bfloat16 instead, as Bessie's CUDA path computes
(the oracle of tests/gpu.rs).
"""
import json
import os
import sys

# Eager PyTorch: transformers' BitNet layers are torch.compile'd, which costs a compile per process for
# the same arithmetic.
os.environ["TORCHDYNAMO_DISABLE"] = "1"
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.integrations.bitnet import BitLinear  # noqa: E402

transformers.logging.set_verbosity_error()
cuda = os.environ.get("HF_LOGITS_DEVICE", "cpu") == "cuda"
dtype = torch.bfloat16 if cuda else torch.float32
ids = torch.tensor([json.loads(sys.argv[1])], device="cuda" if cuda else "cpu")
steps = int(sys.argv[2])
out = {"transformers": transformers.__version__, "torch": torch.__version__, "models": {}}
for d in sys.argv[3:]:
    # Loaded in the file's dtype (an offline bitnet file in bf16 cannot be loaded as float32: its unpacked
    # weights stay bf16), then widened to float32 as Bessie computes on the CPU (nn.Module's own float():
    # transformers refuses it on quantized models; the widening is exact and leaves the U8 codes alone).
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype="auto")
    model = torch.nn.Module.to(model, device=ids.device, dtype=dtype).eval()
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.dtype = dtype  # the dtype BitLinear unpacks to and multiplies in, fixed at construction
    with torch.no_grad():
        logits = model(ids).logits[0]
        seq = ids
        for _ in range(steps):
            nxt = model(seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    out["models"][d] = {
        "logits": logits.float().tolist(),
        "greedy": seq[0, ids.shape[1]:].tolist(),
        "q_proj": type(model.model.layers[0].self_attn.q_proj).__name__,
        "architecture": type(model).__name__,
    }
print(json.dumps(out))
