// Flash attention's backward on Hopper's warpgroup products (wgmma), for heads of 64, 96 and 128 dims: the
// same work as flash_attention.cu's backward_kv and backward_q (which other cards and head_dim 256 run), whose
// products are per-warp mma.syncs that each read their B operand from shared memory through ldmatrix: each of
// a block's four warps reads the whole tile of the other side for every product. A wgmma reads its shared
// operands once for the warpgroup's 64 rows. Against the portable kernels (H100, BENCHMARKS.md): 1.7x at head
// dim 128, whose portable dK/dV kernel takes 16-query tiles to fit its registers, and 1.08-1.13x at 96. What
// bounds both now is each warpgroup's serial chain (products, softmax, products) with two blocks an SM: two
// warpgroups a block sharing each tile measured no faster.
//
// A block is one warpgroup and takes 64 rows of its side: keys (dK/dV) or queries (dQ). Over the tiles of 64
// rows of the other side that it meets, two products over D with both operands in shared memory give the
// scores and their gradients' inputs in registers (the dK/dV kernel: S^T = K Q^T and dP^T = V dO^T, keys as
// rows; dQ: S = Q K^T and dP = dO V^T), then the probabilities and score gradients as the portable kernels
// take them (flash_common.cuh), then sums over the other side's rows with the left operand from registers
// and the right read transposed (MN-major) from the same tiles (dV += P^T dO and dK += dS^T Q; dQ += dS K).
// Tiles sit in shared memory under the 128-byte swizzle, in panels of 64 columns (128 bytes a row; at D = 96
// the second panel's rows are half used), loaded by cp.async; the next tile's loads run during this one's
// products. Sums are in f32 in a fixed order (the same inputs give the same bits), not the portable kernels'
// order, so the two differ in rounding. Reference: train::layers::flash_attention_backward_reference.
#include "flash_common.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#include "hopper.cuh"

// Both kernels' shape and dynamic shared memory (flash_attention.rs's `hopper_shared` sizes the launch by the
// same formula): two resident tiles (K and V, or Q and dO), then STAGES stages of two tiles of the other side,
// each PANELS panels of 64 rows x 128 bytes, then each stage's per-row values (3 x 64), after 1024 bytes of
// room to align the tiles.
template <int D, int STAGES = 2> struct HopperTiles {
    static constexpr int ROWS = 64, PANELS = (D + 63) / 64, THREADS = 128;
    static constexpr int TILE = PANELS * ROWS * 128, TILES = (2 + 2 * STAGES) * TILE;
    unsigned char* base;
    // The block's dynamic shared memory, aligned for the swizzle.
    __device__ static HopperTiles here() {
        extern __shared__ unsigned char hopper_smem_raw[];
        return {reinterpret_cast<unsigned char*>(((uintptr_t)hopper_smem_raw + 1023) & ~(uintptr_t)1023)};
    }
    __device__ unsigned char* resident(int i) const { return base + i * TILE; }
    __device__ unsigned char* staged(int stage, int i) const { return base + (2 + 2 * stage + i) * TILE; }
    __device__ float* values() const { return reinterpret_cast<float*>(base + TILES); }
};

// Rows row0 .. row0 + 64 of a [t, D] head (zeros past t) into a swizzled tile: 16-byte chunk c of row r to
// panel c / 8, at r * 128 + (c % 8 ^ r % 8) * 16.
template <int D> __device__ void load_swizzled(unsigned char* tile, const bf16* g, int row0, int t) {
    using H = HopperTiles<D>;
    for (int ch = threadIdx.x; ch < H::ROWS * D / 8; ch += H::THREADS) {
        int r = ch / (D / 8), c = ch % (D / 8);
        bool in = row0 + r < t;
        unsigned dst = shared_addr(tile + c / 8 * H::ROWS * 128 + r * 128 + ((c % 8 ^ r % 8) << 4));
        const bf16* src = g + (size_t)(in ? row0 + r : 0) * D + c * 8;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(in ? 16 : 0));
    }
}

