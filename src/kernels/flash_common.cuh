// What the flash attention kernels share (flash_attention.cu's, and flash_hopper.cu's two for Hopper): the
// softmax's pieces, the masks of causal windows, fragment packing, cp.async's groups and the gradients' stores.
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

// cp.async of N bytes (16: through L2 alone; 4: through L1) to shared address `dst`, the first `bytes` of them
// (N or 0) from `src`, the rest zeros.
template <int N> __device__ __forceinline__ void copy_async(unsigned dst, const void* src, int bytes) {
    if constexpr (N == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n"); }
// Waits until at most N committed groups are in flight; a barrier then makes the data visible to all.
template <int N> __device__ __forceinline__ void wait_loads() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// cp.async's double buffering: starts the next step's loads where there is a next step (`load_next` commits
// its group) and waits for this step's, which were committed before them.
template <class Next> __device__ __forceinline__ void load_next_wait(bool more, Next load_next) {
    if (more) {
        load_next();
        wait_loads<1>();
    } else {
        wait_loads<0>();
    }
}

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

// Every flash kernel's grid is (heads, tiles, sections): the head is blockIdx.z * gridDim.x + blockIdx.x (of
// batch * heads, or of batch * kv_heads), blockIdx.y the block's rank by its work, 0 the most. The card starts
// blocks in the order of their linear index, so every head of a section starts its longest block before any of
// them its next: under the causal mask a block meets from one to all of the other side's tiles, and with the grid
// the other way round (each head's blocks longest first, the heads in turn) the last heads' longest blocks ran on
// alone at the end. The forward ran 10-12% faster so, 2B4T's and Falcon3-1B's backward 15-18%; sections of
// heads (flash_attention.rs's `backward_section`) took -large's backward 6-8% further (BENCHMARKS.md). The rows
// of a head that a block takes start at:
__device__ __forceinline__ int grid_head() { return blockIdx.z * gridDim.x + blockIdx.x; }
// the queries: the last see the most keys;
__device__ __forceinline__ int first_query(int rows) { return (gridDim.y - 1 - blockIdx.y) * rows; }
// the keys: the first are seen by the most queries.
__device__ __forceinline__ int first_key(int rows) { return blockIdx.y * rows; }

// The offset of key/value head of query head `qh` (grid_head() = batch * heads + query head) in K and V
// [batch * heads / group, t, D].
template <int D> __device__ __forceinline__ size_t kv_head(int qh, int t, int heads, int group) {
    int b = qh / heads;
    return ((size_t)b * (heads / group) + qh % heads / group) * t * D;
}

// A forward block's queries q0 .. q0 + bq as this thread holds them: its two rows (the mma C layout's for its
// warp) and their window starts, the range of keys the block sees, from the first tile of `bk` keys that holds
// its first window start to its last query, and the last row's window start (with all_seen: which tiles need
// the mask).
struct QueryRows {
    int rows[2], lo[2], k_first, k_end, lo_last;
    __device__ __forceinline__ QueryRows(const float* start, int q0, int bq, int bk, int warp, int g, int t)
        : rows{q0 + warp * 16 + g, q0 + warp * 16 + g + 8} {
#pragma unroll
        for (int h = 0; h < 2; h++) lo[h] = rows[h] < t ? (int)start[rows[h]] : NO_KEYS;
        k_end = min(q0 + bq, t), lo_last = (int)start[k_end - 1];
        k_first = (int)start[q0] / bk * bk;
    }
};

// The forward's online softmax over a tile of BK keys from k0 for this thread's two queries (rows[h], window
// starts lo[h]; every key seen where !masked): s, the tile's scores in the mma C layout (s[n][2 h + e] at key
// k0 + 8 n + 2 c + e, c = lane % 4), becomes the probabilities against the new running maximum m[h] (base 2,
// scale2 applied), after the sums acc (D / 8 fragments of the same rows) and the running total l[h] are
// rescaled to it. A row's four threads (c) hold its columns; the maximum is reduced across them, l at the end.
template <int BK, int D>
__device__ __forceinline__ void online_softmax(float (&s)[BK / 8][4], float (&acc)[D / 8][4], float (&m)[2],
                                               float (&l)[2], const int (&rows)[2], const int (&lo)[2], int k0,
                                               int c, bool masked, float scale2) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < BK / 8; n++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                float& x = s[n][2 * h + e];
                x = masked && !sees(rows[h], lo[h], k0 + n * 8 + 2 * c + e) ? -INFINITY : x * scale2;
                mx = fmaxf(mx, x);
            }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
        float m_new = fmaxf(m[h], mx);
        float base = m_new == -INFINITY ? 0.f : m_new;  // no key seen yet: keep everything at 0, not NaN
        float alpha = exp2_ftz(m[h] - base);
        m[h] = m_new;
        l[h] *= alpha;
#pragma unroll
        for (int n = 0; n < D / 8; n++) acc[n][2 * h] *= alpha, acc[n][2 * h + 1] *= alpha;
#pragma unroll
        for (int n = 0; n < BK / 8; n++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                float& x = s[n][2 * h + e];
                x = exp2_ftz(x - base);
                l[h] += x;
            }
    }
}

