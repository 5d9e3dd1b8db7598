// The softmax of attention with its mask, forward and backward, for one block of queries between the cuBLAS
// GEMMs that compute S = Q K^T, Y = P V and their gradients (flash attention 2's recurrence with the block's
// scores in memory, not in registers): one pass over the [rows, keys] block each way, in bf16, instead of
// the reference's chain of f32 ops. Reference: train::layers::flash_attention_{forward,backward}.
#include "common.cuh"

// Rows are (batch, head, query) of the block, queries q0.. of a sequence of t tokens; `start` [batch, t] is
// the first position of each token's example (f32, exact below 2^24). Query i sees key j when
// start[i] <= j <= i: its own example, causally.
struct Row {
    size_t base;  // offset of the row in [rows, nk] tensors
    int i;        // the query's position
    int lo;       // its first visible key
};

__device__ __forceinline__ Row row_of(const float* start, int q0, int nq, int nk, int t, int heads) {
    int r = blockIdx.x % nq, b = blockIdx.x / nq / heads;
    int i = q0 + r;
    return Row{(size_t)blockIdx.x * nk, i, (int)start[(size_t)b * t + i]};
}

// The scaled score as the reference rounds it (its scale is a bf16 op).
__device__ __forceinline__ float scaled(const bf16* s, size_t at, float scale) { return round_bf16(f32(s[at]) * scale); }

// S: [B H, nq, nk] unscaled bf16 scores. P = exp(S c - lse) on visible keys, 0 elsewhere (bf16, for the
// P V GEMM), and lse = log sum exp over visible keys (f32, kept for the backward).
extern "C" __global__ void attention_block_forward(const bf16* s, const float* start, bf16* p, float* lse, int q0,
                                                   int nq, int nk, int t, int heads, float scale) {
    Row row = row_of(start, q0, nq, nk, t, heads);
    float m = -INFINITY;
    for (int j = row.lo + threadIdx.x; j <= row.i; j += blockDim.x) m = fmaxf(m, scaled(s, row.base + j, scale));
    m = block_reduce(m, Max());
    float sum = 0.f;
    for (int j = row.lo + threadIdx.x; j <= row.i; j += blockDim.x) sum += expf(scaled(s, row.base + j, scale) - m);
    float l = logf(block_reduce(sum, Sum())) + m;
    for (int j = threadIdx.x; j < nk; j += blockDim.x)
        p[row.base + j] = to_bf16(j >= row.lo && j <= row.i ? expf(scaled(s, row.base + j, scale) - l) : 0.f);
    if (threadIdx.x == 0) lse[blockIdx.x] = l;
}

// From the recomputed scores S, the saved lse and dP = dY V^T (bf16): P as the forward made it (bf16, for
// dV = P^T dY) and dS = c P (dP - rowsum(dP P)), the score gradient with the scale c folded in (bf16, for
// dQ = dS K and dK = dS^T Q). A row with one visible key gets dS = 0 exactly.
extern "C" __global__ void attention_block_backward(const bf16* s, const float* lse, const bf16* dp,
                                                    const float* start, bf16* p, bf16* ds, int q0, int nq, int nk,
                                                    int t, int heads, float scale) {
    Row row = row_of(start, q0, nq, nk, t, heads);
    float l = lse[blockIdx.x];
    float dot = 0.f;
    for (int j = row.lo + threadIdx.x; j <= row.i; j += blockDim.x)
        dot += f32(dp[row.base + j]) * expf(scaled(s, row.base + j, scale) - l);
    dot = block_reduce(dot, Sum());
    for (int j = threadIdx.x; j < nk; j += blockDim.x) {
        float pj = j >= row.lo && j <= row.i ? expf(scaled(s, row.base + j, scale) - l) : 0.f;
        p[row.base + j] = to_bf16(pj);
        ds[row.base + j] = to_bf16(scale * pj * (f32(dp[row.base + j]) - dot));
    }
}