// x = A1 B1^T and y = A2 B2^T (64 x 64, f32, the accumulator layout) for swizzled tiles A and B of 64 rows
// x D: k runs along D, 16 at a time (32 bytes within a panel's rows). Issued, committed and waited for.
template <int D>
__device__ __forceinline__ void scores(float (&x)[8][4], float (&y)[8][4], unsigned a1, unsigned b1, unsigned a2,
                                       unsigned b2) {
    constexpr int PANEL = HopperTiles<D>::ROWS * 128;
    auto& xf = reinterpret_cast<float(&)[32]>(x);
    auto& yf = reinterpret_cast<float(&)[32]>(y);
#pragma unroll
    for (int i = 0; i < 32; i++) xf[i] = 0.f, yf[i] = 0.f;
    keep_in_place(xf);
    keep_in_place(yf);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        unsigned at = kk / 4 * PANEL + kk % 4 * 32;
        wgmma_bf16(xf, sw128_descriptor(a1 + at, 16, 1024), sw128_descriptor(b1 + at, 16, 1024));
        wgmma_bf16(yf, sw128_descriptor(a2 + at, 16, 1024), sw128_descriptor(b2 + at, 16, 1024));
    }
    wgmma_commit();
    wgmma_wait<0>();
    keep_in_place(xf);
    keep_in_place(yf);
}

// acc[i] += X[i] B[i] for i < N (64 x D sums) for X[i] 64 x 64 in registers (scores' layout, made A
// fragments) and B[i] swizzled tiles of 64 rows x D read MN-major: k runs along their rows, 16 (2048 bytes of
// a panel) at a time; n along D, a panel (64 columns, or the 32 left at D = 96) a product.
template <int D, int N>
__device__ __forceinline__ void sums(float (*const (&acc)[N])[4], const float (*const (&x)[N])[4],
                                     const unsigned (&b)[N]) {
    constexpr int PANEL = HopperTiles<D>::ROWS * 128, P = HopperTiles<D>::PANELS;
    uint32_t a[N][4][4];
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int kk = 0; kk < 4; kk++) as_a(a[i][kk], x[i][2 * kk], x[i][2 * kk + 1]);
#pragma unroll
    for (int i = 0; i < N; i++) keep_in_place(reinterpret_cast<float(&)[D / 2]>(*acc[i]));
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
#pragma unroll
        for (int p = 0; p < P; p++)
#pragma unroll
            for (int i = 0; i < N; i++) {
                auto desc = sw128_descriptor(b[i] + p * PANEL + kk * 2048, PANEL, 1024);
                if (D - 64 * p >= 64)
                    wgmma_bf16_t(reinterpret_cast<float(&)[32]>(acc[i][8 * p]), a[i][kk], desc);
                else
                    wgmma_bf16_t(reinterpret_cast<float(&)[16]>(acc[i][8 * p]), a[i][kk], desc);
            }
    wgmma_commit();
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < N; i++) {
        keep_in_place(reinterpret_cast<float(&)[D / 2]>(*acc[i]));
        // The A fragments stay in their registers until the products have read them.
        keep_in_place(reinterpret_cast<uint32_t(&)[16]>(a[i]));
    }
}

