// Kernels over the flat f32 parameter and gradient buffers: partial sums (the weight scale's absmean and
// the gradient norm), this step's weights (ternary BitLinear matrices, cast norms and embeddings), and
// AdamW. References: ops::quantize_weight, train::layers::effective_weight,
// train::optim::{grad_norm, AdamW::step}.
#include <float.h>

#include "common.cuh"

// This block's part (of `parts`, grid-stride) of sum |x| (square = 0) or sum x^2 (square = 1) over x[0..n] (f32 or
// bf16), in f64, reduced over the block. 16-byte loads between the first and last 16-byte boundaries (x is a
// view at any element offset); part 0 adds the scalars before and after them. The bf16 gradient buffer's norm
// loaded one element at a time ran at 1.2 TB/s (H100), where the f32 one's 16-byte loads ran at 3.2.
__device__ __forceinline__ double term(float v, int square) { return square ? (double)v * v : fabs((double)v); }
// The terms of the 16 bytes at p, summed in order.
__device__ __forceinline__ double vector_terms(const float* p, int square) {
    float4 q = *reinterpret_cast<const float4*>(p);
    return term(q.x, square) + term(q.y, square) + term(q.z, square) + term(q.w, square);
}
__device__ __forceinline__ double vector_terms(const bf16* p, int square) {
    float v[8];
    load8(p, v);
    double acc = 0.0;
#pragma unroll
    for (int e = 0; e < 8; e++) acc += term(v[e], square);
    return acc;
}

template <typename T> __device__ double partial_sum(const T* x, size_t n, int square, int part, int parts) {
    constexpr size_t V = 16 / sizeof(T);
    size_t head = min(n, (size_t)((16 - ((uintptr_t)x & 15)) & 15) / sizeof(T));
    size_t vectors = (n - head) / V;
    const T* body = x + head;
    double acc = 0.0;
    for (size_t i = (size_t)part * blockDim.x + threadIdx.x; i < vectors; i += (size_t)parts * blockDim.x)
        acc += vector_terms(body + V * i, square);
    if (part == 0) {
        for (size_t i = threadIdx.x; i < head; i += blockDim.x) acc += term(load_f32(x + i), square);
        for (size_t i = head + vectors * V + threadIdx.x; i < n; i += blockDim.x) acc += term(load_f32(x + i), square);
    }
    return block_reduce(acc, Sum());
}

// One partial sum of x^2 per block into out[blockIdx.x] (the gradient norm): sum_squares_f32, sum_squares_bf16.
#define SUM_SQUARES(NAME, T)                                                             \
    extern "C" __global__ void NAME(const T* x, size_t n, double* out) {                 \
        follow_previous();                                                               \
        double acc = partial_sum(x, n, 1, blockIdx.x, gridDim.x);                        \
        if (threadIdx.x == 0) out[blockIdx.x] = acc;                                     \
    }
SUM_SQUARES(sum_squares_f32, float)
SUM_SQUARES(sum_squares_bf16, bf16)

// The slot table (flat.rs's SlotTable): slots[SLOT_COLS k ..] = first, count, matrix, first block, decays,
// columns, first row: slot k's elements flat[first .. first + count] (the whole slot, or under ZeRO-1 its part
// in this rank's shard; count 0 when none), for a BitLinear matrix the element count of the whole matrix (0 for
// a parameter that is only cast), the first block of the grid that is the slot's (the grid of step_weights and
// adamw: a block per ~8192 elements of each slot), whether AdamW's weight decay applies to it, and for a
// matrix its columns and its first row among all the matrices' rows (the int8 GEMM's row scales).
#define SLOT_COLS 7

// This block's slot (the last whose first block is at most this one), its place among the slot's blocks and
// their number.
struct SlotPart {
    int slot;
    size_t part, blocks;
    // `block`: the block's place in the whole table's grid of `total` blocks (a launch may cover some slots).
    __device__ SlotPart(const long long* slots, int n_slots, unsigned block, unsigned total) {
        int lo = 0, hi = n_slots - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (slots[SLOT_COLS * mid + 3] <= block) lo = mid; else hi = mid - 1;
        }
        slot = lo;
        part = block - slots[SLOT_COLS * lo + 3];
        blocks = (lo + 1 < n_slots ? slots[SLOT_COLS * (lo + 1) + 3] : total) - slots[SLOT_COLS * lo + 3];
    }
};

