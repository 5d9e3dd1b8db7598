// What the flash attention kernels share (flash_attention.cu's, and flash_hopper.cu's dK/dV kernel for
// Hopper): the softmax's pieces, the masks of causal windows, fragment packing and cp.async's groups.
#pragma once
#include "common.cuh"

// 2^x on the special-function unit with denormal results flushed to 0 (a probability below 1e-38 weighs
// nothing): exp2f's handling of denormals cost extra instructions per score in kernels that issue-bound.
__device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

// Two 8-wide C fragments (16 columns) as one A fragment of a 16-deep k step: a product's output feeds the
// next product without leaving registers.
__device__ __forceinline__ void as_a(uint32_t* a, const float* lo, const float* hi) {
    a[0] = pack(lo[0], lo[1]), a[1] = pack(lo[2], lo[3]), a[2] = pack(hi[0], hi[1]), a[3] = pack(hi[2], hi[3]);
}

__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n"); }
// Waits until at most N committed groups are in flight; a barrier then makes the data visible to all.
template <int N> __device__ __forceinline__ void wait_loads() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// The window start of a row past the sequence: it sees no key.
#define NO_KEYS (1 << 30)

// Whether query i (of window start lo) sees key j. `start` is non-decreasing along a sequence (examples are
// contiguous runs, padding starts at itself), so a tile's first row has the tile's first key, its last row
// the last window start, and the queries that see a key form one run.
__device__ __forceinline__ bool sees(int i, int lo, int j) { return j >= lo && j <= i; }

// Whether every query of rows q0..q0+nq-1 (the last of window start lo_last) sees every key k0..k0+nk-1:
// then the tile needs no mask.
__device__ __forceinline__ bool all_seen(int q0, int nq, int lo_last, int k0, int nk, int t) {
    return q0 >= k0 + nk - 1 && lo_last <= k0 && q0 + nq <= t;
}

// The offset of key/value head of query head `qh` (blockIdx.y = batch * heads + query head) in K and V
// [batch * heads / group, t, D].
template <int D> __device__ __forceinline__ size_t kv_head(int qh, int t, int heads, int group) {
    int b = qh / heads;
    return ((size_t)b * (heads / group) + qh % heads / group) * t * D;
}

// Softmax gradient of one score in two steps: the probability p from the score s (unscaled), then dS / sqrt(D)
// from p and dp (the scale folded in for dQ and dK). A query that sees one key (each example's first token)
// has dS = 0 exactly, as the plain backward gives. The backward kernels call them for a whole tile with
// `masked` a compile-time constant: a tile whose queries all see all its keys (so none sees only one) skips
// the tests per score, which made the integer pipe the busiest of the dK/dV kernel.
template <bool B> struct Flag {  // a compile-time bool as an argument's type
    static constexpr bool value = B;
};
__device__ __forceinline__ float prob(float s, bool seen, float lse2, float scale2) {
    return seen ? exp2_ftz(s * scale2 - lse2) : 0.f;
}
__device__ __forceinline__ float score_grad(float p, float dp, bool seen, bool alone, float delta, float scale2) {
    return seen && !alone ? p * (dp - delta) * (scale2 * 0.69314718056f) : 0.f;
}