// dK and dV for 64 keys of one key/value head (blockIdx.y = batch * kv_heads + kv head), over each query
// tile of each query head of the group that sees them, the sums over the group in registers.
template <int D>
__device__ void backward_kv_hopper(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
                                   const float* delta, const float* start, GradRows dst, int t, int heads,
                                   int group, float scale2) {
    using H = HopperTiles<D>;
    constexpr int BK = H::ROWS, BQ = H::ROWS;
    H sm = H::here();  // K, V; each stage's Q, dO; then per stage lse2[BQ], delta[BQ], lo[BQ]
    unsigned char *ks = sm.resident(0), *vs = sm.resident(1);
    float* small = sm.values();
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    int k0 = blockIdx.x * BK;  // the keys seen by the most queries first
    int kv_heads = heads / group, bi = blockIdx.y / kv_heads;
    size_t head = (size_t)blockIdx.y * t * D;
    int qh0 = bi * heads + blockIdx.y % kv_heads * group;  // the group's first query head, of [batch * heads]
    start += (size_t)bi * t;
    int keys[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
    load_swizzled<D>(ks, k + head, k0, t);  // while the window starts are read
    load_swizzled<D>(vs, v + head, k0, t);
    commit();
    // The query tiles that see these keys: from k0 on, those whose first row's window starts in them.
    int n_tiles = query_tiles_seeing<H::THREADS>(k0, BK, BQ, t, start);
    // Step `it` takes query head qh0 + it / n_tiles and its query tile it % n_tiles, into stage it % 2.
    auto load_tile = [&](int it) {
        size_t qh = qh0 + it / n_tiles;
        int q0 = k0 + it % n_tiles * BQ, stage = it % 2;
        load_swizzled<D>(sm.staged(stage, 0), q + qh * t * D, q0, t);
        load_swizzled<D>(sm.staged(stage, 1), dout + qh * t * D, q0, t);
        commit();
        float* row = small + stage * 3 * BQ;
        load_row_values(row, row + BQ, reinterpret_cast<int*>(row + 2 * BQ), lse + qh * t, delta + qh * t, start, q0,
                        BQ, t);
    };
    if (n_tiles > 0) load_tile(0);

    float dv_acc[D / 8][4] = {}, dk_acc[D / 8][4] = {};
    if (n_tiles == 0) wait_loads<0>();  // no copy outlives the block
    for (int it = 0; it < group * n_tiles; it++) {
        int q0 = k0 + it % n_tiles * BQ, stage = it % 2;
        load_next_wait(it + 1 < group * n_tiles, [&] { load_tile(it + 1); });
        fence_to_wgmma();
        __syncthreads();
        const float* lse2 = small + stage * 3 * BQ;
        const float* dl = lse2 + BQ;
        const int* lo_of = reinterpret_cast<const int*>(lse2 + 2 * BQ);
        unsigned qs = shared_addr(sm.staged(stage, 0)), dos = shared_addr(sm.staged(stage, 1));
        float s[BQ / 8][4], dp[BQ / 8][4];
        scores<D>(s, dp, shared_addr(ks), qs, shared_addr(vs), dos);  // S^T = K Q^T, dP^T = V dO^T
        auto grads = [&](auto tag) {
            key_grads<BQ, decltype(tag)::value>(s, dp, keys, q0, c, lse2, dl, lo_of, scale2, [](int, float&) {});
        };
        if (all_seen(q0, BQ, lo_of[BQ - 1], k0, BK, t)) grads(Flag<false>{}); else grads(Flag<true>{});
        sums<D, 2>({dv_acc, dk_acc}, {s, dp}, {dos, qs});  // dV += P^T dO, dK += dS^T Q
        __syncthreads();  // every product has read this stage before the tile after next overwrites it
    }
    store_grads<D>(dst.k_rows(blockIdx.y, kv_heads), dst.row, dk_acc, keys, t, dst.cos_of(bi, t, D),
                   dst.sin_of(bi, t, D));
    store_grads<D>(dst.v_rows(blockIdx.y, kv_heads), dst.row, dv_acc, keys, t);
}

// The dQ kernel's stages of K and V tiles (flash_attention.rs's `Q_STAGES`): one from head dim 96, where it
// leaves room for three blocks an SM (its registers allow three), whose loads and products interleave instead.
template <int D> __device__ constexpr int q_stages() { return D >= 96 ? 1 : 2; }

// dQ for 64 queries (blockIdx.y = batch * heads + query head), over the key tiles they see. First each row's
// delta = sum over d of dO O (dS = P (dP - delta)), written for the dK/dV kernel, which runs after this one.
template <int D>
__device__ void backward_q_hopper(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const bf16* o,
                                  const float* lse, float* delta, const float* start, GradRows dst, int t,
                                  int heads, int group, float scale2) {
    constexpr int STAGES = q_stages<D>();
    using H = HopperTiles<D, STAGES>;
    constexpr int BK = H::ROWS, BQ = H::ROWS;
    H sm = H::here();  // Q, dO; each stage's K, V; then each row's delta
    unsigned char *qs = sm.resident(0), *dos = sm.resident(1);
    float* dl_rows = sm.values();
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;  // the longest rows first
    size_t head = (size_t)blockIdx.y * t * D, rows0 = (size_t)blockIdx.y * t;
    size_t kv = kv_head<D>(blockIdx.y, t, heads, group);
    start += (size_t)(blockIdx.y / heads) * t;
    load_swizzled<D>(qs, q + head, q0, t);
    load_swizzled<D>(dos, dout + head, q0, t);
    int k_end = min(q0 + BQ, t), lo_last = (int)start[k_end - 1];
    int k_first = (int)start[q0] / BK * BK;
    auto load = [&](int i, int k0) {
        load_swizzled<D>(sm.staged(i % STAGES, 0), k + kv, k0, t);
        load_swizzled<D>(sm.staged(i % STAGES, 1), v + kv, k0, t);
        commit();
    };
    load(0, k_first);
    // Each row's window start and log-sum-exp while delta's inputs load.
    int rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8}, lo[2];
    float lse2[2], dl[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        bool in = rows[h] < t;
        lo[h] = in ? (int)start[rows[h]] : NO_KEYS;
        lse2[h] = in ? lse[rows0 + rows[h]] * 1.44269504089f : 0.f;
    }
    // delta: two threads a row, each over half of its channels, from global memory.
    {
        int r = threadIdx.x / 2, half = threadIdx.x % 2, i = q0 + r;
        float sum = 0.f;
        if (i < t)
            for (int j = half * D / 2; j < (half + 1) * D / 2; j += 8) {
                float a[8], b[8];
                load8(dout + head + (size_t)i * D + j, a);
                load8(o + head + (size_t)i * D + j, b);
#pragma unroll
                for (int e = 0; e < 8; e++) sum += a[e] * b[e];
            }
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        if (half == 0) {
            dl_rows[r] = sum;
            if (i < t) delta[rows0 + i] = sum;
        }
    }
    __syncthreads();  // the deltas are in
#pragma unroll
    for (int h = 0; h < 2; h++) dl[h] = dl_rows[rows[h] - q0];

    float acc[D / 8][4] = {};
    for (int it = 0, k0 = k_first; k0 < k_end; it++, k0 += BK) {
        bool more = k0 + BK < k_end;
        load_next_wait(STAGES == 2 && more, [&] { load(it + 1, k0 + BK); });
        fence_to_wgmma();
        __syncthreads();
        unsigned ks = shared_addr(sm.staged(it % STAGES, 0)), vs = shared_addr(sm.staged(it % STAGES, 1));
        float s[BK / 8][4], dp[BK / 8][4];
        scores<D>(s, dp, shared_addr(qs), ks, shared_addr(dos), vs);  // S = Q K^T, dP = dO V^T
        auto grads = [&](auto tag) {
            query_grads<BK, decltype(tag)::value>(s, dp, rows, lo, lse2, dl, k0, c, scale2);
        };
        if (all_seen(q0, BQ, lo_last, k0, BK, t)) grads(Flag<false>{}); else grads(Flag<true>{});
        sums<D, 1>({acc}, {dp}, {ks});  // dQ += dS K
        __syncthreads();  // every product has read this stage before a later tile overwrites it
        if (STAGES == 1 && more) load(it + 1, k0 + BK);
    }
    int bi = blockIdx.y / heads;
    store_grads<D>(dst.q_rows(blockIdx.y, heads), dst.row, acc, rows, t, dst.cos_of(bi, t, D),
                   dst.sin_of(bi, t, D));
}
#define HOPPER_KV(D) backward_kv_hopper<D>(q, k, v, dout, lse, delta, start, dst, t, heads, group, scale2);
#define HOPPER_Q(D) backward_q_hopper<D>(q, k, v, dout, o, lse, delta, start, dst, t, heads, group, scale2);
#else
#define HOPPER_KV(D)
#define HOPPER_Q(D)
#endif

// flash_backward_{kv,q}_hopper_{64,96,128}, with flash_backward_{kv,q}_{D}'s arguments.
#define FLASH_HOPPER(D)                                                                                           \
    extern "C" __global__ void __launch_bounds__(128)                                                             \
        flash_backward_kv_hopper_##D(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,               \
                                     const float* lse, const float* delta, const float* start, GradRows dst,      \
                                     int t, int heads, int group, float scale2) {                                 \
        follow_previous();                                                                                        \
        HOPPER_KV(D)                                                                                              \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(128)                                                             \
        flash_backward_q_hopper_##D(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const bf16* o, \
                                    const float* lse, float* delta, const float* start, GradRows dst, int t,      \
                                    int heads, int group, float scale2) {                                         \
        follow_previous();                                                                                        \
        HOPPER_Q(D)                                                                                               \
    }
FLASH_HOPPER(64)
FLASH_HOPPER(96)
FLASH_HOPPER(128)