// The forward's end for this thread's two queries: the total l[h] summed over the row's four threads, the sums
// acc divided by it into row rows[h] (below t) of `o` (a head's [t, D], bf16) and the row's log-sum-exp
// (natural log) into lse[rows[h]].
template <int D>
__device__ __forceinline__ void store_output(const float (&acc)[D / 8][4], const float (&m)[2], float (&l)[2],
                                             const int (&rows)[2], int c, bf16* o, float* lse, int t) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(0xffffffff, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffff, l[h], 2);
        if (rows[h] >= t) continue;
        float inv = 1.f / l[h];
        bf16* out = o + (size_t)rows[h] * D + 2 * c;
#pragma unroll
        for (int n = 0; n < D / 8; n++)
            *reinterpret_cast<uint32_t*>(out + n * 8) = pack(acc[n][2 * h] * inv, acc[n][2 * h + 1] * inv);
        if (c == 0) lse[rows[h]] = (m[h] + log2f(l[h])) * LN2;
    }
}

// Softmax gradient of one score in two steps: the probability p from the score s (unscaled), then dS from p
// and dp. The kernels scale their dQ and dK sums by 1 / sqrt(D) once, when they store them (store_grads'
// `scale`), not each score (an instruction a score in the dK/dV kernel's loop). A query that sees one key
// (each example's first token) has dS = 0 exactly, as the plain backward gives. The backward kernels call them
// for a whole tile with `masked` a compile-time constant: a tile whose queries all see all its keys (so none
// sees only one) skips the tests per score, which made the integer pipe the busiest of the dK/dV kernel.
template <bool B> struct Flag {  // a compile-time bool as an argument's type
    static constexpr bool value = B;
};
__device__ __forceinline__ float prob(float s, bool seen, float lse2, float scale2) {
    return seen ? exp2_ftz(s * scale2 - lse2) : 0.f;
}
__device__ __forceinline__ float score_grad(float p, float dp, bool seen, bool alone, float delta) {
    return seen && !alone ? p * (dp - delta) : 0.f;
}
// The factor of the dQ and dK sums: 1 / sqrt(D) from the kernels' scale2 = log2(e) / sqrt(D).
__device__ __forceinline__ float grad_scale(float scale2) { return scale2 * LN2; }