// This step's weights for every slot of the flat f32 buffer at once, written to `out` (bf16, the same
// layout from element `out_base` on: all of it, or one block's).
//
// First the partial sums of |W| over each BitLinear matrix's elements: slot k is blockIdx.y, its `parts` (gridDim.x)
// partial sums partials[k * parts + part] (0 for the other slots, so that the partials of ranks holding disjoint
// parts of a matrix sum to the matrix's). After an AdamW step the sums come from adamw and slot_totals instead
// (parts = 1), which saw the new weights as it wrote them.
extern "C" __global__ void slot_absmean_partials(const float* flat, const long long* slots, double* partials) {
    follow_previous();
    const long long* s = slots + SLOT_COLS * blockIdx.y;
    double acc = s[2] ? partial_sum(flat + s[0], s[1], 0, blockIdx.x, gridDim.x) : 0.0;
    if (threadIdx.x == 0) partials[(size_t)blockIdx.y * gridDim.x + blockIdx.x] = acc;
}

__device__ __forceinline__ float ternary(float x, float s) {
    return fminf(fmaxf(round_for_clamp(x * s), -1.f), 1.f);
}
__device__ __forceinline__ bf16 step_weight(float x, float s, float inv, float lambda, bool matrix) {
    return to_bf16(matrix ? blend(x, ternary(x, s) * inv, lambda) : x);
}

// Then the writes, over the table's grid, which each slot shares in proportion to its size, so that the
// embedding and the head do not run on as many blocks as a norm. A BitLinear matrix:
// s = 1 / max(mean|W|, 1e-5) from the partial sums of the whole matrix (under ZeRO-1 summed over the ranks
// first; every block adds them in the same order), q = clamp(round(W s), -1, 1) / s, blended with W by lambda
// (the reference: train::layers::effective_weight). Any other parameter: cast. Four elements per access
// between the slot's first and last multiples of 4 (16 bytes in, 8 out); block 0 of the slot takes the ends.
// A launch covers the table's blocks from first_block on (some slots: one block's, train.step_weights =
// "per_block"), of total_blocks in all.
// With `codes` (not null; lambda 1 and whole slots only) the matrices are also written as the int8 GEMM
// reads them: the ternary codes (int8, the flat layout from element `codes_base` on, a multiple of 16) and
// each row's scale, the bf16 value of a nonzero weight (`row_scales`, at the slot's first row): a weight is
// exactly its code times its row's scale.
extern "C" __global__ void step_weights(const float* flat, const long long* slots, int n_slots,
                                        const double* partials, int parts, float lambda, bf16* out,
                                        signed char* codes, long long codes_base, float* row_scales,
                                        long long out_base, int first_block, int total_blocks) {
    follow_previous();
    SlotPart sp(slots, n_slots, blockIdx.x + first_block, total_blocks);
    int lo = sp.slot;
    const long long* sl = slots + SLOT_COLS * lo;
    size_t first = sl[0], n = sl[1], part = sp.part, blocks = sp.blocks;
    bool matrix = sl[2] != 0;
    float s = 1.f, inv = 1.f;
    if (matrix) {
        double total = 0.0;
        for (int i = threadIdx.x; i < parts; i += blockDim.x) total += partials[(size_t)lo * parts + i];
        s = 1.f / fmaxf((float)(block_reduce(total, Sum()) / (double)sl[2]), 1e-5f);
        inv = 1.f / s;
    }
    const float* w = flat + first;
    // out_base and codes_base are multiples of 4, so o and c are aligned as w for the 8- and 4-byte writes.
    bf16* o = out + (first - out_base);
    signed char* c = codes && matrix ? codes + (first - codes_base) : nullptr;
    size_t head = min(n, (4 - first % 4) % 4), quads = (n - head) / 4;
    for (size_t q = part * blockDim.x + threadIdx.x; q < quads; q += blocks * blockDim.x) {
        size_t i = head + 4 * q;
        float4 x = *reinterpret_cast<const float4*>(w + i);
        __nv_bfloat162 y[2] = {{step_weight(x.x, s, inv, lambda, matrix), step_weight(x.y, s, inv, lambda, matrix)},
                               {step_weight(x.z, s, inv, lambda, matrix), step_weight(x.w, s, inv, lambda, matrix)}};
        *reinterpret_cast<uint2*>(o + i) = *reinterpret_cast<uint2*>(y);
        if (c)
            *reinterpret_cast<char4*>(c + i) = make_char4((signed char)ternary(x.x, s), (signed char)ternary(x.y, s),
                                                          (signed char)ternary(x.z, s), (signed char)ternary(x.w, s));
    }
    if (part == 0) {
        for (size_t i = threadIdx.x; i < n - 4 * quads; i += blockDim.x) {
            size_t j = i < head ? i : 4 * quads + i;
            o[j] = step_weight(w[j], s, inv, lambda, matrix);
            if (c) c[j] = (signed char)ternary(w[j], s);
        }
        if (c)
            for (long long r = threadIdx.x; r < sl[2] / sl[5]; r += blockDim.x) row_scales[sl[6] + r] = round_bf16(inv);
    }
}

