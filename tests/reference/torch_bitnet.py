"""PyTorch reference for BitNet b1.58 SFT throughput, for every model family Bessie trains.

The anchor ../shared/anchors/torch_bitnet.py (1bitLLM's architecture) extended to the other families'
blocks, so that each shape is compared against a fair PyTorch recipe: grouped-query attention (SDPA with
enable_gqa: no expanded K/V), relu² or SiLU gates, the sub-norms present (1bitLLM, 2B4T) or absent (the
Llama layout), tied or untied heads and an explicit head_dim. BitLinear in every projection, as in
transformers' online AutoBitLinear. Random init: throughput and memory do not depend on the weights' values.
The 1bitLLM shapes compute exactly what the anchor computes.

Modes:
  seed     : what the seed repo does: fp32 eager, eager attention (fp32 softmax), batch 1 x accum 4
  tuned    : bf16 autocast + SDPA (flash) attention + fused AdamW
  compiled : tuned + torch.compile
Run under torchrun for data parallel (DDP). Prints one JSON line per run.
"""
import argparse, json, math, os, time
import torch, torch.nn as nn, torch.nn.functional as F

ONEBIT = dict(act="silu", sub_norms=True, tied=True, theta=1e4)
CONFIGS = {
    "large": dict(hidden=1536, inter=4096, layers=24, heads=16, vocab=32002, **ONEBIT),
    "xl": dict(hidden=2048, inter=5460, layers=24, heads=32, vocab=32002, **ONEBIT),
    "3b": dict(hidden=3200, inter=8640, layers=26, heads=32, vocab=32002, **ONEBIT),
    "tiny": dict(hidden=64, inter=128, layers=2, heads=4, vocab=32002, **ONEBIT),
    # BitNet b1.58 2B4T: GQA 20:5, relu2, sub-norms, tied head.
    "2b4t": dict(hidden=2560, inter=6912, layers=30, heads=20, kv_heads=5, vocab=128256, act="relu2",
                 sub_norms=True, tied=True, theta=5e5),
    # Falcon3-1B-1.58bit: Llama layout, GQA 8:4, head_dim 256, no sub-norms, untied head.
    "falcon3-1b": dict(hidden=2048, inter=8192, layers=18, heads=8, kv_heads=4, head_dim=256, vocab=131072,
                       act="silu", sub_norms=False, tied=False, theta=1000042.0),
    "tiny-bitnet": dict(hidden=64, inter=176, layers=2, heads=4, kv_heads=1, vocab=32002, act="relu2",
                        sub_norms=True, tied=True, theta=5e5),
}

def act_quant(x):
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * s).round().clamp(-128, 127) / s

def w_quant(w):
    s = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * s).round().clamp(-1, 1) / s

class BitLinear(nn.Linear):
    def forward(self, x):
        xq = x + (act_quant(x) - x).detach()
        wq = self.weight + (w_quant(self.weight) - self.weight).detach()
        return F.linear(xq, wq)

class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__(); self.weight = nn.Parameter(torch.ones(d)); self.eps = eps
    def forward(self, x):
        dt = x.dtype; h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dt)

