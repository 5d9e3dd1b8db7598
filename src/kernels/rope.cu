// RoPE fused with the head split of the q, k, v projection, forward and backward.
// Reference: train::layers::{qkv_heads, qkv_heads_backward}.
//
// qkv [b t, (hq + 2 hkv) d] holds each token's q, k, v heads side by side (one GEMM made them);
// q [b, hq, t, d], k and v [b, hkv, t, d] are the layout of the attention GEMMs. Forward: rows to heads,
// q and k rotated by their token's angles. Backward: heads to rows, rotated back (the transpose of a
// rotation is the rotation by the negated angle). LLaMA's pairs: channel j with j + d/2. cos, sin
// [b, t, d/2] in the compute dtype. In f32, rounded once.
#include "common.cuh"

// One block per token row (grid-stride), its threads over the row's (head, 8 pairs) slots: 16-byte accesses
// to channels j..j+8 and their partners j+d/2..; half = d/2 must be a multiple of 8.
extern "C" __global__ void qkv_rope(bf16* qkv, bf16* q, bf16* k, bf16* v, const bf16* cos, const bf16* sin,
                                    int b, int t, int hq, int hkv, int d, int backward) {
    follow_previous();
    int half = d / 2, heads = hq + 2 * hkv, vecs = half / 8;
    for (int row = blockIdx.x; row < b * t; row += gridDim.x) {  // the token: batch row * t + position
        int ti = row % t, bi = row / t;
        for (int slot = threadIdx.x; slot < heads * vecs; slot += blockDim.x) {
            int h = slot / vecs, j = (slot - h * vecs) * 8;
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
            float x1[8], x2[8];
            load8(src + j, x1);
            load8(src + j + half, x2);
            if (head != v) {
                float c[8], s[8];
                load8(cos + (size_t)row * half + j, c);
                load8(sin + (size_t)row * half + j, s);
#pragma unroll
                for (int e = 0; e < 8; e++) rope_turn(x1[e], x2[e], c[e], backward ? -s[e] : s[e]);
            }
            store8(dst + j, x1);
            store8(dst + j + half, x2);
        }
    }
}
