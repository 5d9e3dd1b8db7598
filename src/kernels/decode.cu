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

// The rotate-half RoPE of element pair (a, b) = (i, i + d / 2) of a head by the angle's cos and sin rounded to
// bf16, as the reference's tables are, each product and sum rounded to bf16 as candle's bf16 rope kernel
// rounds them.
__device__ __forceinline__ void rope_pair(float& a, float& b, float c, float s) {
    float x1 = a, x2 = b;
    a = round_bf16(round_bf16(x1 * c) - round_bf16(x2 * s));
    b = round_bf16(round_bf16(x1 * s) + round_bf16(x2 * c));
}

// Eight bf16 of a 16-byte chunk held in registers, widened to f32.
__device__ __forceinline__ void unpack8(const uint4& u, float* out) { load8(reinterpret_cast<const bf16*>(&u), out); }

// Columns of a split, one per lane in the softmax and four threads each in the scores: 128 threads.
#define SPLIT 32
#define ATTN_THREADS 128
// Query heads of one kv head a block serves (a larger group takes several blocks): K and V are read once for
// them all.
#define GROUP_MAX 8

// Attention of each row's new token over its KV cache, split over the columns as flash-decoding does so that
// a long context spreads over the card: blockIdx.x = kv head (times the blocks its group of query heads
// takes), blockIdx.y = row, blockIdx.z = split of SPLIT columns of first..col (enough splits for the cache's
// width; those past col return at once). Each block rotates the new token's q (of its query heads) and its kv
// head's k by RoPE; the block of the split that holds col writes the new k and v to the cache's column `col`
// (every block takes the new column from shared memory, not from the cache being written). Then
// softmax(q k^T / sqrt(d)) v over the split's columns that the row does not hide (a hidden query, a retired
// row's, attends to the hidden ones instead, as the reference mask has it): four threads a column compute
// its scores, a lane a column its softmax, and each thread one 16-byte chunk of V for a few columns its
// share of the output. With one split holding columns the block writes y; with several, each writes its max,
// its sum of exponentials and its unnormalized output to `partial` [rows, heads, splits, d + 2] (f32) and the
// last block of a (row, kv head) to finish (counted in `done`, zero between steps: that block sets it back)
// joins them: y = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M). qkv [rows, (heads + 2 kv_heads) d] is the
// stacked projection's output; the caches [rows, kv_heads, width, d]; d <= 256 and a multiple of 8. The
// reference's scores are bf16, times 1 / sqrt(d) in bf16, and its probabilities bf16: the kernel keeps the
// first two roundings and takes the probabilities in f32.
extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    decode_attention(const bf16* qkv, bf16* k_cache, bf16* v_cache, const unsigned* meta, const float* inv_freq,
                     bf16* y, float* partial, unsigned* done, int heads, int kv_heads, int d, int width) {
    __shared__ __align__(16) float q[GROUP_MAX * 256];
    __shared__ __align__(16) bf16 kv_new[2 * 256];
    __shared__ float p[GROUP_MAX][SPLIT], stat_m[GROUP_MAX], stat_l[GROUP_MAX];
    // Each column group's share of the output: (ATTN_THREADS / (d / 8)) x GROUP_MAX x d <= 8192.
    __shared__ float red[8192];
    __shared__ bool last;
    int group = heads / kv_heads, blocks = (group + GROUP_MAX - 1) / GROUP_MAX;
    int kvh = blockIdx.x / blocks, h0 = kvh * group + (blockIdx.x % blocks) * GROUP_MAX;
    int gb = min(GROUP_MAX, kvh * group + group - h0);
    int rows = gridDim.y, r = blockIdx.y, split = blockIdx.z, splits = gridDim.z, t = threadIdx.x;
    int first = meta[4 * rows], col = meta[4 * rows + 1];
    int lo = first + split * SPLIT;
    if (lo > col) return;
    int active = (col - first) / SPLIT + 1;
    RowMeta m{meta[4 * r], meta[4 * r + 1], meta[4 * r + 2], meta[4 * r + 3]};
    const bf16* row = qkv + (size_t)r * (heads + 2 * kv_heads) * d;
    const bf16* kh = row + (size_t)(heads + kvh) * d;
    const bf16* vh = row + (size_t)(heads + kv_heads + kvh) * d;
    size_t head_base = ((size_t)r * kv_heads + kvh) * width * d;
    bool writes = h0 == kvh * group && (col - first) / SPLIT == split;
    int half = d / 2;
    for (int i = t; i < half; i += ATTN_THREADS) {
        float angle = (float)m.position * inv_freq[i];
        float c = round_bf16(cosf(angle)), s = round_bf16(sinf(angle));
        for (int g = 0; g < gb; g++) {
            const bf16* qh = row + (size_t)(h0 + g) * d;
            float a = f32(qh[i]), b = f32(qh[i + half]);
            rope_pair(a, b, c, s);
            q[g * d + i] = a, q[g * d + i + half] = b;
        }
        float a = f32(kh[i]), b = f32(kh[i + half]);
        rope_pair(a, b, c, s);
        kv_new[i] = to_bf16(a), kv_new[i + half] = to_bf16(b);
        kv_new[d + i] = vh[i], kv_new[d + i + half] = vh[i + half];
        if (writes) {
            size_t at = head_base + (size_t)col * d;
            k_cache[at + i] = to_bf16(a), k_cache[at + i + half] = to_bf16(b);
            v_cache[at + i] = vh[i], v_cache[at + i + half] = vh[i + half];
        }
    }
    __syncthreads();

    // Scores: column j of the split takes threads 4j..4j+3, each the 16-byte chunks part, part + 4, ... of its
    // key, all loaded before any is used.
    int n = min(SPLIT, col + 1 - lo), chunks = d / 8;
    bool hidden_query = m.hides(col);
    float inv_sqrt_d = round_bf16(1.f / sqrtf((float)d));
    {
        int j = t / 4, part = t % 4, c = lo + j;
        float s[GROUP_MAX] = {};
        if (j < n) {
            const bf16* kc = c == col ? kv_new : k_cache + head_base + (size_t)c * d;
            uint4 kr[8];
#pragma unroll
            for (int it = 0; it < 8; it++)
                if (part + 4 * it < chunks) kr[it] = *reinterpret_cast<const uint4*>(kc + 8 * (part + 4 * it));
#pragma unroll
            for (int it = 0; it < 8; it++) {
                int ch = part + 4 * it;
                if (ch >= chunks) break;
                float kv[8];
                unpack8(kr[it], kv);
#pragma unroll
                for (int g = 0; g < GROUP_MAX; g++) {
                    if (g >= gb) break;
                    const float* qg = q + g * d + 8 * ch;
#pragma unroll
                    for (int e = 0; e < 8; e++) s[g] += qg[e] * kv[e];
                }
            }
        }
#pragma unroll
        for (int g = 0; g < GROUP_MAX; g++) {
            s[g] += __shfl_xor_sync(0xffffffff, s[g], 1);
            s[g] += __shfl_xor_sync(0xffffffff, s[g], 2);
        }
        if (part == 0) {
            bool seen = j < n && m.hides(c) == hidden_query;
#pragma unroll
            for (int g = 0; g < GROUP_MAX; g++) {
                if (g >= gb) break;
                p[g][j] = seen ? round_bf16(round_bf16(s[g]) * inv_sqrt_d) : -INFINITY;
            }
        }
    }
    __syncthreads();

    // Softmax over the split: a warp a head, a lane a column.
    int lane = t % 32;
    for (int g = t / 32; g < gb; g += ATTN_THREADS / 32) {
        float v = p[g][lane], mx = v;
        for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, off));
        float e = mx == -INFINITY ? 0.f : expf(v - mx), l = e;
        for (int off = 16; off > 0; off /= 2) l += __shfl_xor_sync(0xffffffff, l, off);
        p[g][lane] = e;
        if (lane == 0) stat_m[g] = mx, stat_l[g] = l;
    }
    __syncthreads();

    // p v: thread (cg, ch) takes chunk ch of the values of columns cg, cg + groups, ... (at most 8: d <= 256),
    // loaded before any is used; then the column groups' sums are added in shared memory.
    int groups = ATTN_THREADS / chunks, cg = t / chunks, ch = t % chunks;
    if (cg < groups) {
        float acc[GROUP_MAX][8] = {};
        uint4 vr[8];
#pragma unroll
        for (int it = 0; it < 8; it++) {
            int j = cg + groups * it, c = lo + j;
            if (j < n) {
                const bf16* vc = c == col ? kv_new + d : v_cache + head_base + (size_t)c * d;
                vr[it] = *reinterpret_cast<const uint4*>(vc + 8 * ch);
            }
        }
#pragma unroll
        for (int it = 0; it < 8; it++) {
            int j = cg + groups * it;
            if (j >= n) break;
            float v[8];
            unpack8(vr[it], v);
#pragma unroll
            for (int g = 0; g < GROUP_MAX; g++) {
                if (g >= gb) break;
                float pj = p[g][j];
#pragma unroll
                for (int e = 0; e < 8; e++) acc[g][e] += pj * v[e];
            }
        }
#pragma unroll
        for (int g = 0; g < GROUP_MAX; g++) {
            if (g >= gb) break;
#pragma unroll
            for (int e = 0; e < 8; e++) red[(cg * gb + g) * d + 8 * ch + e] = acc[g][e];
        }
    }
    __syncthreads();
    for (int i = t; i < gb * d; i += ATTN_THREADS) {
        float total = 0.f;
        for (int w = 0; w < groups; w++) total += red[w * gb * d + i];
        int g = i / d, e = i % d;
        size_t h = h0 + g;
        if (active == 1) {
            y[((size_t)r * heads + h) * d + e] = to_bf16(total / stat_l[g]);
        } else {
            float* part = partial + (((size_t)r * heads + h) * splits + split) * (d + 2);
            part[e] = total;
            if (e == 0) part[d] = stat_m[g], part[d + 1] = stat_l[g];
        }
    }
    if (active == 1) return;

    // The last of the active splits' blocks to finish joins them (the others' writes are seen: each fenced
    // them before counting itself).
    __threadfence();
    __syncthreads();
    if (t == 0) {
        unsigned* count = done + (size_t)r * gridDim.x + blockIdx.x;
        last = atomicAdd(count, 1u) == (unsigned)active - 1;
        if (last) *count = 0;
    }
    __syncthreads();
    if (!last) return;
    for (int i = t; i < gb * d; i += ATTN_THREADS) {
        int g = i / d, e = i % d;
        const float* part = partial + ((size_t)r * heads + h0 + g) * splits * (d + 2);
        float top = -INFINITY;
        for (int s = 0; s < active; s++) top = fmaxf(top, __ldcg(part + (size_t)s * (d + 2) + d));
        float num = 0.f, den = 0.f;
        for (int s = 0; s < active; s++) {
            const float* ps = part + (size_t)s * (d + 2);
            float ms = __ldcg(ps + d);
            if (ms == -INFINITY) continue;
            float w = expf(ms - top);
            num += __ldcg(ps + e) * w;
            den += __ldcg(ps + d + 1) * w;
        }
        y[((size_t)r * heads + h0 + g) * d + e] = to_bf16(num / den);
    }
}
