// Flash attention 2 (Dao, 2023) for bf16 heads of 64, 96, 128 or 256 dims on tensor cores (mma.sync
// m16n8k16): the scores live in registers, never in memory. Causal, each query also bounded below by the
// first token of its packed example (`start`, as train::layers::Windows). Grouped-query attention natively:
// query head h of `heads` reads key/value head h / group (group = heads / kv_heads), and K and V stay
// [batch, kv_heads, t, D] in memory. Forward: one block per 64 queries; backward: one kernel per 64 keys of a
// key/value head for dK and dV, summed over the group's query heads, and one per 64 queries for dQ, each
// summing in registers in a fixed order (no atomics: the same inputs give the same bits). The dQ kernel runs
// first: it also writes each row's rowsum(dO O), which the dK/dV kernel reads. On Hopper the forward and the
// backward run flash_hopper.cu's kernels instead (flash_attention.rs chooses); these are the portable ones.
// The plain reference is train::layers::flash_attention_{forward,backward}_reference.
#include "flash_common.cuh"

#define THREADS 128  // four warps, each owning 16 rows of the block's tile (the dK/dV kernel: KvShared)

// Fragments of mma.sync.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"): lane = 4 g + c holds
// A rows g and g + 8, B column g and C rows g and g + 8, at columns 2c and 2c + 1 of each 8-wide piece.
__device__ __forceinline__ void mma(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Four 8x8 matrices from shared memory, one row address per lane (lanes 8m..8m+7: matrix m).
__device__ __forceinline__ void ldsm(uint32_t* r, const bf16* p) {
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldsm_t(uint32_t* r, const bf16* p) {
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// Shared tiles are row-major with 8 bf16 of padding per row, so the 8 rows one ldmatrix reads fall in
// different banks.
template <int D> struct Tile {
    static constexpr int LD = D + 8;
};

// The A operand (16 rows x 16 columns at row r0, column c0) of a row-major tile.
template <int D> __device__ __forceinline__ void load_a(uint32_t* a, const bf16* s, int r0, int c0, int lane) {
    ldsm(a, s + (r0 + lane % 16) * Tile<D>::LD + c0 + lane / 16 * 8);
}
// B operands of two 8-wide pieces (16 columns of the product from n0) over k0..k0+15, when the tile holds
// B transposed, row n = column n of B (K for Q K^T): pieces {b[0], b[1]} and {b[2], b[3]}.
template <int D> __device__ __forceinline__ void load_bt(uint32_t* b, const bf16* s, int n0, int k0, int lane) {
    ldsm(b, s + (n0 + lane % 8 + lane / 16 * 8) * Tile<D>::LD + k0 + lane / 8 % 2 * 8);
}
// The same when the tile holds B itself, row k (V for P V).
template <int D> __device__ __forceinline__ void load_b(uint32_t* b, const bf16* s, int k0, int n0, int lane) {
    ldsm_t(b, s + (k0 + lane % 8 + lane / 8 % 2 * 8) * Tile<D>::LD + n0 + lane / 16 * 8);
}

// Rows row0.. of a [t, D] head into a shared tile of `rows` rows, zeros past t: cp.async, 16 bytes per thread
// and step, so the copy runs while the block computes. The caller commits the group and waits for it.
template <int D, int NT = THREADS> __device__ void load_rows(bf16* s, const bf16* g, int row0, int rows, int t) {
    for (int c = threadIdx.x; c < rows * D / 8; c += NT) {
        int r = c / (D / 8), col = c % (D / 8) * 8;
        bool in = row0 + r < t;
        uint32_t dst = (uint32_t)__cvta_generic_to_shared(s + r * Tile<D>::LD + col);
        const bf16* src = g + (size_t)(in ? row0 + r : 0) * D + col;
        copy_async<16>(dst, src, in ? 16 : 0);
    }
}
// c[0 .. N/8) += A B^T: A 16 rows x D (a(f, kk) puts the fragment of columns 16 kk.. in f, from registers
// or from shared memory), B the N rows of a shared tile (K for Q K^T).
template <int D, int N, class A>
__device__ __forceinline__ void mma_abt(float (*c)[4], A a, const bf16* tile, int lane) {
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        uint32_t f[4];
        a(f, kk);
#pragma unroll
        for (int n = 0; n < N / 16; n++) {
            uint32_t b[4];
            load_bt<D>(b, tile, n * 16, kk * 16, lane);
            mma(c[2 * n], f, b);
            mma(c[2 * n + 1], f, b + 2);
        }
    }
}

// mma_abt's A from fragments held in registers.
__device__ __forceinline__ auto held(const uint32_t (*frags)[4]) {
    return [frags](uint32_t* f, int kk) {
#pragma unroll
        for (int e = 0; e < 4; e++) f[e] = frags[kk][e];
    };
}
// mma_abt's A read from a shared tile at each use: this warp's 16 rows from row0.
template <int D> __device__ __forceinline__ auto read(const bf16* tile, int row0, int lane) {
    return [=](uint32_t* f, int kk) { load_a<D>(f, tile, row0, kk * 16, lane); };
}

// acc[0 .. D/8) += C B: C 16 rows x K (the C fragments c[0 .. K/8) of an earlier product, as A fragments), B
// the K rows of a shared tile (V for P V).
template <int D, int K>
__device__ __forceinline__ void mma_cb(float (*acc)[4], const float (*c)[4], const bf16* tile, int lane) {
#pragma unroll
    for (int kk = 0; kk < K / 16; kk++) {
        uint32_t a[4];
        as_a(a, c[2 * kk], c[2 * kk + 1]);
#pragma unroll
        for (int n = 0; n < D / 16; n++) {
            uint32_t b[4];
            load_b<D>(b, tile, kk * 16, n * 16, lane);
            mma(acc[2 * n], a, b);
            mma(acc[2 * n + 1], a, b + 2);
        }
    }
}

// Keys per tile of the forward: at D = 256 a tile of 64 K rows and one of V (67 KB) exceed the 48 KB of static
// shared memory, so 32. Blocks an SM, for the registers' bound: three to D = 128 (168 registers a thread), where
// the kernel needs 165-167. Left to ptxas, one change of index arithmetic took D = 128 to 173 registers, two
// blocks an SM, and 2B4T's forward from 0.342 to 0.434 ms (H100).
template <int D> struct Forward {
    static constexpr int BQ = 64, BK = D <= 128 ? 64 : 32, BLOCKS = D <= 128 ? 3 : 1;
};

// Q, O: [batch * heads, t, D]; K, V: [batch * heads / group, t, D]; start: [batch, t] (f32); lse:
// [batch * heads, t] (natural log). scale2 = log2(e) / sqrt(D): the softmax runs in base 2. K and V have
// separate tiles so that V's copy runs during Q K^T and the next K's during P V (flash attention 2's pipeline).
template <int D>
__device__ void forward(const bf16* q, const bf16* k, const bf16* v, const float* start, bf16* o, float* lse,
                        int t, int heads, int group, float scale2) {
    constexpr int BQ = Forward<D>::BQ, BK = Forward<D>::BK, LD = Tile<D>::LD;
    // Q passes into registers through the V tile where it fits, so that the first K tile loads beside it;
    // else (D = 256) through both tiles, before the K tile.
    constexpr bool Q_IN_V = BK >= BQ;
    static_assert(2 * BK >= BQ, "Q passes through the K and V tiles");
    __shared__ __align__(16) bf16 kvs[2 * BK * LD];
    bf16 *ks = kvs, *vs = kvs + BK * LD, *qs = Q_IN_V ? vs : kvs;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    int q0 = first_query(BQ);
    size_t head = (size_t)grid_head() * t * D, kv = kv_head<D>(grid_head(), t, heads, group);
    start += (size_t)(grid_head() / heads) * t;

    load_rows<D>(qs, q + head, q0, BQ, t);
    commit();
    // The window starts while Q loads: the first K tile's rows depend on them.
    QueryRows w(start, q0, BQ, BK, warp, g, t);
    auto load_first_k = [&] {
        load_rows<D>(ks, k + kv, w.k_first, BK, t);
        commit();
    };
    if (Q_IN_V) {
        load_first_k();
        wait_loads<1>();  // Q's; the K tile's may stay in flight
    } else {
        wait_loads<0>();
    }
    __syncthreads();
    uint32_t qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) load_a<D>(qf[kk], qs, warp * 16, kk * 16, lane);
    __syncthreads();  // every warp has its Q
    if (!Q_IN_V) load_first_k();

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, acc[D / 8][4] = {};
    for (int k0 = w.k_first; k0 < w.k_end; k0 += BK) {
        wait_loads<0>();
        __syncthreads();  // K is in; every warp is done with the last V
        load_rows<D>(vs, v + kv, k0, BK, t);
        commit();
        float s[BK / 8][4] = {};
        mma_abt<D, BK>(s, held(qf), ks, lane);
        online_softmax<BK, D>(s, acc, m, l, w.rows, w.lo, k0, c, !all_seen(q0, BQ, w.lo_last, k0, BK, t), scale2);
        wait_loads<0>();
        __syncthreads();  // V is in; every warp is done with K
        if (k0 + BK < w.k_end) {
            load_rows<D>(ks, k + kv, k0 + BK, BK, t);
            commit();
        }
        mma_cb<D, BK>(acc, s, vs, lane);
    }
    store_output<D>(acc, m, l, w.rows, c, o + head, lse + (size_t)grid_head() * t, t);
}

// The query tile of the dK/dV kernel: Q and dO rows, and per row lse, delta and window start (load_row_values').
template <int D, int BQ, int NT> struct QueryTile {
    bf16 *q, *dout;
    float *lse, *delta, *lo;
    __device__ void load(const bf16* gq, const bf16* gdo, const float* glse, const float* gdelta, const float* start,
                         int q0, int t) {
        load_rows<D, NT>(q, gq, q0, BQ, t);
        load_rows<D, NT>(dout, gdo, q0, BQ, t);
        load_row_values(lse, delta, lo, glse, gdelta, start, q0, BQ, t);
        commit();
    }
};

// The dK/dV kernel's shape. Each 16 keys of the block have two sums, dV (from S^T and P^T: the P role) and
// dK (from dP^T and dS^T: the dS role). Up to D = 128 one warp takes both, with 16-query tiles at 128 to fit
// its registers. At 256 that warp spilled (512 bytes), so there (SPLIT) the roles go to a pair of warps, the P
// warp handing its probabilities to the dS warp through shared memory: 1.38x faster at Falcon3-1B's shape, but
// 1.3x slower at D = 96 and 1.03x at 128 (H100, flash_attention_timing). Shared memory: K and V tiles, two
// query tiles (one in use, the next in flight), their per-row values, then under SPLIT the probabilities (f32,
// in the fragments' order). flash_attention.rs sizes the launch by the same formulas.
template <int D> struct KvShared {
    static constexpr bool SPLIT = D >= 256;
    static constexpr int BK = 64, BQ = D <= 96 ? 64 : SPLIT ? 32 : 16, LD = Tile<D>::LD;
    static constexpr int NT = SPLIT ? 256 : 128;  // threads
    static __device__ QueryTile<D, BQ, NT> tile(unsigned char* smem, int stage) {
        bf16* rows = reinterpret_cast<bf16*>(smem) + (2 * BK + 2 * stage * BQ) * LD;
        float* small = reinterpret_cast<float*>(reinterpret_cast<bf16*>(smem) + (2 * BK + 4 * BQ) * LD) + 3 * stage * BQ;
        return {rows, rows + BQ * LD, small, small + BQ, small + 2 * BQ};
    }
    static __device__ float* probs(unsigned char* smem) {
        return reinterpret_cast<float*>(reinterpret_cast<bf16*>(smem) + (2 * BK + 4 * BQ) * LD) + 6 * BQ;
    }
};

// dK and dV for 64 keys of one key/value head (grid_head() = batch * kv_heads + kv head), 16 keys a warp (or a
// pair of warps, KvShared::SPLIT): for each of the group's query heads and each tile of BQ queries that sees
// the keys, S^T = K Q^T and dP^T = V dO^T in registers (keys as rows), then dV += P^T dO and dK += dS^T Q: the
// sum over the group stays in registers.
template <int D>
__device__ void backward_kv(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
                            const float* delta, const float* start, GradRows dst, int t, int heads, int group,
                            float scale2) {
    using S = KvShared<D>;
    constexpr int BK = S::BK, BQ = S::BQ, LD = S::LD, NT = S::NT;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* ks = reinterpret_cast<bf16*>(smem);
    bf16* vs = ks + BK * LD;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    int rows = warp % 4 * 16;  // this warp's keys in the tile
    // Under SPLIT, this lane's probabilities, entry i at [i * 32]: a layout without bank conflicts.
    float* handed = S::probs(smem) + warp % 4 * (BQ / 2) * 32 + lane;
    int k0 = first_key(BK);
    int kv_heads = heads / group, bi = grid_head() / kv_heads;
    size_t head = (size_t)grid_head() * t * D;
    // The group's first query head (of [batch * heads]): step `it` of the loop below takes query head
    // qh0 + it / n_tiles and its query tile it % n_tiles.
    int qh0 = bi * heads + grid_head() % kv_heads * group;
    start += (size_t)bi * t;
    int keys[2] = {k0 + rows + g, k0 + rows + g + 8};
    // The query tiles that see these keys: from k0 on, those whose first row's window starts in them.
    int n_tiles = query_tiles_seeing<NT>(k0, BK, BQ, t, start);
    auto load_tile = [&](int it) {
        size_t qh = qh0 + it / n_tiles;
        S::tile(smem, it % 2).load(q + qh * t * D, dout + qh * t * D, lse + qh * t, delta + qh * t, start,
                                   k0 + it % n_tiles * BQ, t);
    };
    load_rows<D, NT>(ks, k + head, k0, BK, t);
    load_rows<D, NT>(vs, v + head, k0, BK, t);
    if (n_tiles > 0) load_tile(0);

    // The loop of a warp taking the P role, the dS role or both; each role's arrays exist only where it is
    // taken.
    auto pass = [&](auto p_role, auto ds_role) {
        constexpr bool P = decltype(p_role)::value, DS = decltype(ds_role)::value, HANDED = !(P && DS);
        float dv_acc[D / 8][4] = {}, dk_acc[D / 8][4] = {};
        for (int it = 0; it < group * n_tiles; it++) {
            int q0 = k0 + it % n_tiles * BQ;
            QueryTile<D, BQ, NT> tile = S::tile(smem, it % 2);
            load_next_wait(it + 1 < group * n_tiles, [&] { load_tile(it + 1); });
            __syncthreads();
            float s[BQ / 8][4] = {}, dp[BQ / 8][4] = {};
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                uint32_t ka[4], va[4];
                if (P) load_a<D>(ka, ks, rows, kk * 16, lane);
                if (DS) load_a<D>(va, vs, rows, kk * 16, lane);
#pragma unroll
                for (int n = 0; n < BQ / 16; n++) {
                    uint32_t b[4];
                    if (P) {
                        load_bt<D>(b, tile.q, n * 16, kk * 16, lane);
                        mma(s[2 * n], ka, b);
                        mma(s[2 * n + 1], ka, b + 2);
                    }
                    if (DS) {
                        load_bt<D>(b, tile.dout, n * 16, kk * 16, lane);
                        mma(dp[2 * n], va, b);
                        mma(dp[2 * n + 1], va, b + 2);
                    }
                }
            }
            auto hand = [&](int i, float& p) {
                if (P && HANDED) handed[i * 32] = p;
                if (DS && HANDED) p = handed[i * 32];
            };
            auto grads = [&](auto tag) {
                key_grads<BQ, decltype(tag)::value, P, DS>(s, dp, keys, q0, c, t, tile.lse, tile.delta, tile.lo,
                                                           scale2, hand);
            };
            if (DS && HANDED) named_sync<64>(1 + warp % 4);  // the pair's barrier: the partner's probabilities are in
            if (all_seen(q0, BQ, (int)tile.lo[BQ - 1], k0, BK, t)) grads(Flag<false>{}); else grads(Flag<true>{});
            if (P && HANDED) named_sync<64>(1 + warp % 4);
            if (P) mma_cb<D, BQ>(dv_acc, s, tile.dout, lane);
            if (DS) mma_cb<D, BQ>(dk_acc, dp, tile.q, lane);
            __syncthreads();  // every warp is done with this tile (and the probabilities handed) before the one
                              // after next overwrites it
        }
        if (DS)
            store_grads<D>(dst.k_rows(grid_head(), kv_heads), dst.row, dk_acc, keys, t, grad_scale(scale2),
                           dst.cos_of(bi, t, D), dst.sin_of(bi, t, D));
        if (P) store_grads<D>(dst.v_rows(grid_head(), kv_heads), dst.row, dv_acc, keys, t, 1.f);
    };
    if (!S::SPLIT) pass(Flag<true>{}, Flag<true>{});
    else if (warp >= 4) pass(Flag<false>{}, Flag<true>{});
    else pass(Flag<true>{}, Flag<false>{});
}