// dst += src (add = 1) or dst = src (add = 0, the step's first gradient of the range: dst is not read, it may
// hold anything) over n elements: a layer's gradient (bf16 from the GEMM, or f32) into its range of the flat
// gradient buffer (f32, or bf16: rounded once, after the sum in f32). One pass instead of a cast, an add and a
// copy. Named accumulate_SRC_DST.
template <typename D, typename S> __device__ void accumulate(D* dst, const S* src, size_t n, int add) {
    follow_previous();
    GRID_STRIDE(i, n) {
        float s = load_f32(src + i);
        store_f32(dst + i, add ? load_f32(dst + i) + s : s);
    }
}
#define ACCUMULATE(NAME, D, S) \
    extern "C" __global__ void NAME(D* dst, const S* src, size_t n, int add) { accumulate(dst, src, n, add); }
ACCUMULATE(accumulate_f32_f32, float, float)
ACCUMULATE(accumulate_bf16_f32, float, bf16)
ACCUMULATE(accumulate_f32_bf16, bf16, float)
ACCUMULATE(accumulate_bf16_bf16, bf16, bf16)

// torch.optim.AdamW (single-tensor path) on p, m, v in place, with the gradient scaled first (the 1 / tokens
// normalisation and the clip factor): m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, p = p decay,
// p -= step_size m / (sqrt(v) inv_sqrt_bc2 + eps). The kernels take it as one parameter (flat.rs's AdamWStep, in
// this order), `decay` being what weight decay multiplies by where it applies.
struct AdamW {
    float grad_scale, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, inv_sqrt_bc2, eps, step_size;
    __device__ __forceinline__ void update(float& p, float g, float& m, float& v) const {
        g *= grad_scale;
        m = m * beta1 + g * one_minus_beta1;
        v = v * beta2 + g * g * one_minus_beta2;
        p = p * decay - m / (sqrtf(v) * inv_sqrt_bc2 + eps) * step_size;
    }
    // This step for a parameter that weight decay applies to (`decays`) or skips (decay 1).
    __device__ __forceinline__ AdamW for_decay(bool decays) const {
        AdamW step = *this;
        if (!decays) step.decay = 1.f;
        return step;
    }
};

// AdamW over every slot's part of this rank's shard in one launch, on the table's grid, each slot with its own
// weight decay (`decay` where it applies, else 1); m and v hold the shard, from flat element `shard_start`.
// Each block also sums |p| of the BitLinear weights it wrote (0 for other slots) into partials[block], which
// slot_totals turns into the next step weights' absmean: no separate pass over the parameters for it.
// 16-byte accesses between each slot's first and last multiples of 4 (28 bytes of traffic per parameter, at
// the memory's bandwidth) where the shard starts on one (m and v then share p's offset from the grid), block
// 0 of the slot taking the ends; one by one otherwise.
// The gradients G are f32 or bf16 (train.grad_buffer): adamw_f32, adamw_bf16.
template <typename G>
__device__ void adamw(float* p, const G* g, float* m, float* v, size_t shard_start, const long long* slots,
                      int n_slots, const AdamW& step, double* partials) {
    follow_previous();
    SlotPart sp(slots, n_slots, blockIdx.x, gridDim.x);
    const long long* sl = slots + SLOT_COLS * sp.slot;
    size_t first = sl[0], n = sl[1];
    AdamW h = step.for_decay(sl[4]);
    p += first, g += first, m += first - shard_start, v += first - shard_start;
    bool vectors = shard_start % 4 == 0;
    size_t head = vectors ? min(n, (4 - first % 4) % 4) : n, quads = vectors ? (n - head) / 4 : 0;
    size_t stride = sp.blocks * blockDim.x;
    double acc = 0.0;
    for (size_t q = sp.part * blockDim.x + threadIdx.x; q < quads; q += stride) {
        size_t i = head + 4 * q;
        float4 pp = *reinterpret_cast<float4*>(p + i), gg = load4_f32(g + i);
        float4 mm = *reinterpret_cast<float4*>(m + i), vv = *reinterpret_cast<float4*>(v + i);
        h.update(pp.x, gg.x, mm.x, vv.x);
        h.update(pp.y, gg.y, mm.y, vv.y);
        h.update(pp.z, gg.z, mm.z, vv.z);
        h.update(pp.w, gg.w, mm.w, vv.w);
        *reinterpret_cast<float4*>(p + i) = pp;
        *reinterpret_cast<float4*>(m + i) = mm;
        *reinterpret_cast<float4*>(v + i) = vv;
        acc += (double)fabsf(pp.x) + (double)fabsf(pp.y) + (double)fabsf(pp.z) + (double)fabsf(pp.w);
    }
    // The ends around the 16-byte run (all of the part when there is none), spread over the slot's blocks.
    size_t rest = n - 4 * quads;
    for (size_t i = sp.part * blockDim.x + threadIdx.x; i < rest; i += stride) {
        size_t j = i < head ? i : 4 * quads + i;
        h.update(p[j], load_f32(g + j), m[j], v[j]);
        acc += fabsf(p[j]);
    }
    acc = block_reduce(sl[2] ? acc : 0.0, Sum());
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}
#define ADAMW(NAME, G)                                                                                          \
    extern "C" __global__ void NAME(float* p, const G* g, float* m, float* v, size_t shard_start,              \
                                    const long long* slots, int n_slots, AdamW step, double* partials) {        \
        adamw(p, g, m, v, shard_start, slots, n_slots, step, partials);                                         \
    }
