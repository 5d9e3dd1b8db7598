// The softmax of attention with its mask, forward and backward, between the cuBLAS GEMMs that compute
// S = Q K^T, Y = P V and their gradients: one pass over the [rows, T] matrix each way, in bf16, instead of
// the reference's chain of f32 ops. Reference: train::layers::attention_{forward,backward}.
#include "common.cuh"

// Query i of row b sees key j when j <= i and both belong to the same packed example (segment id, 0 for
// padding, which sees only itself): the block-diagonal causal mask of train::model::BatchTensors.
__device__ __forceinline__ bool visible(const uint32_t* seg, int i, int j) {
    return j <= i && (j == i || (seg[i] != 0 && seg[i] == seg[j]));
}

// S: [B H, T, T] bf16 unscaled scores; seg: [B, T]. One block per (b, h, i) row: P = softmax(round(S c)) over
// visible keys, 0 elsewhere, in bf16. The scaled scores are rounded to bf16 as the reference's bf16 op does.
extern "C" __global__ void attention_softmax_forward(const bf16* s, const uint32_t* seg, bf16* p, int t, int heads,
                                                     float scale) {
    int i = blockIdx.x % t;
    const uint32_t* sg = seg + (size_t)(blockIdx.x / t / heads) * t;
    const bf16* sr = s + (size_t)blockIdx.x * t;
    bf16* pr = p + (size_t)blockIdx.x * t;
    float m = -INFINITY;
    for (int j = threadIdx.x; j <= i; j += blockDim.x)
        if (visible(sg, i, j)) m = fmaxf(m, round_bf16(f32(sr[j]) * scale));
    m = block_reduce(m, Max());
    float sum = 0.f;
    for (int j = threadIdx.x; j <= i; j += blockDim.x)
        if (visible(sg, i, j)) sum += expf(round_bf16(f32(sr[j]) * scale) - m);
    float inv = 1.f / block_reduce(sum, Sum());
    for (int j = threadIdx.x; j < t; j += blockDim.x)
        pr[j] = to_bf16(visible(sg, i, j) ? expf(round_bf16(f32(sr[j]) * scale) - m) * inv : 0.f);
}

// dS = c P (dP - rowsum(dP P)) per row of [B H, T, T]: the score gradient with the scale c folded in, so the
// GEMMs dQ = dS K and dK = dS^T Q need no scaling pass. Masked entries have P = 0 and so dS = 0.
extern "C" __global__ void attention_softmax_backward(const bf16* p, const bf16* dp, bf16* ds, int t, float scale) {
    size_t base = (size_t)blockIdx.x * t;
    float dot = 0.f;
    for (int j = threadIdx.x; j < t; j += blockDim.x) dot += f32(dp[base + j]) * f32(p[base + j]);
    dot = block_reduce(dot, Sum());
    for (int j = threadIdx.x; j < t; j += blockDim.x)
        ds[base + j] = to_bf16(scale * f32(p[base + j]) * (f32(dp[base + j]) - dot));
}