// The sum over row r's channels of a * b for A fragments of 16 rows x D (load_a's layout, given as
// mma_abt's are): this thread's share of rows g (out[0]) and g + 8 (out[1]), to be summed over the quad's
// four lanes.
template <int D, class A, class B> __device__ __forceinline__ void rows_dot(float* out, A a, B b) {
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        uint32_t fa[4], fb[4];
        a(fa, kk);
        b(fb, kk);
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&fa[e]));
            float2 y = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&fb[e]));
            out[e % 2] += x.x * y.x + x.y * y.y;
        }
    }
}

// The dQ kernel's shape and dynamic shared memory (flash_attention.rs sizes the launch by the same formula).
// Two stages of BK keys' K and V rows; before them Q, dO and O pass through the same rows into registers. At D
// = 256 the Q and dO fragments (128 registers) beside the dQ sums (128) spilled, so there (RESIDENT) Q and dO
// stay in shared memory ahead of the stages and each product reads its fragments from them.
template <int D> struct DqShape {
    static constexpr bool RESIDENT = D >= 256;
    static constexpr int BQ = 64, BK = D <= 128 ? 32 : 16, LD = Tile<D>::LD;
    static constexpr bool TOGETHER = 4 * BK >= 2 * BQ;  // Q and dO fit the stages' rows at once
    static constexpr int STAGE_ROWS = TOGETHER ? 4 * BK : (BQ > 4 * BK ? BQ : 4 * BK);
    static constexpr int ROWS = (RESIDENT ? 2 * BQ : 0) + STAGE_ROWS;
};

