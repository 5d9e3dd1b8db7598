#!/usr/bin/env python3
"""Three steps of torch.optim.AdamW on fixed parameters and gradients, the oracle for Bessie's AdamW
(tests/optim.rs recomputes the same inputs). Two parameter groups: the first 32 values decay, the last 32
do not, as Bessie's decay mask does for matrices and norms.

    python3 adamw_torch.py OUT.json
"""
import json, math, sys
import torch

n, steps = 64, 3
p0 = [math.sin(0.37 * i) for i in range(n)]
grads = [[math.cos(0.11 * i + k) * 0.1 * (k + 1) for i in range(n)] for k in range(steps)]
a = torch.tensor(p0[:32], dtype=torch.float32, requires_grad=True)
b = torch.tensor(p0[32:], dtype=torch.float32, requires_grad=True)
opt = torch.optim.AdamW([{"params": [a], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                        lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False, fused=False)
for g in grads:
    a.grad = torch.tensor(g[:32], dtype=torch.float32)
    b.grad = torch.tensor(g[32:], dtype=torch.float32)
    opt.step()
json.dump({"params": torch.cat([a, b]).tolist(), "torch": torch.__version__}, open(sys.argv[1], "w"))
print("wrote", sys.argv[1])
