// SwiGLU h = silu(a) b, forward and backward, elementwise. Reference: train::layers::swiglu_{forward,backward}.
#include "common.cuh"

extern "C" __global__ void swiglu_forward(const bf16* a, const bf16* b, bf16* h, size_t n) {
    GRID_STRIDE(i, n) {
        float x = f32(a[i]);
        // silu is stored in bf16 before the product, as the two unfused ops do.
        h[i] = to_bf16(round_bf16(x / (1.f + expf(-x))) * f32(b[i]));
    }
}

// silu'(a) = s (1 + a (1 - s)) with s = sigmoid(a); da = dh b silu'(a), db = dh silu(a).
extern "C" __global__ void swiglu_backward(const bf16* dh, const bf16* a, const bf16* b, bf16* da, bf16* db,
                                           size_t n) {
    GRID_STRIDE(i, n) {
        float d = f32(dh[i]), x = f32(a[i]);
        float s = 1.f / (1.f + expf(-x));
        da[i] = to_bf16(d * f32(b[i]) * (s * (x * (1.f - s) + 1.f)));
        db[i] = to_bf16(d * x * s);
    }
}
