// RoPE fused with the head split of the q, k, v projection, forward and backward.
// Reference: train::layers::{qkv_heads, qkv_heads_backward}.
//
// qkv [b t, (hq + 2 hkv) d] holds each token's q, k, v heads side by side (one GEMM made them);
// q [b, hq, t, d], k and v [b, hkv, t, d] are the layout of the attention GEMMs. Forward: rows to heads,
// q and k rotated by their token's angles. Backward: heads to rows, rotated back (the transpose of a
// rotation is the rotation by the negated angle). LLaMA's pairs: channel j with j + d/2. cos, sin
// [b, t, d/2] in the compute dtype. One thread per pair, in f32, rounded once.
#include "common.cuh"

// One block per token row (grid-stride), its threads over the row's (head, pair) slots; 32-bit index math.
extern "C" __global__ void qkv_rope(bf16* qkv, bf16* q, bf16* k, bf16* v, const bf16* cos, const bf16* sin,
                                    int b, int t, int hq, int hkv, int d, int backward) {
    int half = d / 2, heads = hq + 2 * hkv;
    for (int row = blockIdx.x; row < b * t; row += gridDim.x) {  // the token: batch row * t + position
        int ti = row % t, bi = row / t;
        for (int slot = threadIdx.x; slot < heads * half; slot += blockDim.x) {
            int h = slot / half, j = slot - h * half;
            bf16* x = qkv + ((size_t)row * heads + h) * d;
            bf16* head;
            int nh;
            if (h < hq) {
                head = q, nh = hq;
            } else if (h < hq + hkv) {
                head = k, nh = hkv, h -= hq;
            } else {
                head = v, nh = hkv, h -= hq + hkv;
            }
            bf16* y = head + (((size_t)bi * nh + h) * t + ti) * d;
            bf16 *src = backward ? y : x, *dst = backward ? x : y;
            float x1 = f32(src[j]), x2 = f32(src[j + half]);
            if (head != v) {
                float c = f32(cos[(size_t)row * half + j]), s = f32(sin[(size_t)row * half + j]);
                if (backward) s = -s;
                float y1 = x1 * c - x2 * s;
                x2 = x1 * s + x2 * c;
                x1 = y1;
            }
            dst[j] = to_bf16(x1);
            dst[j + half] = to_bf16(x2);
        }
    }
}
