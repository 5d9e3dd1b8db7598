#!/usr/bin/env python3
"""Checks that what Bessie writes loads on the Python side: config.json through transformers' AutoConfig,
the tokenizer through AutoTokenizer (LlamaTokenizer reading tokenizer.model), and the weights of every
layout (model.safetensors, sharded safetensors with index, pytorch_model.bin) through safetensors/torch,
all equal to each other.

    python3 check_hf_load.py SAFETENSORS_DIR SHARDED_DIR PTH_DIR
"""
import json, os, sys
import torch
from safetensors.torch import load_file
import transformers


def state_dict(d):
    if os.path.exists(os.path.join(d, "model.safetensors.index.json")):
        index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
        sd = {}
        for f in sorted(set(index["weight_map"].values())):
            sd.update(load_file(os.path.join(d, f)))
        return sd
    if os.path.exists(os.path.join(d, "model.safetensors")):
        return load_file(os.path.join(d, "model.safetensors"))
    return torch.load(os.path.join(d, "pytorch_model.bin"), weights_only=True)


dirs = sys.argv[1:]
ref = state_dict(dirs[0])
for d in dirs:
    cfg = transformers.AutoConfig.from_pretrained(d)
    tok = transformers.AutoTokenizer.from_pretrained(d, use_fast=False)
    sd = state_dict(d)
    assert sd.keys() == ref.keys(), (d, sd.keys() ^ ref.keys())
    assert all(torch.equal(sd[k], ref[k]) for k in ref), d
    ids = tok("Hello Bessie\n🐂")["input_ids"]
    print(f"{d}: {type(cfg).__name__} hidden {cfg.hidden_size} layers {cfg.num_hidden_layers}, "
          f"{len(sd)} tensors equal, {type(tok).__name__} vocab {len(tok)} ids {ids}, "
          f"pad {tok.pad_token_id} </line> {tok.convert_tokens_to_ids('</line>')}")
print("transformers", transformers.__version__, "torch", torch.__version__, ": all layouts load")
