// Decoding one token per row (generation's steps after the prompt): a matrix-vector product for the few rows
// of a step, and attention of each row's new token over its KV cache. References: the candle ops of
// model::bitnet (Stacked::forward, Attention::forward), which each kernel's rounding follows (bf16 where those
// ops store bf16).
#include <float.h>

#include "common.cuh"

// Rows a product takes at a time (bessie-prompt decodes 1; continuous batching's small batches).
#define GEMV_ROWS 8

// The end of both products: each row's sum reduced over the warp, rounded as the reference's bf16 GEMM output
// is, times the output's scale (rounded), plus the residual (rounded).
__device__ __forceinline__ void gemv_finish(float (&acc)[GEMV_ROWS], int rows, int o, int n, const bf16* scale,
                                            const bf16* residual, bf16* out) {
    int lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        if (r >= rows) break;
        float s = acc[r];
        for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffff, s, off);
        if (lane == 0) {
            float y = round_bf16(s);
            if (scale) y = round_bf16(y * f32(scale[o]));
            if (residual) y += f32(residual[(size_t)r * n + o]);
            out[(size_t)r * n + o] = to_bf16(y);
        }
    }
}

// out[r, n] = round(round(round(sum_k x[r, k] w[n, k]) * scale[n]) + residual[r, n]) for r < rows <= 8:
// x [rows, k] and w [n, k] bf16 (the quantized input times its scale, the ternary weights; or the hidden
// states and the head), scale [n] (each output's weight scale) or null (1), residual [rows, n] or null. One
// warp per output n reads its weight row once for every row, 8 bf16 (16 bytes) a lane at a time: k is a
// multiple of 8 and the rows 16-byte aligned.
extern "C" __global__ void gemv(const bf16* x, const bf16* w, const bf16* scale, const bf16* residual, bf16* out,
                                int rows, int n, int k) {
    int lane = threadIdx.x % 32, o = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (o >= n) return;
    float acc[GEMV_ROWS] = {};
    const bf16* wr = w + (size_t)o * k;
    for (int i = lane * 8; i < k; i += 32 * 8) {
        float wv[8];
        load8(wr + i, wv);
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) {
            if (r >= rows) break;
            float xv[8];
            load8(x + (size_t)r * k + i, xv);
#pragma unroll
            for (int e = 0; e < 8; e++) acc[r] += xv[e] * wv[e];
        }
    }
    gemv_finish(acc, rows, o, n, scale, residual, out);
}

// The same product with the ternary weights packed 2 bits each (pack_ternary: a word of 16 per lane and
// iteration, an eighth of the bf16 weights' bytes): the sums are the same, in another order. k is a multiple
// of 16.
extern "C" __global__ void gemv_ternary(const bf16* x, const unsigned* codes, const bf16* scale,
                                        const bf16* residual, bf16* out, int rows, int n, int k) {
    int lane = threadIdx.x % 32, o = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (o >= n) return;
    float acc[GEMV_ROWS] = {};
    int words = k / 16;
    const unsigned* wr = codes + (size_t)o * words;
    for (int i = lane; i < words; i += 32) {
        unsigned word = wr[i];
        float wv[16];
#pragma unroll
        for (int e = 0; e < 16; e++) wv[e] = (float)((word >> (2 * e)) & 3u) - 1.f;
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) {
            if (r >= rows) break;
            float xv[16];
            load8(x + (size_t)r * k + 16 * (size_t)i, xv);
            load8(x + (size_t)r * k + 16 * (size_t)i + 8, xv + 8);
#pragma unroll
            for (int e = 0; e < 16; e++) acc[r] += xv[e] * wv[e];
        }
    }
    gemv_finish(acc, rows, o, n, scale, residual, out);
}

// Packs ternary weights (bf16 values -1, 0, 1) 16 to a 32-bit word, 2 bits each as the value plus 1, element
// 16 i + e at bits 2e of word i.
extern "C" __global__ void pack_ternary(const bf16* w, unsigned* codes, size_t words) {
    GRID_STRIDE(i, words) {
        unsigned word = 0;
        for (int e = 0; e < 16; e++) word |= (unsigned)rintf(f32(w[16 * i + e]) + 1.f) << (2 * e);
        codes[i] = word;
    }
}

