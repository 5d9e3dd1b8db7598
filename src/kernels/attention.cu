// The softmax of attention with its mask, forward and backward, for one block of queries between the cuBLAS
// GEMMs that compute S = Q K^T, Y = P V and their gradients (flash attention 2's recurrence with the block's
// scores in memory, not in registers): one warp per row, 16-byte accesses, in bf16, instead of the
// reference's chain of f32 ops. Reference: train::layers::flash_attention_{forward,backward}.
#include "common.cuh"

#define WARPS 8  // rows per block of 256 threads

// Rows are (batch, head, query) of the block, queries q0.. of a sequence of t tokens; `start` [batch, t] is
// the first position of each token's example (f32, exact below 2^24). Query i sees key j when
// start[i] <= j <= i: its own example, causally.
struct Row {
    size_t base;  // offset of the row in [rows, nk] tensors
    int i;        // the query's position
    int lo;       // its first visible key
};

__device__ __forceinline__ Row row_of(int r, const float* start, int q0, int nq, int nk, int t, int heads) {
    int i = q0 + r % nq, b = r / nq / heads;
    return Row{(size_t)r * nk, i, (int)start[(size_t)b * t + i]};
}

// Eight entries of a row from column 8 v: one 16-byte load when rows are 16-byte aligned (nk % 8 == 0),
// else one by one, with 0 past the row's end.
__device__ __forceinline__ void load_row8(const bf16* row, int v, int nk, float* out) {
    if (nk % 8 == 0) return load8(row + 8 * v, out);
#pragma unroll
    for (int e = 0; e < 8; e++) out[e] = 8 * v + e < nk ? f32(row[8 * v + e]) : 0.f;
}
__device__ __forceinline__ void store_row8(bf16* row, int v, int nk, const float* in) {
    if (nk % 8 == 0) return store8(row + 8 * v, in);
#pragma unroll
    for (int e = 0; e < 8; e++)
        if (8 * v + e < nk) row[8 * v + e] = to_bf16(in[e]);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// The scaled score as the reference rounds it (its scale is a bf16 op).
__device__ __forceinline__ float scaled(float s, float scale) { return round_bf16(s * scale); }

// The probabilities P = exp(S c - lse) of the eight keys from column 8 v of a row, 0 on keys it does not see.
__device__ __forceinline__ void probs8(const bf16* s, const Row& row, int v, int nk, float scale, float l, float* p) {
    load_row8(s + row.base, v, nk, p);
#pragma unroll
    for (int e = 0; e < 8; e++) {
        int j = 8 * v + e;
        p[e] = j >= row.lo && j <= row.i ? expf(scaled(p[e], scale) - l) : 0.f;
    }
}

// S: [B H, nq, nk] unscaled bf16 scores. P = exp(S c - lse) on visible keys, 0 elsewhere (bf16, for the
// P V GEMM), and lse = log sum exp over visible keys (f32, kept for the backward). The max and the sum in one
// pass (online softmax), the write in a second.
extern "C" __global__ void attention_block_forward(const bf16* s, const float* start, bf16* p, float* lse, int rows,
                                                   int q0, int nq, int nk, int t, int heads, float scale) {
    follow_previous();
    int r = blockIdx.x * WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (r >= rows) return;
    Row row = row_of(r, start, q0, nq, nk, t, heads);
    float m = -INFINITY, sum = 0.f;
    for (int v = row.lo / 8 + lane; v <= row.i / 8; v += 32) {
        float x[8];
        load_row8(s + row.base, v, nk, x);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            int j = 8 * v + e;
            if (j < row.lo || j > row.i) continue;
            float y = scaled(x[e], scale);
            if (y > m) {
                sum = sum * expf(m - y) + 1.f;
                m = y;
            } else {
                sum += expf(y - m);
            }
        }
    }
    for (int o = 16; o > 0; o /= 2) {
        float m2 = __shfl_xor_sync(0xffffffff, m, o), s2 = __shfl_xor_sync(0xffffffff, sum, o);
        float mm = fmaxf(m, m2);
        sum = (m == -INFINITY ? 0.f : sum * expf(m - mm)) + (m2 == -INFINITY ? 0.f : s2 * expf(m2 - mm));
        m = mm;
    }
    float l = logf(sum) + m;
    for (int v = lane; v < (nk + 7) / 8; v += 32) {
        float x[8];
        probs8(s, row, v, nk, scale, l, x);
        store_row8(p + row.base, v, nk, x);
    }
    if (lane == 0) lse[r] = l;
}

// From the recomputed scores S, the saved lse and dP = dY V^T (bf16): P as the forward made it (bf16, for
// dV = P^T dY) and dS = c P (dP - rowsum(dP P)), the score gradient with the scale c folded in (bf16, for
// dQ = dS K and dK = dS^T Q). A row with one visible key gets dS = 0 exactly.
extern "C" __global__ void attention_block_backward(const bf16* s, const float* lse, const bf16* dp,
                                                    const float* start, bf16* p, bf16* ds, int rows, int q0,
                                                    int nq, int nk, int t, int heads, float scale) {
    follow_previous();
    int r = blockIdx.x * WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (r >= rows) return;
    Row row = row_of(r, start, q0, nq, nk, t, heads);
    float l = lse[r];
    float dot = 0.f;
    // The first pass reads only the vectors with visible keys.
    for (int v = row.lo / 8 + lane; v <= row.i / 8; v += 32) {
        float x[8], d[8];
        probs8(s, row, v, nk, scale, l, x);
        load_row8(dp + row.base, v, nk, d);
#pragma unroll
        for (int e = 0; e < 8; e++) dot += d[e] * x[e];
    }
    dot = warp_sum(dot);
    for (int v = lane; v < (nk + 7) / 8; v += 32) {
        float x[8], d[8];
        probs8(s, row, v, nk, scale, l, x);
        load_row8(dp + row.base, v, nk, d);
#pragma unroll
        for (int e = 0; e < 8; e++) d[e] = scale * x[e] * (d[e] - dot);
        store_row8(p + row.base, v, nk, x);
        store_row8(ds + row.base, v, nk, d);
    }
}