// The probabilities and score gradients of a tile whose rows are this thread's two queries (rows[h], window
// starts lo[h], log-sum-exp lse2[h] in base 2, delta dl[h]) and whose columns are the keys k0 + 8 n + 2 c +
// e % 2 (c = lane % 4) of s[n][e] (the mma C layout): s becomes P, dp becomes dS. The dQ kernels'.
// P computes the probabilities, DS the score gradients (from s, already P where P is false): a pair of
// warpgroups at head dim 256 (flash_hopper.cu) takes one role each.
template <int N, bool MASKED, bool P = true, bool DS = true>
__device__ __forceinline__ void query_grads(float (*s)[4], float (*dp)[4], const int* rows, const int* lo,
                                            const float* lse2, const float* dl, int k0, int c, float scale2) {
#pragma unroll
    for (int n = 0; n < N / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int h = e / 2;
            bool seen = !MASKED || sees(rows[h], lo[h], k0 + n * 8 + 2 * c + e % 2);
            if (P) s[n][e] = prob(s[n][e], seen, lse2[h], scale2);
            if (DS) dp[n][e] = score_grad(s[n][e], dp[n][e], seen, MASKED && lo[h] == rows[h], dl[h]);
        }
}

// The same for a tile whose rows are this thread's two keys (keys[h]) and whose columns are the queries q0 +
// col, each column's values in shared memory as load_row_values puts them (lse, delta dl, window start lo_of;
// a column at or past t sees nothing). The dK/dV kernels': P computes the probabilities, DS the score
// gradients (a warp may take one role, flash_attention.cu's SPLIT), and hand(i, p) runs between the two for
// entry i = 4 n + e (where the roles' warps hand p over).
template <int N, bool MASKED, bool P = true, bool DS = true, class Hand>
__device__ __forceinline__ void key_grads(float (*s)[4], float (*dp)[4], const int* keys, int q0, int c, int t,
                                          const float* lse, const float* dl, const float* lo_of, float scale2,
                                          Hand hand) {
#pragma unroll
    for (int n = 0; n < N / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int col = n * 8 + 2 * c + e % 2, qi = q0 + col, lo = MASKED ? (int)lo_of[col] : 0;
            bool seen = !MASKED || (qi < t && sees(qi, lo, keys[e / 2]));
            float& p = s[n][e];
            if (P) p = prob(p, seen, lse[col] * LOG2E, scale2);
            hand(4 * n + e, p);
            if (DS) dp[n][e] = score_grad(p, dp[n][e], seen, MASKED && lo == qi, dl[col]);
        }
}

// Where the backward kernels write dQ, dK and dV (flash_attention.rs's `GradRows`): row i of query head h of
// batch b at dq + b q_batch + h head + i row, and dK and dV's likewise over the key/value heads, kv_batch apart.
// Attention's own layout ([b, heads, t, D] and [b, kv_heads, t, D]), or the rows of the q/k/v projection
// ([b t, (heads + 2 kv_heads) D], the three from their first columns), which its backward GEMMs read: there
// dQ and dK turn back by RoPE's angles, `cos` and `sin` [b, t, D/2] (bf16; null where the layout is the
// heads'), and no separate pass moves and turns them.
struct GradRows {
    bf16 *dq, *dk, *dv;
    long long q_batch, kv_batch, head, row;
    const bf16 *cos, *sin;
    // Row 0 of head `y` (of [batch * heads]) of the gradient at `at`, whose batches are `batch` apart.
    __device__ bf16* rows_of(bf16* at, int y, int heads, long long batch) const {
        return at + y / heads * batch + y % heads * head;
    }
    // Row 0 of query head `qh` (of [batch * heads]) or of key/value head `kvh` (of [batch * kv_heads]).
    __device__ bf16* q_rows(int qh, int heads) const { return rows_of(dq, qh, heads, q_batch); }
    __device__ bf16* k_rows(int kvh, int kv_heads) const { return rows_of(dk, kvh, kv_heads, kv_batch); }
    __device__ bf16* v_rows(int kvh, int kv_heads) const { return rows_of(dv, kvh, kv_heads, kv_batch); }
    // Batch b's angles (null where there are none), for heads of d channels.
    __device__ const bf16* cos_of(int b, int t, int d) const { return cos ? cos + (size_t)b * t * (d / 2) : nullptr; }
    __device__ const bf16* sin_of(int b, int t, int d) const { return sin ? sin + (size_t)b * t * (d / 2) : nullptr; }
};

