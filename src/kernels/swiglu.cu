// SwiGLU h = silu(gate) up over the fused gate/up projection, forward and backward, elementwise, 8 channels
// per thread. gu [n, 2m] holds gate in columns 0..m and up in m..2m of each row; m % 8 == 0.
// Reference: train::layers::swiglu_{forward,backward}.
#include "common.cuh"

extern "C" __global__ void swiglu_forward(const bf16* gu, bf16* h, int n, int m) {
    size_t per_row = m / 8;
    GRID_STRIDE(v, (size_t)n * per_row) {
        size_t r = v / per_row, j = (v % per_row) * 8;
        float a[8], b[8];
        load8(gu + r * 2 * m + j, a);
        load8(gu + r * 2 * m + m + j, b);
        // silu is stored in bf16 before the product, as the two unfused ops do.
#pragma unroll
        for (int e = 0; e < 8; e++) a[e] = round_bf16(a[e] / (1.f + expf(-a[e]))) * b[e];
        store8(h + r * m + j, a);
    }
}

// silu'(a) = s (1 + a (1 - s)) with s = sigmoid(a); dgate = dh up silu'(gate), dup = dh silu(gate).
extern "C" __global__ void swiglu_backward(const bf16* dh, const bf16* gu, bf16* dgu, int n, int m) {
    size_t per_row = m / 8;
    GRID_STRIDE(v, (size_t)n * per_row) {
        size_t r = v / per_row, j = (v % per_row) * 8;
        float d[8], a[8], b[8], da[8], db[8];
        load8(dh + r * m + j, d);
        load8(gu + r * 2 * m + j, a);
        load8(gu + r * 2 * m + m + j, b);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            float s = 1.f / (1.f + expf(-a[e]));
            da[e] = d[e] * b[e] * (s * (a[e] * (1.f - s) + 1.f));
            db[e] = d[e] * a[e] * s;
        }
        store8(dgu + r * 2 * m + j, da);
        store8(dgu + r * 2 * m + m + j, db);
    }
}
