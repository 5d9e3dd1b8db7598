# Is cuBLASLt's int8 x int8 -> int32 GEMM (torch._int_mm) worth a BitLinear forward on this card?
# Forward GEMMs of bitnet_b1_58-large at 768 x 8 (6144 tokens): Y[M,N] = X[M,K] W[N,K]^T.
#   python3 tests/reference/int8_probe.py      (on a GPU machine; results in BENCHMARKS.md)
import torch
M = 6144
shapes = {"qkv": (1536, 4608), "o": (1536, 1536), "gate_up": (1536, 8192), "down": (4096, 1536)}
def timeit(f, n=50):
    for _ in range(5): f()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n): f()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / n * 1000  # us
print(torch.cuda.get_device_name(), torch.__version__)
tot_bf, tot_i8, tot_i8s = 0, 0, 0
for name, (K, N) in shapes.items():
    xb = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    wb = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    xi = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
    wi = torch.randint(-1, 2, (N, K), device="cuda", dtype=torch.int8)
    sx = torch.rand(M, 1, device="cuda")
    tb = timeit(lambda: xb @ wb.t())
    ti = timeit(lambda: torch._int_mm(xi, wi.t()))
    # int32 out, scaled to bf16 in a separate pass (what a consumer kernel would fold in)
    ts = timeit(lambda: (torch._int_mm(xi, wi.t()).float() * sx).bfloat16())
    ref = (xi.float() @ wi.float().t())
    exact = torch.equal(torch._int_mm(xi, wi.t()).float(), ref)
    fl = 2 * M * K * N
    print(f"{name:8s} K={K} N={N}: bf16 {tb:7.1f} us ({fl/tb/1e6:6.1f} TFLOP/s)  int8 {ti:7.1f} us ({fl/ti/1e6:6.1f} TOP/s)  int8+scale pass {ts:7.1f} us  exact={exact}")
    tot_bf += tb; tot_i8 += ti; tot_i8s += ts
print(f"per layer: bf16 {tot_bf:.0f} us, int8 {tot_i8:.0f} us, int8 + eager scale {tot_i8s:.0f} us; x24 layers: {24*tot_bf/1000:.1f} / {24*tot_i8/1000:.1f} ms")