// What a row's step knows of its columns (model::kv_cache's Span): meta[4 r ..] = the new token's RoPE
// position, the row's first column, its gap's first column and the gap's length (a retired row: start
// 0xffffffff, it hides every column). After the rows' (meta[4 rows], meta[4 rows + 1]): the first column any
// row attends to and the new tokens' column, read on the device so that a captured step replays for the next
// column.
struct RowMeta {
    unsigned position, start, gap, gap_len;
    __device__ bool hides(unsigned c) const { return c < start || (c >= gap && c - gap < gap_len); }
};

// The rotate-half RoPE of element i < d / 2 and its partner i + d / 2 of a head, with the angle position *
// inv_freq[i] in f32 and its cos and sin rounded to bf16, as the reference's tables are, and each product and
// sum rounded to bf16 as candle's bf16 rope kernel rounds them.
__device__ __forceinline__ void rope_pair(float& a, float& b, float position, const float* inv_freq, int i) {
    float angle = position * inv_freq[i];
    float c = round_bf16(cosf(angle)), s = round_bf16(sinf(angle));
    float x1 = a, x2 = b;
    a = round_bf16(round_bf16(x1 * c) - round_bf16(x2 * s));
    b = round_bf16(round_bf16(x1 * s) + round_bf16(x2 * c));
}

// Attention of each row's new token over its cache, split over the columns as flash-decoding does, so that a
// long context spreads over the card: blockIdx.x = query head, blockIdx.y = row, blockIdx.z = split of SPLIT
// columns (of first..col; enough splits for the cache's width, those past col doing nothing); 128 threads,
// thread i < d / 2 holding the pair of elements i, i + d / 2 where a head's elements are handled. Each block
// rotates the new token's q and its kv head's k (the reference's rotate-half RoPE), the block of the group's
// first query head whose split holds col writes the new k and v to the cache's column `col` (the others take
// the new column from registers, not from the cache being written),
// then softmax(q k^T / sqrt(d)) v over the split's columns that the row does not hide (a hidden query, a
// retired row's, attends to the hidden ones instead, as the reference mask has it). One split writes y; with
// several, each writes its max, its sum of exponentials and its unnormalized output to `partial` [rows, heads,
// splits, d + 2] (f32) and decode_attention_combine joins them. qkv [rows, (heads + 2 kv_heads) d] is the
// stacked projection's output; the caches [rows, kv_heads, width, d]; d <= 256 and even. The reference's
// scores are bf16, times 1 / sqrt(d) in bf16, and its probabilities bf16: the kernel keeps the first two
// roundings and takes the probabilities in f32.
// 32 columns a split: a warp walks its columns one after another (a chain of dependent loads), so the
// columns are spread over many blocks. With 256 a split (64 columns a warp), decoding ran at the same
// 177-186 tok/s with a 439- and a 2,037-column cache (H200), as that chain, not the context, would make it.
#define SPLIT 32
// Warps of a block (128 threads: ATTN_THREADS in decode.rs).
#define ATTN_WARPS 4
extern "C" __global__ void decode_attention(const bf16* qkv, bf16* k_cache, bf16* v_cache, const unsigned* meta,
                                            const float* inv_freq, bf16* y, float* partial, int heads,
                                            int kv_heads, int d, int width) {
    __shared__ float scores[SPLIT], q[256], k_new[256], v_new[256];
    int h = blockIdx.x, r = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    int first = meta[4 * gridDim.y], col = meta[4 * gridDim.y + 1];
    int lo = first + split * SPLIT;
    if (lo > col) {
        // Nothing to attend to: the combine skips this split.
        if (threadIdx.x == 0) partial[(((size_t)r * heads + h) * splits + split) * (d + 2) + d] = -INFINITY;
        return;
    }
    int group = heads / kv_heads, kvh = h / group, half = d / 2;
    RowMeta m{meta[4 * r], meta[4 * r + 1], meta[4 * r + 2], meta[4 * r + 3]};
    const bf16* row = qkv + (size_t)r * (heads + 2 * kv_heads) * d;
    const bf16* qh = row + (size_t)h * d;
    const bf16* kh = row + (size_t)(heads + kvh) * d;
    const bf16* vh = row + (size_t)(heads + kv_heads + kvh) * d;
    size_t head_base = ((size_t)r * kv_heads + kvh) * width * d;
    float pos = (float)m.position;
    bool writes = h % group == 0 && (col - first) / SPLIT == split;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float a = f32(qh[i]), b = f32(qh[i + half]);
        rope_pair(a, b, pos, inv_freq, i);
        q[i] = a, q[i + half] = b;
        a = f32(kh[i]), b = f32(kh[i + half]);
        rope_pair(a, b, pos, inv_freq, i);
        k_new[i] = a, k_new[i + half] = b;
        v_new[i] = f32(vh[i]), v_new[i + half] = f32(vh[i + half]);
        if (writes) {
            size_t at = head_base + (size_t)col * d;
            k_cache[at + i] = to_bf16(a), k_cache[at + i + half] = to_bf16(b);
            v_cache[at + i] = vh[i], v_cache[at + i + half] = vh[i + half];
        }
    }
    __syncthreads();
    // This split's columns; each warp takes them in turn, its lanes splitting the head's elements.
    int n = min(SPLIT, col + 1 - lo);
    int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    bool hidden_query = m.hides(col);
    float inv_sqrt_d = round_bf16(1.f / sqrtf((float)d));
    for (int j = threadIdx.x / 32; j < n; j += warps) {
        int c = lo + j;
        const bf16* kc = k_cache + head_base + (size_t)c * d;
        float s = 0.f;
        for (int e = lane; e < d; e += 32) s += q[e] * (c == col ? k_new[e] : f32(kc[e]));
        for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffff, s, off);
        if (lane == 0) scores[j] = m.hides(c) == hidden_query ? round_bf16(round_bf16(s) * inv_sqrt_d) : -INFINITY;
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) mx = fmaxf(mx, scores[j]);
    mx = block_reduce(mx, Max());
    float sum = 0.f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) sum += mx == -INFINITY ? 0.f : expf(scores[j] - mx);
    sum = block_reduce(sum, Sum());
    __syncthreads();
    for (int j = threadIdx.x; j < n; j += blockDim.x) scores[j] = mx == -INFINITY ? 0.f : expf(scores[j] - mx);
    __syncthreads();
    // p v: each warp sums its columns (as for the scores), a lane its elements lane + 32 m, so that a column's
    // values are one coalesced read; then the warps' sums are added in shared memory.
    float acc[8] = {};
    for (int j = threadIdx.x / 32; j < n; j += warps) {
        float p = scores[j];
        if (p == 0.f) continue;
        int c = lo + j;
        const bf16* vc = v_cache + head_base + (size_t)c * d;
#pragma unroll
        for (int m = 0; m < 8; m++) {
            int e = lane + 32 * m;
            if (e < d) acc[m] += p * (c == col ? v_new[e] : f32(vc[e]));
        }
    }
    __shared__ float sums[ATTN_WARPS][256];