// dQ for 64 queries: over the keys they see, S = Q K^T and dP = dO V^T in registers, then dQ += dS K. Two
// stages of K and V tiles: the next one is copied while this one is used. First each row's delta = sum over
// d of dO O (dS = P (dP - delta)), from the dO fragments it holds anyway and O's, written for the dK/dV
// kernel, which runs after this one.
template <int D>
__device__ void backward_q(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const bf16* o,
                           const float* lse, float* delta, const float* start, GradRows dst, int t, int heads,
                           int group, float scale2) {
    using Sh = DqShape<D>;
    constexpr int BQ = Sh::BQ, BK = Sh::BK, LD = Sh::LD;
    constexpr bool TOGETHER = Sh::TOGETHER, RESIDENT = Sh::RESIDENT;
    extern __shared__ __align__(16) unsigned char dq_smem[];
    bf16* resident = reinterpret_cast<bf16*>(dq_smem);  // under RESIDENT: Q, then dO
    bf16* buf = resident + (RESIDENT ? 2 * BQ * LD : 0);  // (Q, dO and) O, then two stages of K and V
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    int q0 = first_query(BQ);
    size_t head = (size_t)grid_head() * t * D, rows0 = (size_t)grid_head() * t;
    size_t kv = kv_head<D>(grid_head(), t, heads, group);
    start += (size_t)(grid_head() / heads) * t;

    // This warp's A fragments of 64 rows of a head, through the buffer at row `at`.
    auto fragments = [&](uint32_t (*f)[4], int at) {
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) load_a<D>(f[kk], buf + at * LD, warp * 16, kk * 16, lane);
    };
    uint32_t qf[RESIDENT ? 1 : D / 16][4], dof[RESIDENT ? 1 : D / 16][4];
    if constexpr (RESIDENT) {
        load_rows<D>(resident, q + head, q0, BQ, t);
        load_rows<D>(resident + BQ * LD, dout + head, q0, BQ, t);
    } else {
        load_rows<D>(buf, q + head, q0, BQ, t);
        if constexpr (TOGETHER) load_rows<D>(buf + BQ * LD, dout + head, q0, BQ, t);
        commit();
        wait_loads<0>();
        __syncthreads();
        fragments(qf, 0);
        if constexpr (!TOGETHER) {
            __syncthreads();  // every warp has its Q
            load_rows<D>(buf, dout + head, q0, BQ, t);
            commit();
            wait_loads<0>();
            __syncthreads();
        }
        fragments(dof, TOGETHER ? BQ : 0);
        __syncthreads();  // every warp has its Q and dO
    }
    // Each product's Q and dO fragments: held, or read from the resident tiles.
    auto q_a = [&](uint32_t* f, int kk) {
        if constexpr (RESIDENT) read<D>(resident, warp * 16, lane)(f, kk); else held(qf)(f, kk);
    };
    auto do_a = [&](uint32_t* f, int kk) {
        if constexpr (RESIDENT) read<D>(resident + BQ * LD, warp * 16, lane)(f, kk); else held(dof)(f, kk);
    };
    load_rows<D>(buf, o + head, q0, BQ, t);
    commit();
    wait_loads<0>();
    __syncthreads();
    float dl[2] = {0.f, 0.f};
    rows_dot<D>(dl, read<D>(buf, warp * 16, lane), do_a);
    int rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8}, lo[2];
    float lse2[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        dl[h] += __shfl_xor_sync(0xffffffff, dl[h], 1);
        dl[h] += __shfl_xor_sync(0xffffffff, dl[h], 2);
        bool in = rows[h] < t;
        lo[h] = in ? (int)start[rows[h]] : NO_KEYS;
        lse2[h] = in ? lse[rows0 + rows[h]] * LOG2E : 0.f;
        if (in && c == 0) delta[rows0 + rows[h]] = dl[h];
    }
    int k_end = min(q0 + BQ, t), lo_last = (int)start[k_end - 1];
    int k_first = (int)start[q0] / BK * BK;
    __syncthreads();  // every warp has read O
    auto stage = [&](int i) { return buf + i % 2 * 2 * BK * LD; };
    auto load = [&](int i, int k0) {
        load_rows<D>(stage(i), k + kv, k0, BK, t);
        load_rows<D>(stage(i) + BK * LD, v + kv, k0, BK, t);
        commit();
    };
    load(0, k_first);

    float acc[D / 8][4] = {};
    for (int it = 0, k0 = k_first; k0 < k_end; it++, k0 += BK) {
        const bf16 *ks = stage(it), *vs = ks + BK * LD;
        load_next_wait(k0 + BK < k_end, [&] { load(it + 1, k0 + BK); });
        __syncthreads();
        float s[BK / 8][4] = {}, dp[BK / 8][4] = {};
        mma_abt<D, BK>(s, q_a, ks, lane);
        mma_abt<D, BK>(dp, do_a, vs, lane);
        auto grads = [&](auto tag) {
            query_grads<BK, decltype(tag)::value>(s, dp, rows, lo, lse2, dl, k0, c, scale2);
        };
        if (all_seen(q0, BQ, lo_last, k0, BK, t)) grads(Flag<false>{}); else grads(Flag<true>{});
        mma_cb<D, BK>(acc, dp, ks, lane);
        __syncthreads();  // every warp is done with this stage before the one after next overwrites it
    }
    int bi = grid_head() / heads;
    store_grads<D>(dst.q_rows(grid_head(), heads), dst.row, acc, rows, t, grad_scale(scale2), dst.cos_of(bi, t, D),
                   dst.sin_of(bi, t, D));
}

#define FLASH(D)                                                                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS, Forward<D>::BLOCKS)                                     \
        flash_forward_##D(const bf16* q, const bf16* k, const bf16* v, const float* start, bf16* o, float* lse,   \
                          int t, int heads, int group, float scale2) {                                            \
        follow_previous();                                                                                        \
        forward<D>(q, k, v, start, o, lse, t, heads, group, scale2);                                              \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(KvShared<D>::NT)                                                 \
        flash_backward_kv_##D(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,    \
                              const float* delta, const float* start, GradRows dst, int t, int heads,             \
                              int group, float scale2) {                                                          \
        follow_previous();                                                                                        \
        backward_kv<D>(q, k, v, dout, lse, delta, start, dst, t, heads, group, scale2);                           \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                         \
        flash_backward_q_##D(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const bf16* o,        \
                             const float* lse, float* delta, const float* start, GradRows dst, int t,             \
                             int heads, int group, float scale2) {                                                \
        follow_previous();                                                                                        \
        backward_q<D>(q, k, v, dout, o, lse, delta, start, dst, t, heads, group, scale2);                         \
    }

// The head dims of kernels::FLASH_HEAD_DIMS.
FLASH(64)
FLASH(96)
FLASH(128)
FLASH(256)
