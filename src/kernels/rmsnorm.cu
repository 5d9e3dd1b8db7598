// RMSNorm with the BitLinear input quantization that always follows it, forward and backward.
// Reference: train::layers::{rmsnorm_forward + effective_input, rmsnorm_backward}.
#include "common.cuh"

// Per row of x [n, c] (one block each): r = 1 / sqrt(mean(x^2) + eps), y = bf16(x r w), then y quantized per
// token to int8 (scale max|y| / 127) and back, blended with y by lambda. Writes the BitLinear input and r.
// Three passes over the row, which stays in L1/L2: one read from memory, one write.
extern "C" __global__ void rmsnorm_quant_forward(const bf16* x, const bf16* w, bf16* y, float* rrms, int c,
                                                 float inv_c, float eps, float lambda) {
    const bf16* xr = x + (size_t)blockIdx.x * c;
    bf16* yr = y + (size_t)blockIdx.x * c;
    float ss = 0.f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        float v = f32(xr[i]);
        ss += v * v;
    }
    float r = 1.f / sqrtf(block_reduce(ss, Sum()) * inv_c + eps);
    float amax = 0.f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) amax = fmaxf(amax, fabsf(round_bf16(f32(xr[i]) * r * f32(w[i]))));
    float scale = fmaxf(block_reduce(amax, Max()), 1e-5f) * (1.f / 127.f);
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        float v = round_bf16(f32(xr[i]) * r * f32(w[i]));
        float q = fminf(fmaxf(roundf(v / scale), -128.f), 127.f) * scale;
        yr[i] = to_bf16(blend(v, q, lambda));
    }
    if (threadIdx.x == 0) rrms[blockIdx.x] = r;
}

// Columns a thread owns in the backward: c <= RMS_BWD_COLS * blockDim.x.
#define RMS_BWD_COLS 32

// With xhat = x r and g = dy w: dx = r (g - xhat mean(g xhat)). Each block takes rows blockIdx.x + k gridDim.x
// and writes its share of dw = sum_rows(dy xhat) to dw_partial[blockIdx.x, :]; the caller sums the
// gridDim.x partial rows (a fixed order: deterministic, unlike atomics).
extern "C" __global__ void rmsnorm_backward(const bf16* dy, const bf16* x, const bf16* w, const float* rrms, bf16* dx,
                                            float* dw_partial, int n, int c, float inv_c) {
    float acc[RMS_BWD_COLS];
#pragma unroll
    for (int k = 0; k < RMS_BWD_COLS; k++) acc[k] = 0.f;
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        size_t base = (size_t)row * c;
        float r = rrms[row];
        float dot = 0.f;
#pragma unroll
        for (int k = 0; k < RMS_BWD_COLS; k++) {
            int i = threadIdx.x + k * blockDim.x;
            if (i < c) {
                float d = f32(dy[base + i]), xh = f32(x[base + i]) * r;
                dot += d * f32(w[i]) * xh;
                acc[k] += d * xh;
            }
        }
        float proj = block_reduce(dot, Sum()) * inv_c;
#pragma unroll
        for (int k = 0; k < RMS_BWD_COLS; k++) {
            int i = threadIdx.x + k * blockDim.x;
            if (i < c) {
                float g = f32(dy[base + i]) * f32(w[i]), xh = f32(x[base + i]) * r;
                dx[base + i] = to_bf16((g - xh * proj) * r);
            }
        }
    }
#pragma unroll
    for (int k = 0; k < RMS_BWD_COLS; k++) {
        int i = threadIdx.x + k * blockDim.x;
        if (i < c) dw_partial[(size_t)blockIdx.x * c + i] = acc[k];
    }
}