ADAMW(adamw_f32, float)
ADAMW(adamw_bf16, bf16)

// AdamW with 8-bit moments (train::moments, whose module doc gives the code; its candle ops are the
// reference): one block of 256 threads per block of 256 moments of the shard, one value a thread. Decodes
// the block's m and v, takes the step as adamw does, and codes them again, with the block's new scales from
// two block reductions. Elements past the shard's end (the last block's padding) stay zero, as the reference
// pads them. Weight decay applies to the runs of the flat buffer whose flag is set: runs[2 r] = the run's first
// element, runs[2 r + 1] = its flag, in order (ParamLayout::runs).
#define MOMENT_BLOCK 256
__device__ __forceinline__ float v_level(float code) {
    // 2^((c - 255) / 4); 0 for code 0.
    return code > 0.f ? expf((code - 255.f) * 0.17328679513998632f) : 0.f;
}
// sqrt(v) as decoded, at least at the range's floor 2^-64 (and never 0): what u is relative to.
__device__ __forceinline__ float root_v(float code, float scale) {
    return fmaxf(sqrtf(fmaxf(v_level(code), 5.421010862427522e-20f) * scale), FLT_MIN);
}
template <typename G>
__device__ void adamw_int8(float* p, const G* g, unsigned char* u, float* u_scale, unsigned char* v,
                           float* v_scale, size_t n, size_t shard_start, const long long* runs, int n_runs,
                           const AdamW& h) {
    follow_previous();
    size_t i = (size_t)blockIdx.x * MOMENT_BLOCK + threadIdx.x;
    bool live = i < n;
    float us = u_scale[blockIdx.x], vs = v_scale[blockIdx.x];
    float vc = v[i], vv = v_level(vc) * vs, mm = ((float)u[i] - 128.f) / 127.f * us * root_v(vc, vs);
    if (live) {
        size_t at = shard_start + i;
        int lo = 0, hi = n_runs - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if ((size_t)runs[2 * mid] <= at) lo = mid; else hi = mid - 1;
        }
        float pp = p[at];
        h.for_decay(runs[2 * lo + 1]).update(pp, load_f32(g + at), mm, vv);
        p[at] = pp;
    } else {
        mm = vv = 0.f;
    }
    float vmax = block_reduce(vv, Max());
    float code = fminf(fmaxf(roundf(logf(vv / fmaxf(vmax, FLT_MIN)) * 5.770780163555854f), -255.f), 0.f) + 255.f;
    float uu = mm / root_v(code, vmax);
    float umax = block_reduce(fabsf(uu), Max());
    v[i] = (unsigned char)code;
    u[i] = (unsigned char)(roundf(uu / fmaxf(umax, FLT_MIN) * 127.f) + 128.f);
    if (threadIdx.x == 0) {
        u_scale[blockIdx.x] = umax;
        v_scale[blockIdx.x] = vmax;
    }
}
#define ADAMW_INT8(NAME, G)                                                                                     \
    extern "C" __global__ void NAME(float* p, const G* g, unsigned char* u, float* u_scale, unsigned char* v,   \
                                    float* v_scale, size_t n, size_t shard_start, const long long* runs,        \
                                    int n_runs, AdamW step) {                                                   \
        adamw_int8(p, g, u, u_scale, v, v_scale, n, shard_start, runs, n_runs, step);                           \
    }
ADAMW_INT8(adamw_int8_f32, float)
ADAMW_INT8(adamw_int8_bf16, bf16)

// totals[k] = the sum of slot k's blocks' partials (adamw's), in block order: one block per slot.
extern "C" __global__ void slot_totals(const double* partials, const long long* slots, int n_slots, int blocks,
                                       double* totals) {
    follow_previous();
    int k = blockIdx.x;
    long long from = slots[SLOT_COLS * k + 3], to = k + 1 < n_slots ? slots[SLOT_COLS * (k + 1) + 3] : blocks;
    double acc = 0.0;
    for (long long b = from + threadIdx.x; b < to; b += blockDim.x) acc += partials[b];
    acc = block_reduce(acc, Sum());
    if (threadIdx.x == 0) totals[k] = acc;
}