// This thread's rows rows[h] (below t) of a sum of 16 rows x W of D's columns in the mma C layout (acc[n][2 h +
// e], c = lane % 4) as bf16 to `out` (row 0; rows `row` apart): the first W/2 columns from col0 on and as many
// from D/2 + col0 (all of D where W = D: column 8 n + 2 c + e), turned back by RoPE where `cos` is given (the
// angles of the rows' sequence, [t, D/2]): channel j with j + D/2, which this thread holds in acc[n] and
// acc[n + W/16]; times `scale` (grad_scale's for dQ and dK, 1 for dV); rounded once, after the turn.
// Reference: train::layers::qkv_heads_backward.
template <int D, int W = D>
__device__ __forceinline__ void store_grads(bf16* out, long long row, const float (&acc)[W / 8][4],
                                            const int (&rows)[2], int t, float scale, const bf16* cos = nullptr,
                                            const bf16* sin = nullptr, int col0 = 0) {
    int c = threadIdx.x % 4;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        if (rows[h] >= t) continue;
        float y[W / 8][2];
#pragma unroll
        for (int n = 0; n < W / 8; n++) y[n][0] = acc[n][2 * h] * scale, y[n][1] = acc[n][2 * h + 1] * scale;
        if (cos) {
#pragma unroll
            for (int n = 0; n < W / 16; n++) {
                size_t j = (size_t)rows[h] * (D / 2) + col0 + 8 * n + 2 * c;
                float2 cs = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(cos + j));
                float2 sn = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(sin + j));
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float x1 = y[n][e], x2 = y[n + W / 16][e], ce = e ? cs.y : cs.x, se = e ? sn.y : sn.x;
                    y[n][e] = x1 * ce + x2 * se;
                    y[n + W / 16][e] = x2 * ce - x1 * se;
                }
            }
        }
        bf16* at = out + rows[h] * row + col0 + 2 * c;
#pragma unroll
        for (int n = 0; n < W / 8; n++)
            *reinterpret_cast<uint32_t*>(at + (n < W / 16 ? 0 : D / 2 - W / 2) + n * 8) = pack(y[n][0], y[n][1]);
    }
}

// How many query tiles of `bq` rows see keys k0 .. k0 + bk of a sequence whose window starts are `start`:
// from k0 on, those whose first row's window starts before k0 + bk. Every thread of the block (NT) calls it.
template <int NT> __device__ int query_tiles_seeing(int k0, int bk, int bq, int t, const float* start) {
    int n_tiles = 0;
    for (int base = 0;; base += NT) {
        int i = k0 + (base + threadIdx.x) * bq;
        int n = __syncthreads_count(i < t && (int)start[i] < k0 + bk);
        n_tiles += n;
        if (n < NT) break;
    }
    return n_tiles;
}

// Each of the query rows q0 .. q0 + bq's lse (natural log), delta and window start into shared memory, copied
// by the block's first bq threads with cp.async in the caller's group: a plain load there held every warp of
// the dK/dV kernels for a round trip to L2 before each tile's products (three, one after another: a third of
// the Hopper kernel's stall samples, Nsight Compute). Rows past t get zeros; key_grads masks them.
__device__ __forceinline__ void load_row_values(float* lse, float* delta, float* lo, const float* glse,
                                                const float* gdelta, const float* start, int q0, int bq, int t) {
    int i = q0 + threadIdx.x;
    if (threadIdx.x < bq) {
        int n = i < t ? 4 : 0, at = i < t ? i : 0;
        const float* src[3] = {glse + at, gdelta + at, start + at};
        float* dst[3] = {lse + threadIdx.x, delta + threadIdx.x, lo + threadIdx.x};
#pragma unroll
        for (int j = 0; j < 3; j++) copy_async<4>((unsigned)__cvta_generic_to_shared(dst[j]), src[j], n);
    }
}
