// Decoding one token per row (generation's steps after the prompt): a BitLinear for the few rows of a step
// (norm, int8 quantization and the product with packed ternary weights in one launch), a bf16 matrix-vector
// product for the head, and attention of each row's new token over its KV cache. References: the candle ops
// of model::bitnet (Quantized::now, Stacked::forward, Attention::forward), which each kernel's rounding
// follows (bf16 where those ops store bf16).
#include <float.h>

#include "common.cuh"

// Rows a product takes at a time (bessie-prompt decodes 1; continuous batching's small batches).
#define GEMV_ROWS 8

// out[r, n] = round(round(round(sum_k x[r, k] w[n, k]) * scale[n]) + residual[r, n]) for r < rows <= 8:
// x [rows, k] and w [n, k] bf16 (the hidden states and the head; or a BitLinear's quantized input and ternary
// weights where they are not packed), scale [n] (each output's weight scale) or null (1), residual [rows, n]
// or null. One warp per output n reads its weight row once for every row, 8 bf16 (16 bytes) a lane at a time:
// k is a multiple of 8 and the rows 16-byte aligned. Each row's sum is reduced over the warp and rounded as
// the reference's bf16 GEMM output is, then scaled and added as the candle ops round.
extern "C" __global__ void gemv(const bf16* x, const bf16* w, const bf16* scale, const bf16* residual, bf16* out,
                                int rows, int n, int k) {
    follow_previous();
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

// Packs ternary weights (bf16 values -1, 0, 1) 16 to a 32-bit word, 2 bits each as the value plus 1: element
// 16 i + 4 j + b at bits 8 b + 2 j of word i, so that (word >> 2 j) & 0x03030303 holds elements 16 i + 4 j ..
// 16 i + 4 j + 3 one to a byte, the order of four int8 inputs in a 32-bit word (bitlinear_step's dp4a).
extern "C" __global__ void pack_ternary(const bf16* w, unsigned* codes, size_t words) {
    follow_previous();
    GRID_STRIDE(i, words) {
        unsigned word = 0;
        for (int e = 0; e < 16; e++) word |= (unsigned)rintf(f32(w[16 * i + e]) + 1.f) << (8 * (e % 4) + 2 * (e / 4));
        codes[i] = word;
    }
}

// A decoding step's BitLinear (bitlinear_step): its input's norm, int8 quantization, the product with the
// packed ternary weights, the weight scales and the residual add, in one launch. Mirrors decode.rs's
// `StepParams`.
struct BitLinearStep {
    // The input before its norm, bf16 [rows, k]; with a gated activation (act >= 0) the gate/up rows [rows, 2k].
    const bf16* x;
    // The norm's weight [k], or null: no norm, the input only quantized.
    const bf16* norm;
    // The packed codes [n, k / 16] (pack_ternary), each output's weight scale [n], the residual [rows, n] or
    // null, the output [rows, n].
    const unsigned* codes;
    const bf16* scale;
    const bf16* residual;
    bf16* out;
    float eps;
    // ACT_SILU or ACT_RELU2 for down_proj's gated input, -1 for none.
    int act;
    int rows, n, k;
    // The outputs a block takes (consecutive: their codes are one span of memory), and how many of them a
    // stage of its codes in shared memory holds (all of them, or a half of its buffer when it takes two).
    int block_outputs, stage_outputs;
};

// Warps of bitlinear_step: one block an SM. Each block norms and quantizes the whole input row itself, and
// that norm is most of a launch: blocks sharing an SM repeated it, one block an SM does it once.
#define STEP_WARPS 32
static_assert(STEP_WARPS <= 32, "a warp's lanes add up the warps' sums of codes");
// A thread's 8-channel chunks of an input row, held in registers from the load to the quantization:
// k <= 8 x 32 x STEP_WARPS x STEP_CHUNKS = 16,384 (shapes.rs's STEP_K_MAX).
#define STEP_CHUNKS 2
// A thread's residuals loaded during the norm; a block's others (past 1,024) after it.
#define STEP_RES_REGS 1

// Copies `bytes` from global to shared memory without holding the thread (cp.async, sm_80 and later;
// before, plain loads): 16 bytes a thread at a time where both addresses and the size allow, else 4.
__device__ __forceinline__ void copy_async(void* dst, const void* src, int bytes) {
    const char* s = static_cast<const char*>(src);
    char* d = static_cast<char*>(dst);
    int step = ((uintptr_t)s % 16 == 0 && (uintptr_t)d % 16 == 0 && bytes % 16 == 0) ? 16 : 4;
    for (int i = step * threadIdx.x; i < bytes; i += step * blockDim.x) {
#if __CUDA_ARCH__ >= 800
        unsigned at = (unsigned)__cvta_generic_to_shared(d + i);
        if (step == 16) {
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(at), "l"(s + i) : "memory");
        } else {
            asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(at), "l"(s + i) : "memory");
        }
#else
        if (step == 16) {
            *reinterpret_cast<uint4*>(d + i) = *reinterpret_cast<const uint4*>(s + i);
        } else {
            *reinterpret_cast<unsigned*>(d + i) = *reinterpret_cast<const unsigned*>(s + i);
        }
#endif
    }
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
// Waits until this thread's copies but the last `pending` groups have landed (a __syncthreads makes the
// block's visible to all).
template <int PENDING> __device__ __forceinline__ void copies_landed() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
#endif
}