def rope(q, k, pos, theta):
    d = q.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=q.device).float() / d))
    f = torch.outer(pos.float(), inv); emb = torch.cat([f, f], -1)
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
    def rot(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([-x2, x1], -1)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin

class Block(nn.Module):
    def __init__(self, c, sdpa):
        super().__init__()
        h, i = c["hidden"], c["inter"]; self.sdpa = sdpa; self.theta = c["theta"]
        self.nh, self.nkv = c["heads"], c.get("kv_heads", c["heads"]); self.hd = c.get("head_dim", h // self.nh)
        q, kv = self.nh * self.hd, self.nkv * self.hd
        self.q, self.k, self.v = BitLinear(h, q, bias=False), BitLinear(h, kv, bias=False), BitLinear(h, kv, bias=False)
        self.o = BitLinear(q, h, bias=False)
        self.gate, self.up = BitLinear(h, i, bias=False), BitLinear(h, i, bias=False)
        self.down = BitLinear(i, h, bias=False)
        self.ln1, self.ln2 = RMSNorm(h), RMSNorm(h)
        self.attn_ln, self.ffn_ln = (RMSNorm(q), RMSNorm(i)) if c["sub_norms"] else (nn.Identity(), nn.Identity())
        self.act = F.silu if c["act"] == "silu" else (lambda g: F.relu(g).square())
    def forward(self, x, pos):
        B, T, H = x.shape; hd = self.hd
        y = self.ln1(x)
        q = self.q(y).view(B, T, self.nh, hd).transpose(1, 2)
        k, v = (p(y).view(B, T, self.nkv, hd).transpose(1, 2) for p in (self.k, self.v))
        q, k = rope(q, k, pos, self.theta)
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nkv != self.nh)
        else:
            g = self.nh // self.nkv
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            w = q @ k.transpose(-1, -2) / math.sqrt(hd)
            mask = torch.full((T, T), float("-inf"), device=x.device).triu(1)
            w = F.softmax(w + mask, dim=-1, dtype=torch.float32).to(q.dtype)
            a = w @ v
        a = a.transpose(1, 2).reshape(B, T, self.nh * hd)
        x = x + self.o(self.attn_ln(a))
        y = self.ln2(x)
        x = x + self.down(self.ffn_ln(self.act(self.gate(y)) * self.up(y)))
        return x

class BitNet(nn.Module):
    def __init__(self, c, sdpa):
        super().__init__()
        self.emb = nn.Embedding(c["vocab"], c["hidden"])
        self.blocks = nn.ModuleList(Block(c, sdpa) for _ in range(c["layers"]))
        self.norm = RMSNorm(c["hidden"])
        self.head = None if c["tied"] else nn.Linear(c["hidden"], c["vocab"], bias=False)
        for m in self.modules():  # initializer_range 0.02, as in the checkpoints' config
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
    def forward(self, ids, labels):
        T = ids.shape[1]; pos = torch.arange(T, device=ids.device)
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x, pos)
        head = self.emb.weight if self.head is None else self.head.weight
        logits = F.linear(self.norm(x), head)[:, :-1]  # predict the next token
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="large"); ap.add_argument("--mode", default="seed")
    ap.add_argument("--seq", type=int, default=768); ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--accum", type=int, default=4); ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2); ap.add_argument("--ckpt", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of the script itself")
    a = ap.parse_args()
    ddp = "RANK" in os.environ
    if ddp:
        torch.distributed.init_process_group("nccl")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = 0, 1
    cuda = a.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dev = torch.device(a.device)
    torch.manual_seed(0)
    c = CONFIGS[a.model]
    tuned = a.mode in ("tuned", "compiled")
    model = BitNet(c, sdpa=tuned).to(dev)
    nparams = sum(p.numel() for p in model.parameters())
    if a.ckpt:
        for b in model.blocks:
            f = b.forward
            b.forward = (lambda f: lambda x, pos: torch.utils.checkpoint.checkpoint(f, x, pos, use_reentrant=False))(f)
    fwd = model
    if ddp:
        fwd = torch.nn.parallel.DistributedDataParallel(model)
    if a.mode == "compiled":
        fwd = torch.compile(fwd)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0, fused=tuned and cuda)
    ids = torch.randint(0, c["vocab"], (a.batch, a.seq), device=dev)
    def step():
        for _ in range(a.accum):
            with torch.autocast(a.device, dtype=torch.bfloat16, enabled=tuned):
                loss = fwd(ids, ids) / a.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        return loss
    for _ in range(a.warmup):
        step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    sync(); dt = time.perf_counter() - t0
    toks = a.steps * a.accum * a.batch * a.seq * world
    q_width = c["heads"] * c.get("head_dim", c["hidden"] // c["heads"])
    flops_per_tok = 6 * nparams + 12 * c["layers"] * q_width * a.seq  # params + attention
    if rank == 0:
        print(json.dumps(dict(model=a.model, mode=a.mode, world=world, seq=a.seq, batch=a.batch, accum=a.accum,
              ckpt=a.ckpt, params_m=round(nparams / 1e6, 1), tok_s=round(toks / dt), tok_s_gpu=round(toks / dt / world),
              tflops_gpu=round(toks / dt / world * flops_per_tok / 1e12, 1),
              peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
              loss=round(loss.item() * a.accum, 3), gpu=torch.cuda.get_device_name() if cuda else "cpu")), flush=True)
    if ddp:
        torch.distributed.destroy_process_group()

if __name__ == "__main__":
    main()
