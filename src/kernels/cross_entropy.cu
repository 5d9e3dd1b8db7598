// Cross-entropy over the vocabulary, forward and backward in one kernel per row, reading the bf16 logits the
// head's GEMM wrote: no f32 copy of the [rows, vocab] logits. Reference:
// train::layers::cross_entropy_forward_backward.
#include "common.cuh"

// One block per row: loss[row] = (logsumexp(l) - l[target]) mask, dlogits = (softmax(l) - onehot) mask, over
// the first v of each row's `stride` logits (a multiple of 8); the padding's gradient is 0. Two passes over
// the row in 16-byte accesses: the max and the sum of exponentials together (each thread rescales its sum
// when its max grows: online softmax), then the gradient, its reads mostly from L2. Scalar loads and a pass
// each for the max and the sum took 169 us a chunk of 1024 rows of 32008 (H100), 4x the bytes' time.
extern "C" __global__ void cross_entropy_forward_backward(const bf16* logits, const uint32_t* targets,
                                                          const float* mask, float* loss, bf16* dlogits, int v,
                                                          int stride) {
    follow_previous();
    const bf16* l = logits + (size_t)blockIdx.x * stride;
    bf16* dl = dlogits + (size_t)blockIdx.x * stride;
    float m = -INFINITY, s = 0.f;  // in base 2: logits times log2(e)
    for (int i = 8 * threadIdx.x; i < v; i += 8 * blockDim.x) {
        float x[8], mx = m;
        load8(l + i, x);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            x[e] = i + e < v ? x[e] * LOG2E : -INFINITY;
            mx = fmaxf(mx, x[e]);
        }
        s *= exp2f(m - mx);  // 0 * exp2(-inf - mx) = 0 before the first
#pragma unroll
        for (int e = 0; e < 8; e++) s += exp2f(x[e] - mx);
        m = mx;
    }
    float top = block_reduce(m, Max());
    s = block_reduce(m == -INFINITY ? 0.f : s * exp2f(m - top), Sum());
    float mk = mask[blockIdx.x];
    uint32_t t = targets[blockIdx.x];
    float coef = mk / s;
    for (int i = 8 * threadIdx.x; i < stride; i += 8 * blockDim.x) {
        float x[8];
        load8(l + i, x);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            float p = i + e < v ? exp2f(x[e] * LOG2E - top) * coef : 0.f;
            x[e] = i + e == (int)t ? p - mk : p;
        }
        store8(dl + i, x);
    }
    if (threadIdx.x == 0) loss[blockIdx.x] = (log2f(s) + top) / LOG2E * mk - f32(l[t]) * mk;
}