#pragma unroll
    for (int m = 0; m < 8; m++) {
        int e = lane + 32 * m;
        if (e < d) sums[threadIdx.x / 32][e] = acc[m];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < d; e += blockDim.x) {
        float total = 0.f;
        for (int w = 0; w < warps; w++) total += sums[w][e];
        if (splits == 1) {
            y[(size_t)r * heads * d + (size_t)h * d + e] = to_bf16(total / sum);
        } else {
            float* part = partial + (((size_t)r * heads + h) * splits + split) * (d + 2);
            part[e] = total;
            if (e == 0) part[d] = mx, part[d + 1] = sum;
        }
    }
}

// Joins decode_attention's splits (blockIdx.x = head, blockIdx.y = row; thread e < d an element):
// y = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M), M the largest m_s. Splits with nothing to attend to
// (m_s = -inf) count nothing.
extern "C" __global__ void decode_attention_combine(const float* partial, bf16* y, int heads, int d, int splits) {
    int h = blockIdx.x, r = blockIdx.y;
    const float* part = partial + ((size_t)r * heads + h) * splits * (d + 2);
    float top = -INFINITY;
    for (int s = 0; s < splits; s++) top = fmaxf(top, part[(size_t)s * (d + 2) + d]);
    for (int e = threadIdx.x; e < d; e += blockDim.x) {
        float num = 0.f, den = 0.f;
        for (int s = 0; s < splits; s++) {
            const float* p = part + (size_t)s * (d + 2);
            if (p[d] == -INFINITY) continue;
            float w = expf(p[d] - top);
            num += p[e] * w;
            den += p[d + 1] * w;
        }
        y[(size_t)r * heads * d + (size_t)h * d + e] = to_bf16(num / den);
    }
}
