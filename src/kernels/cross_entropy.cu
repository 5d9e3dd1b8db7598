// Cross-entropy over the vocabulary, forward and backward in one pass per row, reading the bf16 logits the
// head's GEMM wrote: no f32 copy of the [rows, vocab] logits. Reference:
// train::layers::cross_entropy_forward_backward.
#include "common.cuh"

// One block per row: loss[row] = (logsumexp(l) - l[target]) mask, dlogits = (softmax(l) - onehot) mask, over
// the first v of each row's `stride` logits; the padding's gradient is 0.
extern "C" __global__ void cross_entropy_forward_backward(const bf16* logits, const uint32_t* targets,
                                                          const float* mask, float* loss, bf16* dlogits, int v,
                                                          int stride) {
    const bf16* l = logits + (size_t)blockIdx.x * stride;
    bf16* dl = dlogits + (size_t)blockIdx.x * stride;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < v; i += blockDim.x) m = fmaxf(m, f32(l[i]));
    m = block_reduce(m, Max());
    float s = 0.f;
    for (int i = threadIdx.x; i < v; i += blockDim.x) s += expf(f32(l[i]) - m);
    s = block_reduce(s, Sum());
    float mk = mask[blockIdx.x];
    uint32_t t = targets[blockIdx.x];
    float coef = mk / s;
    for (int i = threadIdx.x; i < v; i += blockDim.x) {
        float p = expf(f32(l[i]) - m) * coef;
        dl[i] = to_bf16(i == (int)t ? p - mk : p);
    }
    for (int i = v + threadIdx.x; i < stride; i += blockDim.x) dl[i] = to_bf16(0.f);
    if (threadIdx.x == 0) loss[blockIdx.x] = (logf(s) + m - f32(l[t])) * mk;
}
