#!/usr/bin/env python3
"""Independent PyTorch forward pass of BitNet b1.58 (the architecture of 1bitLLM's modeling_bitnet.py and
utils_quant.py, written from SEED.md), used as the oracle for Bessie's forward pass.

    python3 bitnet_torch.py MODEL_DIR --ids 1,5,99 --out logits.json [--device cpu|cuda] [--dtype float32]

Reads config.json and the safetensors weights Bessie wrote, runs the whole sequence once, and writes
{"ids": [...], "logits": [[...] per position]}. tests/fixtures/torch_logits.json was made with
`bessie-init-model --out tiny --shape tiny` (seed 0, the shipped tokenizer) and this script on CPU in f32.
"""
import argparse, json, math, os
import torch
from safetensors.torch import load_file


def weight_quant(w):
    s = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * s).round().clamp(-1, 1) / s


def activation_quant(x):
    s = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    return (x * s).round().clamp(-128, 127) / s


def bitlinear(x, w):
    dtype = x.dtype
    xq = activation_quant(x.float()).to(dtype)
    wq = weight_quant(w.float()).to(dtype)
    return xq @ wq.t()


def rms_norm(x, w, eps):
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def forward(cfg, W, ids, dtype):
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    d, eps, T = h // nh, cfg["rms_norm_eps"], len(ids)
    inv_freq = 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(T).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    x = W["model.embed_tokens.weight"][torch.tensor(ids)].unsqueeze(0)
    mask = torch.full((T, T), float("-inf")).triu(1)
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        a = rms_norm(x, W[p + "input_layernorm.weight"], eps)
        q = bitlinear(a, W[p + "self_attn.q_proj.weight"]).view(1, T, nh, d).transpose(1, 2)
        k = bitlinear(a, W[p + "self_attn.k_proj.weight"]).view(1, T, nkv, d).transpose(1, 2)
        v = bitlinear(a, W[p + "self_attn.v_proj.weight"]).view(1, T, nkv, d).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        att = (q @ k.transpose(2, 3)) / math.sqrt(d) + mask
        att = torch.softmax(att, dim=-1, dtype=torch.float32).to(dtype)
        y = (att @ v).transpose(1, 2).reshape(1, T, h)
        y = rms_norm(y, W[p + "self_attn.inner_attn_ln.weight"], eps)
        x = x + bitlinear(y, W[p + "self_attn.o_proj.weight"])
        m = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        g = torch.nn.functional.silu(bitlinear(m, W[p + "mlp.gate_proj.weight"])) * bitlinear(m, W[p + "mlp.up_proj.weight"])
        g = rms_norm(g, W[p + "mlp.ffn_layernorm.weight"], eps)
        x = x + bitlinear(g, W[p + "mlp.down_proj.weight"])
    x = rms_norm(x, W["model.norm.weight"], eps)
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    return (x @ head.t()).float()[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--ids", required=True, help="comma-separated token ids")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    W = {k: v.to(a.device, dtype) for k, v in load_file(os.path.join(a.model, "model.safetensors")).items()}
    ids = [int(i) for i in a.ids.split(",")]
    with torch.no_grad(), torch.device(a.device):
        logits = forward(cfg, W, ids, dtype)
    json.dump({"ids": ids, "logits": logits.cpu().tolist(), "torch": torch.__version__}, open(a.out, "w"))
    print(f"wrote {a.out}: {len(ids)} positions x {logits.shape[-1]} logits")


if __name__ == "__main__":
    main()