// out[r, o] = round(round(round(s_r sum_i q[r, i] t[o, i]) scale[o]) + residual[r, o]) for the input's rows
// r < rows <= 8, where q[r] (int8) and s_r are row r of the input normed and quantized per token exactly as
// rmsnorm_quant_forward does it (the same roundings; its sums in another order) and t the ternary weights.
// Block b takes the outputs b block_outputs, ... (the last block fewer), one block an SM. Launched to start
// before the previous kernel has finished (programmatic dependent launch), it copies its outputs' codes (or
// the first stage of them) into shared memory asynchronously, and loads its scales and the norm's weight,
// before it waits for its input: the product then reads no memory but shared, and the whole card's loads of
// the codes are in flight at once (one output's row at a time a warp, with L2's latency each, was most of
// the time). Then each block norms and quantizes the rows itself, a thread's chunks of a row held in
// registers from the load to the int8 codes (a separate norm launch cost more than the redundant work), and
// each warp takes its stage's outputs warp, warp + STEP_WARPS, ...: a lane multiplies the words lane,
// lane + 32, ... of the output's codes by the inputs, 4 weights by 4 inputs a dp4a: codes c = t + 1 give
// sum_i c_i q_i, from which sum_i q_i is taken. The sums are exact integers. With more than one stage, the
// next stage's copy is in flight while one is multiplied (two buffers).
// Dynamic shared memory, in shapes.rs's `StepLayout` order: the codes' buffers, rows k bytes of int8 inputs,
// the block's scales (f32), its residuals (f32, rows of block_outputs).
extern "C" __global__ void __launch_bounds__(32 * STEP_WARPS) bitlinear_step(const BitLinearStep p) {
    extern __shared__ __align__(16) unsigned char smem[];
    // Each row's sum of codes, by warp (added up by a warp's lanes in the epilogue: no block reduction), and
    // its scale.
    __shared__ int qsum[GEMV_ROWS][STEP_WARPS];
    __shared__ float qscale[GEMV_ROWS];
    int t = threadIdx.x, lane = t % 32, warp = t / 32, words = p.k / 16;
    int o0 = blockIdx.x * p.block_outputs, mine = min(p.block_outputs, p.n - o0);
    int per = p.stage_outputs, stages = (mine + per - 1) / per;
    int buffers = p.block_outputs > per ? 2 : 1;
    unsigned* codes_s = reinterpret_cast<unsigned*>(smem);
    // The int8 rows start on a 16-byte boundary (read 16 bytes at a time).
    signed char* q8 = reinterpret_cast<signed char*>(codes_s + (((size_t)buffers * per * words + 3) & ~(size_t)3));
    float* scale_s = reinterpret_cast<float*>(q8 + (size_t)p.rows * p.k);
    float* res_s = scale_s + p.block_outputs;
    // Stage s's codes into buffer s % buffers.
    auto copy_stage = [&](int s) {
        int first = s * per, count = min(mine, first + per) - first;
        copy_async(codes_s + (size_t)(s % buffers) * per * words, p.codes + (size_t)(o0 + first) * words,
                   count * words * 4);
    };
    // This thread's chunks of a row: channels 8 (t + c blockDim.x) .. + 8 for c < STEP_CHUNKS.
    auto chunk = [&](int c) { return 8 * (t + c * blockDim.x); };

    // Before the previous kernel has finished: what no kernel of the step writes (the codes, the scales, the
    // norm's weight); the codes of later stages asked into L2.
    let_next_start();
    copy_stage(0);
    for (int i = per * words + 32 * t; i < mine * words; i += 32 * blockDim.x)
        prefetch_l2(p.codes + (size_t)o0 * words + i);
    for (int i = t; i < mine; i += blockDim.x) scale_s[i] = f32(p.scale[o0 + i]);
    uint4 weight[STEP_CHUNKS];
#pragma unroll
    for (int c = 0; c < STEP_CHUNKS; c++)
        if (p.norm && chunk(c) < p.k) weight[c] = load8_raw(p.norm, chunk(c));
    wait_for_inputs();

    // The residuals, i = r mine + the output's place in the block: a thread's first ones asked for now, kept
    // in shared memory after the norm's loads.
    auto residual_at = [&](int i) {
        return p.residual ? f32(p.residual[(size_t)(i / mine) * p.n + o0 + i % mine]) : 0.f;
    };
    float res[STEP_RES_REGS];
#pragma unroll
    for (int j = 0; j < STEP_RES_REGS; j++) {
        int i = t + j * blockDim.x;
        res[j] = i < p.rows * mine ? residual_at(i) : 0.f;
    }

    // The rows normed and quantized, each thread's chunks loaded at once and kept in registers.
    float inv_k = 1.f / p.k;
    for (int r = 0; r < p.rows; r++) {
        const bf16* xr = p.x + (size_t)r * (p.act >= 0 ? 2 : 1) * p.k;
        uint4 a[STEP_CHUNKS], b[STEP_CHUNKS];
#pragma unroll
        for (int c = 0; c < STEP_CHUNKS; c++) {
            if (chunk(c) >= p.k) break;
            a[c] = *reinterpret_cast<const uint4*>(xr + chunk(c));
            if (p.act >= 0) b[c] = *reinterpret_cast<const uint4*>(xr + p.k + chunk(c));
        }
        float v[STEP_CHUNKS][8], ss = 0.f;
#pragma unroll
        for (int c = 0; c < STEP_CHUNKS; c++) {
            if (chunk(c) >= p.k) break;
            unpack8(a[c], v[c]);
            if (p.act >= 0) {
                float u[8];
                unpack8(b[c], u);
#pragma unroll
                for (int e = 0; e < 8; e++) v[c][e] = glu_h(p.act, v[c][e], u[e]);
            }
#pragma unroll
            for (int e = 0; e < 8; e++) ss += v[c][e] * v[c][e];
        }
        float rr = p.norm ? 1.f / sqrtf(block_reduce(ss, Sum()) * inv_k + p.eps) : 1.f;
        float amax = 0.f;
#pragma unroll
        for (int c = 0; c < STEP_CHUNKS; c++) {
            if (chunk(c) >= p.k) break;
            float w[8];
            // No norm weight: constant ones. Unpacking ones kept in registers spilled this register-bound loop.
            if (p.norm) {
                unpack8(weight[c], w);
            } else {
#pragma unroll
                for (int e = 0; e < 8; e++) w[e] = 1.f;
            }
#pragma unroll
            for (int e = 0; e < 8; e++) {
                v[c][e] = round_bf16(v[c][e] * rr * w[e]);
                amax = fmaxf(amax, fabsf(v[c][e]));
            }
        }
        float scale = int8_scale(block_reduce(amax, Max()));
        int sum = 0;
#pragma unroll
        for (int c = 0; c < STEP_CHUNKS; c++) {
            if (chunk(c) >= p.k) break;
            unsigned packed[2] = {0u, 0u};
#pragma unroll
            for (int e = 0; e < 8; e++) {
                float q = int8_code(v[c][e], scale);
                sum += (int)q;
                pack_code(packed, e, q);
            }
            *reinterpret_cast<uint2*>(q8 + (size_t)r * p.k + chunk(c)) = make_uint2(packed[0], packed[1]);
        }
        sum = __reduce_add_sync(0xffffffff, sum);
        if (lane == 0) qsum[r][warp] = sum;
        if (t == 0) qscale[r] = scale;
    }
#pragma unroll
    for (int j = 0; j < STEP_RES_REGS; j++) {
        int i = t + j * blockDim.x;
        if (i < p.rows * mine) res_s[i] = res[j];
    }
    for (int i = t + STEP_RES_REGS * blockDim.x; i < p.rows * mine; i += blockDim.x) res_s[i] = residual_at(i);

    const uint4* xq = reinterpret_cast<const uint4*>(q8);
    for (int s = 0; s < stages; s++) {
        if (s + 1 < stages) {
            copy_stage(s + 1);
            copies_landed<1>();
        } else {
            copies_landed<0>();
        }
        __syncthreads();
        const unsigned* cs = codes_s + (size_t)(s % buffers) * per * words;
        int count = min(mine, (s + 1) * per) - s * per;
        for (int j = warp; j < count; j += STEP_WARPS) {
            const unsigned* row = cs + (size_t)j * words;
            int acc[GEMV_ROWS] = {};
#pragma unroll 4
            for (int i = lane; i < words; i += 32) {
                unsigned c = row[i];
                int c0 = c & 0x03030303, c1 = (c >> 2) & 0x03030303;
                int c2 = (c >> 4) & 0x03030303, c3 = (c >> 6) & 0x03030303;
#pragma unroll
                for (int r = 0; r < GEMV_ROWS; r++) {
                    if (r >= p.rows) break;
                    uint4 xv = xq[(size_t)r * words + i];
                    acc[r] = __dp4a(c0, (int)xv.x, acc[r]);
                    acc[r] = __dp4a(c1, (int)xv.y, acc[r]);
                    acc[r] = __dp4a(c2, (int)xv.z, acc[r]);
                    acc[r] = __dp4a(c3, (int)xv.w, acc[r]);
                }
            }
            int o = s * per + j;
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) {
                if (r >= p.rows) break;
                int sum = __reduce_add_sync(0xffffffff, acc[r]);
                // The row's sum of codes: the warps' parts, one a lane.
                int q = __reduce_add_sync(0xffffffff, lane < STEP_WARPS ? qsum[r][lane] : 0);
                if (lane == 0) {
                    float y = round_bf16((float)(sum - q) * qscale[r]);
                    y = round_bf16(y * scale_s[o]) + res_s[r * mine + o];
                    p.out[(size_t)r * p.n + o0 + o] = to_bf16(y);
                }
            }
        }
        // The buffer is copied into again two stages on.
        if (s + 2 < stages) __syncthreads();
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

// Columns of a split, one per lane in the softmax and four threads each in the scores: 128 threads.
#define SPLIT 32
#define ATTN_THREADS 128
// The most query heads of one kv head a block serves (per_block, chosen by decode.rs; a larger group takes
// several blocks): K and V are read once for them all.
#define GROUP_MAX 8
// Splits whose values and stats a joining thread has in flight at once.
#define JOIN_BATCH 8

// Attention of each row's new token over its KV cache, split over the columns as flash-decoding does so that
// a long context spreads over the card: blockIdx.x = kv head (times the blocks its group of query heads
// takes, per_block heads each), blockIdx.y = row, blockIdx.z = split of SPLIT columns of first..col (enough splits for the cache's
// width; those past col return at once). Each block rotates the new token's q (of its query heads) and its kv
// head's k by RoPE; the block of the split that holds col writes the new k and v to the cache's column `col`
// (every block takes the new column from shared memory, not from the cache being written). Then
// softmax(q k^T / sqrt(d)) v over the split's columns that the row does not hide (a hidden query, a retired
// row's, attends to the hidden ones instead, as the reference mask has it): four threads a column compute
// its scores, a lane a column its softmax, and each thread one 16-byte chunk of V for a few columns its
// share of the output. With one split holding columns the block writes y; with several, each writes its
// unnormalized output, its max and its sum of exponentials to `partial` (rows heads splits (d + 2) f32) and the
// last block of a (row, kv head) to finish (counted in `done`, zero between steps: that block sets it back)
// joins them: y = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M). The blocks start before the projection that
// feeds them has finished (programmatic dependent launch) and load their split's cached keys and values then.
// qkv [rows, (heads + 2 kv_heads) d] is the stacked projection's output; the caches [rows, kv_heads, width, d];
// d <= 256 and a multiple of 8. The reference's scores are bf16, times 1 / sqrt(d) in bf16, and its
// probabilities bf16: the kernel keeps the first two roundings and takes the probabilities in f32.
extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    decode_attention(const bf16* qkv, bf16* k_cache, bf16* v_cache, const unsigned* meta, const float* inv_freq,
                     bf16* y, float* partial, unsigned* done, int heads, int kv_heads, int d, int width,
                     int per_block) {
    __shared__ __align__(16) float q[GROUP_MAX * 256];
    __shared__ __align__(16) bf16 kv_new[2 * 256];
    __shared__ float p[GROUP_MAX][SPLIT], stat_m[GROUP_MAX], stat_l[GROUP_MAX];
    // Each column group's share of the output: (ATTN_THREADS / (d / 8)) x GROUP_MAX x d <= 8192.
    __shared__ float red[8192];
    __shared__ bool last;
    int group = heads / kv_heads, blocks = (group + per_block - 1) / per_block;
    int kvh = blockIdx.x / blocks, h0 = kvh * group + (blockIdx.x % blocks) * per_block;
    int gb = min(per_block, kvh * group + group - h0);
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
    int half = d / 2, n = min(SPLIT, col + 1 - lo);

    // Before the previous kernel has finished (programmatic dependent launch): the split's cached keys and
    // values this thread reads, loaded into registers (the step's kernels write only the new column, and
    // every earlier one was written by an earlier step, which finished before this step began), and this
    // thread's rotation; then q, k and v once written. Scores: column j of the split takes threads
    // 4j..4j+3, each the 16-byte chunks part, part + 4, ... of its key. p v: thread (cg, ch) takes chunk ch
    // of the values of columns cg, cg + groups, ... (at most 8: d <= 256).
    let_next_start();
    int chunks = d / 8, j = t / 4, part = t % 4;
    int groups = ATTN_THREADS / chunks, cg = t / chunks, ch = t % chunks;
    uint4 kr[8], vr[8];
    auto cached = [&](int jj) { return jj < n && lo + jj != col; };
#pragma unroll
    for (int it = 0; it < 8; it++)
        if (cached(j) && part + 4 * it < chunks)
            kr[it] = *reinterpret_cast<const uint4*>(k_cache + head_base + (size_t)(lo + j) * d + 8 * (part + 4 * it));
#pragma unroll
    for (int it = 0; it < 8; it++)
        if (cg < groups && cached(cg + groups * it))
            vr[it] = *reinterpret_cast<const uint4*>(v_cache + head_base + (size_t)(lo + cg + groups * it) * d + 8 * ch);
    float c = 0.f, s = 0.f;
    if (t < half) {
        float angle = (float)m.position * inv_freq[t];
        c = round_bf16(cosf(angle)), s = round_bf16(sinf(angle));
    }
    wait_for_inputs();
    // d <= 256: a thread rotates at most one pair of each head (elements t and t + d / 2), all its loads in
    // flight at once.
    if (t < half) {
        int i = t;
        bf16 qa[GROUP_MAX], qb[GROUP_MAX];
#pragma unroll
        for (int g = 0; g < GROUP_MAX; g++) {
            if (g >= gb) break;
            qa[g] = row[(size_t)(h0 + g) * d + i], qb[g] = row[(size_t)(h0 + g) * d + i + half];
        }
        bf16 ka = kh[i], kb = kh[i + half], va = vh[i], vb = vh[i + half];
#pragma unroll
        for (int g = 0; g < GROUP_MAX; g++) {
            if (g >= gb) break;
            float a = f32(qa[g]), b = f32(qb[g]);
            rope_pair(a, b, c, s);
            q[g * d + i] = a, q[g * d + i + half] = b;
        }
        float a = f32(ka), b = f32(kb);
        rope_pair(a, b, c, s);
        kv_new[i] = to_bf16(a), kv_new[i + half] = to_bf16(b);
        kv_new[d + i] = va, kv_new[d + i + half] = vb;
        if (writes) {
            size_t at = head_base + (size_t)col * d;
            k_cache[at + i] = to_bf16(a), k_cache[at + i + half] = to_bf16(b);
            v_cache[at + i] = va, v_cache[at + i + half] = vb;
        }
    }
    __syncthreads();

    // Scores, the new column's key from shared memory.
    bool hidden_query = m.hides(col);
    float inv_sqrt_d = round_bf16(1.f / sqrtf((float)d));
    {
        int c = lo + j;
        float s[GROUP_MAX] = {};
        if (j < n) {
            if (c == col) {
#pragma unroll
                for (int it = 0; it < 8; it++)
                    if (part + 4 * it < chunks) kr[it] = *reinterpret_cast<const uint4*>(kv_new + 8 * (part + 4 * it));
            }
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

    // p v (the new column's values from shared memory); then the column groups' sums are added in shared
    // memory.
    if (cg < groups) {
        float acc[GROUP_MAX][8] = {};
#pragma unroll
        for (int it = 0; it < 8; it++) {
            int jj = cg + groups * it;
            if (jj < n && lo + jj == col) vr[it] = *reinterpret_cast<const uint4*>(kv_new + d + 8 * ch);
        }
#pragma unroll
        for (int it = 0; it < 8; it++) {
            int jj = cg + groups * it;
            if (jj >= n) break;
            float v[8];
            unpack8(vr[it], v);
#pragma unroll
            for (int g = 0; g < GROUP_MAX; g++) {
                if (g >= gb) break;
                float pj = p[g][jj];
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
    // The split's output: y itself, or its unnormalized sums to `partial`'s values [rows, heads, splits, d]
    // and its max and sum of exponentials to the stats that follow them [rows, heads, splits] (f32 pairs).
    size_t head_split = ((size_t)r * heads + h0) * splits;
    float2* stats = reinterpret_cast<float2*>(partial + (size_t)rows * heads * splits * d);
    for (int i = t; i < gb * d; i += ATTN_THREADS) {
        float total = 0.f;
        for (int w = 0; w < groups; w++) total += red[w * gb * d + i];
        int g = i / d, e = i % d;
        if (active == 1) {
            y[((size_t)r * heads + h0 + g) * d + e] = to_bf16(total / stat_l[g]);
        } else {
            partial[(head_split + (size_t)g * splits + split) * d + e] = total;
            if (e == 0) stats[head_split + (size_t)g * splits + split] = make_float2(stat_m[g], stat_l[g]);
        }
    }
    if (active == 1) return;

    // The last of the active splits' blocks to finish joins them (the others' writes are seen: each fenced
    // them before counting itself): y = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M), a running max and sums
    // over the splits as flash-decoding's combine. Each float4 of the group's outputs takes `lanes` adjacent
    // threads (as many as leave none idle), each thread the splits i, i + lanes, ... (its place i among them), whose values and stats it
    // loads JOIN_BATCH splits at a time, all in flight, then the lanes merge their sums by shuffles. For a short
    // context that is one round trip to L2 (three and more when the stats were read first, then the weights
    // made, then the values read: half the kernel).
    __threadfence();
    __syncthreads();
    if (t == 0) {
        unsigned* count = done + (size_t)r * gridDim.x + blockIdx.x;
        last = atomicAdd(count, 1u) == (unsigned)active - 1;
        if (last) *count = 0;
    }
    __syncthreads();
    if (!last) return;
    int elems = gb * d / 4, lanes = 1;
    while (2 * lanes * elems <= ATTN_THREADS && lanes < 32) lanes *= 2;
    int part_of = t % lanes, rounds = (elems * lanes + ATTN_THREADS - 1) / ATTN_THREADS;
    // Every thread takes part in every round (the shuffles name whole warps); those past the outputs load none.
    for (int round = 0; round < rounds; round++) {
        int u = t / lanes + round * (ATTN_THREADS / lanes), g = 4 * u / d, e = 4 * u % d;
        bool mine = u < elems;
        const float2* st = stats + head_split + (size_t)g * splits;
        const float* part = partial + (head_split + (size_t)g * splits) * d + e;
        float top = -INFINITY, den = 0.f;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int s0 = part_of; mine && s0 < active; s0 += JOIN_BATCH * lanes) {
            float2 ml[JOIN_BATCH];
            float4 v[JOIN_BATCH];
#pragma unroll
            for (int b = 0; b < JOIN_BATCH; b++) {
                int sp = s0 + b * lanes;
                if (sp < active) ml[b] = __ldcg(st + sp), v[b] = __ldcg(reinterpret_cast<const float4*>(part + (size_t)sp * d));
            }
#pragma unroll
            for (int b = 0; b < JOIN_BATCH; b++) {
                if (s0 + b * lanes >= active || ml[b].x == -INFINITY) continue;
                float now = fmaxf(top, ml[b].x), old = expf(top - now), w = expf(ml[b].x - now);
                den = den * old + ml[b].y * w;
                acc.x = acc.x * old + v[b].x * w, acc.y = acc.y * old + v[b].y * w;
                acc.z = acc.z * old + v[b].z * w, acc.w = acc.w * old + v[b].w * w;
                top = now;
            }
        }
        for (int off = lanes / 2; off > 0; off /= 2) {
            float top2 = __shfl_xor_sync(0xffffffff, top, off), den2 = __shfl_xor_sync(0xffffffff, den, off);
            float4 acc2 = make_float4(__shfl_xor_sync(0xffffffff, acc.x, off), __shfl_xor_sync(0xffffffff, acc.y, off),
                                      __shfl_xor_sync(0xffffffff, acc.z, off), __shfl_xor_sync(0xffffffff, acc.w, off));
            float now = fmaxf(top, top2);
            float wa = top == -INFINITY ? 0.f : expf(top - now), wb = top2 == -INFINITY ? 0.f : expf(top2 - now);
            den = den * wa + den2 * wb;
            acc.x = acc.x * wa + acc2.x * wb, acc.y = acc.y * wa + acc2.y * wb;
            acc.z = acc.z * wa + acc2.z * wb, acc.w = acc.w * wa + acc2.w * wb;
            top = now;
        }
        if (mine && part_of == 0) {
            float inv = den > 0.f ? 1.f / den : 0.f;
            bf16* out = y + ((size_t)r * heads + h0 + g) * d + e;
            out[0] = to_bf16(acc.x * inv), out[1] = to_bf16(acc.y * inv), out[2] = to_bf16(acc.z * inv);
            out[3] = to_bf16(acc.w * inv);
        }
    }
}
