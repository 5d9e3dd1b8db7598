// Flash attention on Hopper's warpgroup products (wgmma), for heads of 64, 96, 128 and 256 dims: the forward
// (forward_hopper, at the end) and the backward. The backward does the same work as flash_attention.cu's backward_kv
// and backward_q (which other cards run), whose products are per-warp mma.syncs that each read their B operand from
// shared memory through ldmatrix: each of a block's four warps reads the whole tile of the other side for every
// product. A wgmma reads its shared operands once for the warpgroup's 64 rows. Against the portable kernels (H100,
// BENCHMARKS.md): 1.75x at head dim 128, whose portable dK/dV kernel takes 16-query tiles to fit its registers,
// 1.11-1.15x at 96 and 1.28x at 256. What bounds them now is each warpgroup's serial chain (products, softmax,
// products) with two warpgroups an SM: two warpgroups a block sharing each tile measured no faster. In Nsight
// Compute (BENCHMARKS.md) the dK/dV kernel's warps wait mostly on the latency of the instruction before and
// on the block barrier, with a scheduler issuing in 37% of cycles: every instruction of the loop counts.
//
// Below head dim 256 a block is one warpgroup and takes 64 rows of its side: keys (dK/dV) or queries (dQ). Over the
// tiles of 64 rows of the other side that it meets, two products over D with both operands in shared memory give the
// scores and their gradients' inputs in registers (the dK/dV kernel: S^T = K Q^T and dP^T = V dO^T, keys as rows; dQ:
// S = Q K^T and dP = dO V^T), then the probabilities and score gradients as the portable kernels take them
// (flash_common.cuh), then sums over the other side's rows with the left operand from registers and the right read
// transposed (MN-major) from the same tiles (dV += P^T dO and dK += dS^T Q; dQ += dS K). Tiles sit in shared memory
// under the 128-byte swizzle, in panels of 64 columns (128 bytes a row; at D = 96 the second panel's rows are half
// used), loaded by cp.async; the next tile's loads run during this one's products. Sums are in f32 in a fixed order
// (the same inputs give the same bits), not the portable kernels' order, so the two differ in rounding. Reference:
// train::layers::flash_attention_backward_reference.
//
// The dQ kernel comes in two forms. One recomputes S and dP for its dS (three products a tile) and writes each
// row's delta for the dK/dV kernel, which runs after it. The other (backward_q_from_ds) reads the dS tiles the
// dK/dV kernel stored (ds_tile) and runs one product a tile; the deltas then come from a kernel of their own,
// first. flash_attention.rs picks (kernels::flash_ds_bytes): the second while the tiles fit.
//
// At head dim 256 one warpgroup cannot hold a block's sums (dK and dV: 256 registers a thread), so a block is a
// pair of warpgroups over the same 64 rows (`PAIR`). For each tile of the other side warpgroup 0 takes the
// scores (S^T = K Q^T, or S = Q K^T) and their probabilities, warpgroup 1 the product with dO (dP^T = V dO^T,
// or dP = dO V^T) and the score gradients; they hand P (f32) and dS (bf16) to each other through shared memory,
// and each sums half of D's columns: panels 0 and 2, or 1 and 3, so that RoPE's channel pairs (j, j + 128) are
// one thread's. The arithmetic is the one-warpgroup kernels'.
#include "flash_common.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#include "hopper.cuh"

// The kernels' shape and dynamic shared memory (flash_attention.rs's `hopper_shape` sizes the backward's launch by
// the same formula): RESIDENT tiles (K and V, or Q and dO; the forward's Q), then STAGES stages of two tiles of the
// other side, each PANELS panels of 64 rows x 128 bytes, under a pair the tiles it hands over (P: 64 x 64 f32,
// dS: bf16), then each stage's per-row values (3 x 64), after 1024 bytes of room to align the tiles.
template <int D, int STAGES = 2, int RESIDENT = 2> struct HopperTiles {
    static constexpr bool PAIR = D > 128;
    static constexpr int ROWS = 64, PANELS = (D + 63) / 64, THREADS = PAIR ? 256 : 128;
    static constexpr int TILE = PANELS * ROWS * 128, HANDED = PAIR ? ROWS * 64 * (4 + 2) : 0;
    static constexpr int TILES = (RESIDENT + 2 * STAGES) * TILE + HANDED;
    // The columns of D a warpgroup's sums hold: all, or half under a pair.
    static constexpr int WIDTH = PAIR ? D / 2 : D;
    unsigned char* base;
    // The block's dynamic shared memory, aligned for the swizzle.
    __device__ static HopperTiles here() {
        extern __shared__ unsigned char hopper_smem_raw[];
        // An offset into the array rather than an integer cast back to a pointer: the compiler then knows every
        // access is to shared memory (LDS/STS, not generic loads and stores).
        return {hopper_smem_raw + (1024 - shared_addr(hopper_smem_raw) % 1024) % 1024};
    }
    __device__ unsigned char* resident(int i) const { return base + i * TILE; }
    __device__ unsigned char* staged(int stage, int i) const { return base + (RESIDENT + 2 * stage + i) * TILE; }
    __device__ float2* handed_p() const { return reinterpret_cast<float2*>(base + (RESIDENT + 2 * STAGES) * TILE); }
    __device__ uint32_t* handed_ds() const { return reinterpret_cast<uint32_t*>(handed_p() + ROWS * 32); }
    __device__ float* values() const { return reinterpret_cast<float*>(base + TILES); }
};

// A pair's hand-over of a 64 x 64 tile in the accumulator layout (x[n][2 h + e]: row 16 warp + lane / 4 + 8 h,
// column 8 n + 2 (lane % 4) + e) through shared memory, each column pair one slot (float2, or bf16 pair as
// uint32_t) that the other warpgroup's thread of the same place reads back. Row r's 32 slots in chunks of 4,
// chunk n at n ^ r % 8: a warp's eight rows take different banks.
template <class T> __device__ __forceinline__ T* pair_slot(T* tile, int r, int n) {
    return tile + r * 32 + ((n ^ r % 8) << 2) + threadIdx.x % 4;
}
__device__ __forceinline__ int pair_row() { return threadIdx.x % 128 / 32 * 16 + threadIdx.x % 32 / 4; }
__device__ __forceinline__ void store_pair(float2* at, float a, float b) { *at = make_float2(a, b); }
__device__ __forceinline__ void store_pair(uint32_t* at, float a, float b) { *at = pack(a, b); }
__device__ __forceinline__ float2 load_pair(const float2* at) { return *at; }
__device__ __forceinline__ float2 load_pair(const uint32_t* at) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(at));
}
template <class T> __device__ __forceinline__ void hand_over(T* tile, const float (&x)[8][4]) {
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
        for (int h = 0; h < 2; h++) store_pair(pair_slot(tile, pair_row() + 8 * h, n), x[n][2 * h], x[n][2 * h + 1]);
}
template <class T> __device__ __forceinline__ void take_over(float (&x)[8][4], const T* tile) {
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            float2 v = load_pair(pair_slot(tile, pair_row() + 8 * h, n));
            x[n][2 * h] = v.x, x[n][2 * h + 1] = v.y;
        }
}
// The pair's named barriers (0 is __syncthreads'): one warpgroup arrives when its tile is handed over, the
// other waits for it.
__device__ __forceinline__ void pair_arrive(int id) { asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory"); }
__device__ __forceinline__ void pair_wait(int id) { asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory"); }

// Rows row0 .. row0 + 64 of a [t, D] head (zeros past t) into a swizzled tile: 16-byte chunk c of row r to
// panel c / 8, at r * 128 + (c % 8 ^ r % 8) * 16, by every thread of the block (NT). `ONCE`: data read once,
// marked to leave L2 first. Each thread keeps one chunk column c and takes every STEP-th row from its first, so
// that its copies differ by constant offsets: a thread a chunk in turn (ch / (D / 8), ch % (D / 8)) spent
// about 35 instructions a copy on addresses, two fifths of the dK/dV kernel's instructions (Nsight Compute).
// A row's D / 8 chunks take a power of two of threads (SLOTS); at D = 96 a quarter of them idle.
template <int D, int NT = HopperTiles<D>::THREADS, bool ONCE = false>
__device__ __forceinline__ void load_swizzled(unsigned char* tile, const bf16* g, int row0, int t) {
    constexpr int ROWS = HopperTiles<D>::ROWS, CHUNKS = D / 8;
    constexpr int SLOTS = CHUNKS <= 8 ? 8 : CHUNKS <= 16 ? 16 : 32, STEP = NT / SLOTS;
    static_assert(NT % SLOTS == 0 && ROWS % STEP == 0, "a pass of the block covers whole rows");
    int c = threadIdx.x % SLOTS, r0 = threadIdx.x / SLOTS;
    if (c >= CHUNKS) return;
    unsigned long long policy = 0;
    if (ONCE) asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    auto copy = [&](unsigned at, const bf16* from, int bytes) {
        if (ONCE)
            asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(at), "l"(from),
                         "r"(bytes), "l"(policy));
        else
            copy_async<16>(at, from, bytes);
    };
    unsigned dst = shared_addr(tile + c / 8 * ROWS * 128 + r0 * 128);
    const bf16* src = g + (size_t)(row0 + r0) * D + c * 8;
    auto at = [&](int j) { return dst + j * STEP * 128 + ((c % 8 ^ (r0 + j * STEP) % 8) << 4); };
    if (row0 + ROWS <= t) {  // the whole tile in (all but a sequence's last): no tests, no selects
#pragma unroll
        for (int j = 0; j < ROWS / STEP; j++) copy(at(j), src + j * STEP * D, 16);
        return;
    }
    int left = t - row0 - r0;  // rows of this thread's that are in: j * STEP < left
#pragma unroll
    for (int j = 0; j < ROWS / STEP; j++) {
        bool in = j * STEP < left;
        copy(at(j), in ? src + j * STEP * D : g, in ? 16 : 0);
    }
}

// x[i] = A[i] B[i]^T for i < N (64 x 64, f32, the accumulator layout) for swizzled tiles A and B of 64 rows x
// D: k runs along D, 16 at a time (32 bytes within a panel's rows). Issued, committed and waited for.
template <int D, int N>
__device__ __forceinline__ void scores(float (*const (&x)[N])[4], const unsigned (&a)[N], const unsigned (&b)[N]) {
    constexpr int PANEL = HopperTiles<D>::ROWS * 128;
#pragma unroll
    for (int i = 0; i < N; i++) {
        auto& xf = reinterpret_cast<float(&)[32]>(*x[i]);
#pragma unroll
        for (int j = 0; j < 32; j++) xf[j] = 0.f;
        keep_in_place(xf);
    }
    unsigned long long da[N], db[N];
#pragma unroll
    for (int i = 0; i < N; i++) da[i] = sw128_descriptor(a[i], 16, 1024), db[i] = sw128_descriptor(b[i], 16, 1024);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        unsigned at = kk / 4 * PANEL + kk % 4 * 32;
#pragma unroll
        for (int i = 0; i < N; i++)
            wgmma_bf16(reinterpret_cast<float(&)[32]>(*x[i]), advance(da[i], at), advance(db[i], at));
    }
    wgmma_commit();
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < N; i++) keep_in_place(reinterpret_cast<float(&)[32]>(*x[i]));
}

// A `sums` that does nothing while its products run.
struct NoWork {
    template <class A> __device__ void operator()(const A&) const {}
};

// acc[i] += X[i] B[i] for i < N (64 x W sums) for X[i] 64 x 64 in registers (scores' layout, made A
// fragments) and B[i] swizzled tiles of 64 rows x D read MN-major: k runs along their rows, 16 (2048 bytes of
// a panel) at a time; n along D, a panel (64 columns, or the 32 left at D = 96) a product. The sums hold panels
// `first`, `first + step`, ... of B: all of them (W = D), or every second one under a pair. `meanwhile(a)` runs
// while the products do, with the A fragments (a[i][kk]: X[i]'s columns 16 kk .. 16 kk + 16, as_a's).
template <int D, int N, int W = D, class Meanwhile = NoWork>
__device__ __forceinline__ void sums(float (*const (&acc)[N])[4], const float (*const (&x)[N])[4],
                                     const unsigned (&b)[N], int first = 0, int step = 1,
                                     Meanwhile meanwhile = {}) {
    constexpr int PANEL = HopperTiles<D>::ROWS * 128, P = (W + 63) / 64;
    uint32_t a[N][4][4];
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int kk = 0; kk < 4; kk++) as_a(a[i][kk], x[i][2 * kk], x[i][2 * kk + 1]);
    unsigned long long db[N];
#pragma unroll
    for (int i = 0; i < N; i++) db[i] = sw128_descriptor(b[i] + first * PANEL, PANEL, 1024);
#pragma unroll
    for (int i = 0; i < N; i++) keep_in_place(reinterpret_cast<float(&)[W / 2]>(*acc[i]));
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
#pragma unroll
        for (int p = 0; p < P; p++)
#pragma unroll
            for (int i = 0; i < N; i++) {
                auto desc = advance(db[i], p * step * PANEL + kk * 2048);
                if (W - 64 * p >= 64)
                    wgmma_bf16_t(reinterpret_cast<float(&)[32]>(acc[i][8 * p]), a[i][kk], desc);
                else
                    wgmma_bf16_t(reinterpret_cast<float(&)[16]>(acc[i][8 * p]), a[i][kk], desc);
            }
    wgmma_commit();
    meanwhile(a);
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < N; i++) {
        keep_in_place(reinterpret_cast<float(&)[W / 2]>(*acc[i]));
        // The A fragments stay in their registers until the products have read them.
        keep_in_place(reinterpret_cast<uint32_t(&)[16]>(a[i]));
    }
}

// A pair's products and softmax for one tile: warpgroup 0 takes S = A[0] B[0]^T into s and the probabilities
// (grads' P role), which it hands over, then runs `meanwhile`; warpgroup 1 takes dP = A[1] B[1]^T into dp, then
// from the P handed to it (into its s) the score gradients (grads' DS role), which it hands back. After it
// s holds P and dp holds dS in both.
template <int D, class H, class Grads, class Meanwhile>
__device__ __forceinline__ void pair_scores(const H& sm, int wg, float (&s)[8][4], float (&dp)[8][4],
                                            const unsigned (&a)[2], const unsigned (&b)[2], Grads grads,
                                            Meanwhile meanwhile) {
    if (wg == 0) {
        scores<D, 1>({s}, {a[0]}, {b[0]});
        grads(Flag<true>{}, Flag<false>{});
        hand_over(sm.handed_p(), s);
        pair_arrive(1);
        meanwhile();
        pair_wait(2);
        take_over(dp, sm.handed_ds());
    } else {
        scores<D, 1>({dp}, {a[1]}, {b[1]});
        pair_wait(1);
        take_over(s, sm.handed_p());
        grads(Flag<false>{}, Flag<true>{});
        hand_over(sm.handed_ds(), dp);
        pair_arrive(2);
    }
}

// The score gradients dS that the dK/dV kernel hands to the dQ kernel (`backward_q_from_ds`, which applies 1 /
// sqrt(D) at its store), so that dQ is one product a tile instead of three (S and dP again, then dS K). Per query
// head (of batch * heads) the causal pairs of query tile m and key tile n <= m, at m (m + 1) / 2 + n, each 64 x 64
// bf16: a row per key, 128 bytes, its 64 queries in the order of the dK/dV kernel's A fragments, so that each
// thread stores its 16 values of a row as two 16-byte chunks and a warp's stores fill whole sectors: query 8 n + 2
// c + e (c = lane % 4) at element 32 (n / 4) + 8 c + 2 (n % 4) + e. The dQ kernel reads the tiles back as they
// are (its product's rows in that order).
template <class T> __device__ __forceinline__ T* ds_tile(T* ds, size_t qh, int m, int n, int t) {
    size_t tiles = (size_t)(t + 63) / 64;
    return ds + (qh * (tiles * (tiles + 1) / 2) + (size_t)m * (m + 1) / 2 + n) * 64 * 64;
}
// This thread's part of a tile (dS^T in a[kk], the dK sum's A fragments, as_a's: rows 16 warp + g and + 8).
__device__ __forceinline__ void store_ds(bf16* tile, const uint32_t (&a)[4][4], int warp, int g, int c) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
        // Streaming stores (evict first): the tiles would push the Q and dO tiles that blocks share out of L2.
        uint4* row = reinterpret_cast<uint4*>(tile + (16 * warp + g + 8 * h) * 64);
        __stcs(row + c, make_uint4(a[0][h], a[0][2 + h], a[1][h], a[1][2 + h]));
        __stcs(row + 4 + c, make_uint4(a[2][h], a[2][2 + h], a[3][h], a[3][2 + h]));
    }
}
// The query (from the tile's first) of row r of the dQ kernel's product, which reads store_ds' order.
__device__ __forceinline__ int ds_query(int r) { return 8 * (4 * (r / 32) + r % 8 / 2) + 2 * (r % 32 / 8) + r % 2; }

// Each row's delta = sum over d of dO O (dS = P (dP - delta)) for the 64 rows from q0 of a head (at `head` in dO
// and O, at `rows0` in delta), NT threads splitting each row's channels, from global memory; into delta and,
// where given, into `rows` in shared memory.
template <int D, int NT>
__device__ __forceinline__ void row_deltas(const bf16* dout, const bf16* o, float* delta, size_t head, size_t rows0,
                                           int q0, int t, float* rows) {
    constexpr int SPLIT = NT / 64;
    int r = threadIdx.x / SPLIT, part = threadIdx.x % SPLIT, i = q0 + r;
    float sum = 0.f;
    if (i < t)
        for (int j = part * D / SPLIT; j < (part + 1) * D / SPLIT; j += 8) {
            float a[8], b[8];
            load8(dout + head + (size_t)i * D + j, a);
            load8(o + head + (size_t)i * D + j, b);
#pragma unroll
            for (int e = 0; e < 8; e++) sum += a[e] * b[e];
        }
#pragma unroll
    for (int m = 1; m < SPLIT; m *= 2) sum += __shfl_xor_sync(0xffffffff, sum, m);
    if (part == 0) {
        if (rows) rows[r] = sum;
        if (i < t) delta[rows0 + i] = sum;
    }
}

// dK and dV for 64 keys of one key/value head (grid_head() = batch * kv_heads + kv head), over each query
// tile of each query head of the group that sees them, the sums over the group in registers.
template <int D>
__device__ void backward_kv_hopper(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
                                   const float* delta, const float* start, GradRows dst, bf16* ds, int t,
                                   int heads, int group, float scale2) {
    using H = HopperTiles<D>;
    constexpr int BK = H::ROWS, BQ = H::ROWS, W = H::WIDTH;
    // K, V; each stage's Q, dO; P and dS handed over; then per stage its rows' lse, delta, window start
    H sm = H::here();
    unsigned char *ks = sm.resident(0), *vs = sm.resident(1);
    float* small = sm.values();
    // wg: this thread's warpgroup of a pair (0 where there is one); warp: its warp in the warpgroup.
    int wg = H::PAIR ? threadIdx.x / 128 : 0, warp = threadIdx.x / 32 - 4 * wg;
    int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    int k0 = first_key(BK);
    int kv_heads = heads / group, bi = grid_head() / kv_heads;
    size_t head = (size_t)grid_head() * t * D;
    int qh0 = bi * heads + grid_head() % kv_heads * group;  // the group's first query head, of [batch * heads]
    start += (size_t)bi * t;
    int keys[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
    load_swizzled<D>(ks, k + head, k0, t);  // while the window starts are read
    load_swizzled<D>(vs, v + head, k0, t);
    commit();
    // The query tiles that see these keys: from k0 on, those whose first row's window starts in them.
    int n_tiles = query_tiles_seeing<H::THREADS>(k0, BK, BQ, t, start);
    // Step `it` takes query head qh0 + it / n_tiles and its query tile it % n_tiles (counted as they go, not
    // divided), into stage it % 2.
    auto load_tile = [&](int it, int qh, int q0) {
        int stage = it % 2;
        size_t at = (size_t)qh * t;
        float* row = small + stage * 3 * BQ;
        load_swizzled<D>(sm.staged(stage, 0), q + at * D, q0, t);
        load_swizzled<D>(sm.staged(stage, 1), dout + at * D, q0, t);
        load_row_values(row, row + BQ, row + 2 * BQ, lse + at, delta + at, start, q0, BQ, t);
        commit();
    };
    if (n_tiles > 0) load_tile(0, qh0, k0);

    float dv_acc[W / 8][4] = {}, dk_acc[W / 8][4] = {};
    if (n_tiles == 0) wait_loads<0>();  // no copy outlives the block
    for (int it = 0, qh = qh0, q0 = k0; it < group * n_tiles; it++) {
        int stage = it % 2, next_qh = qh, next_q0 = q0 + BQ;
        if (next_q0 == k0 + n_tiles * BQ) next_qh++, next_q0 = k0;
        load_next_wait(it + 1 < group * n_tiles, [&] { load_tile(it + 1, next_qh, next_q0); });
        fence_to_wgmma();
        __syncthreads();
        const float* lse_of = small + stage * 3 * BQ;
        const float* dl = lse_of + BQ;
        const float* lo_of = lse_of + 2 * BQ;
        unsigned qs = shared_addr(sm.staged(stage, 0)), dos = shared_addr(sm.staged(stage, 1));
        float s[BQ / 8][4], dp[BQ / 8][4];
        // P from S, dS from P and dP, or one of the two (a pair's roles).
        auto grads = [&](auto p, auto ds) {
            auto masked = [&](auto m) {
                key_grads<BQ, decltype(m)::value, decltype(p)::value, decltype(ds)::value>(
                    s, dp, keys, q0, c, t, lse_of, dl, lo_of, scale2, [](int, float&) {});
            };
            if (all_seen(q0, BQ, (int)lo_of[BQ - 1], k0, BK, t)) masked(Flag<false>{}); else masked(Flag<true>{});
        };
        // dS for the dQ kernel, where it reads them, from the A fragments of the dK products.
        auto hand_over = [&](const uint32_t (&ds_frags)[4][4]) {
            if (ds) store_ds(ds_tile(ds, qh, q0 / BQ, k0 / BK, t), ds_frags, warp, g, c);
        };
        if constexpr (!H::PAIR) {
            scores<D, 2>({s, dp}, {shared_addr(ks), shared_addr(vs)}, {qs, dos});  // S^T = K Q^T, dP^T = V dO^T
            grads(Flag<true>{}, Flag<true>{});
            // dV += P^T dO, dK += dS^T Q; meanwhile dS handed over.
            sums<D, 2>({dv_acc, dk_acc}, {s, dp}, {dos, qs}, 0, 1,
                       [&](const uint32_t (&a)[2][4][4]) { hand_over(a[1]); });
        } else {
            // Warpgroup 0 sums its half of dV while the other takes dS.
            pair_scores<D>(sm, wg, s, dp, {shared_addr(ks), shared_addr(vs)}, {qs, dos}, grads,
                           [&] { sums<D, 1, W>({dv_acc}, {s}, {dos}, 0, 2); });
            // Warpgroup 0 stores dS for the dQ kernel while its dK products run.
            if (wg == 0)
                sums<D, 1, W>({dk_acc}, {dp}, {qs}, 0, 2, [&](const uint32_t (&a)[1][4][4]) { hand_over(a[0]); });
            else
                sums<D, 2, W>({dv_acc, dk_acc}, {s, dp}, {dos, qs}, 1, 2);
        }
        __syncthreads();  // every product has read this stage before the tile after next overwrites it
        qh = next_qh, q0 = next_q0;
    }
    store_grads<D, W>(dst.k_rows(grid_head(), kv_heads), dst.row, dk_acc, keys, t, grad_scale(scale2),
                      dst.cos_of(bi, t, D), dst.sin_of(bi, t, D), 64 * wg);
    store_grads<D, W>(dst.v_rows(grid_head(), kv_heads), dst.row, dv_acc, keys, t, 1.f, nullptr, nullptr, 64 * wg);
}

// The dQ kernel's stages of K and V tiles (flash_attention.rs's `q_stages`): one at head dims 96 and 128, where
// it leaves room for three blocks an SM (its registers allow three), whose loads and products interleave
// instead; two at 256, where a pair's block fills the SM's registers either way.
template <int D> __device__ constexpr int q_stages() { return D == 96 || D == 128 ? 1 : 2; }

// dQ for 64 queries (grid_head() = batch * heads + query head), over the key tiles they see. First each row's
// delta = sum over d of dO O (dS = P (dP - delta)), written for the dK/dV kernel, which runs after this one.
template <int D>
__device__ void backward_q_hopper(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const bf16* o,
                                  const float* lse, float* delta, const float* start, GradRows dst, int t,
                                  int heads, int group, float scale2) {
    constexpr int STAGES = q_stages<D>();
    using H = HopperTiles<D, STAGES>;
    constexpr int BK = H::ROWS, BQ = H::ROWS, W = H::WIDTH;
    H sm = H::here();  // Q, dO; each stage's K, V; P and dS handed over; then each row's delta
    unsigned char *qs = sm.resident(0), *dos = sm.resident(1);
    float* dl_rows = sm.values();
    int wg = H::PAIR ? threadIdx.x / 128 : 0, warp = threadIdx.x / 32 - 4 * wg;  // as in backward_kv_hopper
    int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    int q0 = first_query(BQ);
    size_t head = (size_t)grid_head() * t * D, rows0 = (size_t)grid_head() * t;
    size_t kv = kv_head<D>(grid_head(), t, heads, group);
    start += (size_t)(grid_head() / heads) * t;
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
        lse2[h] = in ? lse[rows0 + rows[h]] * LOG2E : 0.f;
    }
    // delta: two threads a row, or four under a pair.
    row_deltas<D, H::THREADS>(dout, o, delta, head, rows0, q0, t, dl_rows);
    __syncthreads();  // the deltas are in
#pragma unroll
    for (int h = 0; h < 2; h++) dl[h] = dl_rows[rows[h] - q0];

    float acc[W / 8][4] = {};
    for (int it = 0, k0 = k_first; k0 < k_end; it++, k0 += BK) {
        bool more = k0 + BK < k_end;
        load_next_wait(STAGES == 2 && more, [&] { load(it + 1, k0 + BK); });
        fence_to_wgmma();
        __syncthreads();
        unsigned ks = shared_addr(sm.staged(it % STAGES, 0)), vs = shared_addr(sm.staged(it % STAGES, 1));
        float s[BK / 8][4], dp[BK / 8][4];
        // P from S, dS from P and dP, or one of the two (a pair's roles).
        auto grads = [&](auto p, auto ds) {
            auto masked = [&](auto m) {
                query_grads<BK, decltype(m)::value, decltype(p)::value, decltype(ds)::value>(s, dp, rows, lo, lse2,
                                                                                            dl, k0, c, scale2);
            };
            if (all_seen(q0, BQ, lo_last, k0, BK, t)) masked(Flag<false>{}); else masked(Flag<true>{});
        };
        if constexpr (!H::PAIR) {
            scores<D, 2>({s, dp}, {shared_addr(qs), shared_addr(dos)}, {ks, vs});  // S = Q K^T, dP = dO V^T
            grads(Flag<true>{}, Flag<true>{});
        } else {
            pair_scores<D>(sm, wg, s, dp, {shared_addr(qs), shared_addr(dos)}, {ks, vs}, grads, [] {});
        }
        sums<D, 1, W>({acc}, {dp}, {ks}, wg, H::PAIR ? 2 : 1);  // dQ += dS K
        __syncthreads();  // every product has read this stage before a later tile overwrites it
        if (STAGES == 1 && more) load(it + 1, k0 + BK);
    }
    int bi = grid_head() / heads;
    store_grads<D, W>(dst.q_rows(grid_head(), heads), dst.row, acc, rows, t, grad_scale(scale2),
                      dst.cos_of(bi, t, D), dst.sin_of(bi, t, D), 64 * wg);
}

// Where the dK/dV kernel hands over dS (ds_tile): the deltas first, for the dK/dV kernel,
// by a block per 64 rows of each head (grid_head() = batch * heads + query head)...
template <int D> __device__ void deltas_hopper(const bf16* dout, const bf16* o, float* delta, int t) {
    row_deltas<D, 128>(dout, o, delta, (size_t)grid_head() * t * D, (size_t)grid_head() * t, first_query(64), t,
                       nullptr);
}

// ... and after it, dQ for 64 queries from its tiles of dS: dQ += dS K over the key tiles they see, one product a
// tile with both operands in shared memory and read MN-major (dS's rows are keys, K's rows keys), ds_stages
// tiles of each in flight; its rows are the queries in ds_tile's order. The tiles of the two kernels are the same
// pairs (the first key tile of the first query's window to the diagonal). One warpgroup holds all D columns of
// its sums (128 registers a thread at D = 256: no pair is needed, as there are no dK and dV to hold beside them).
// Three stages (73 KB, three blocks an SM) to head dim 128; two at 256 (81 KB), so that two blocks share an SM
// (three there, one block an SM, trained Falcon3-1B 0.4% slower: BENCHMARKS.md). flash_attention.rs's
// `ds_stages` sizes the shared memory to match.
template <int D> __device__ constexpr int ds_stages() { return D > 128 ? 2 : 3; }
template <int D>
__device__ void backward_q_from_ds(const bf16* k, const bf16* ds, const float* start, GradRows dst, int t, int heads,
                                   int group, float scale2) {
    using H = HopperTiles<D>;
    constexpr int BQ = H::ROWS, BK = H::ROWS, PANEL = H::ROWS * 128, DS_TILE = H::ROWS * 128;
    constexpr int DS_STAGES = ds_stages<D>();
    unsigned char* base = H::here().base;  // DS_STAGES K tiles, then as many of dS
    auto k_tile = [&](int i) { return base + i % DS_STAGES * H::TILE; };
    auto ds_at = [&](int i) { return base + DS_STAGES * H::TILE + i % DS_STAGES * DS_TILE; };
    int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4;
    int q0 = first_query(BQ);
    size_t kv = kv_head<D>(grid_head(), t, heads, group);
    start += (size_t)(grid_head() / heads) * t;
    QueryRows w(start, q0, BQ, BK, warp, g, t);  // its key range (its rows are the stored order's, below)
    int tiles = (w.k_end - w.k_first + BK - 1) / BK;
    auto load = [&](int i) {
        if (i < tiles) {
            int k0 = w.k_first + i * BK;
            load_swizzled<D, 128>(k_tile(i), k + kv, k0, t);
            load_swizzled<64, 128, true>(ds_at(i), ds_tile(ds, grid_head(), q0 / BQ, k0 / BK, t), 0, BK);
        }
        commit();  // empty past the last tile, so that every step waits for the same count
    };
#pragma unroll
    for (int i = 0; i < DS_STAGES - 1; i++) load(i);
    float acc[D / 8][4] = {};
    for (int i = 0; i < tiles; i++) {
        load(i + DS_STAGES - 1);
        wait_loads<DS_STAGES - 1>();
        fence_to_wgmma();
        __syncthreads();
        unsigned a = shared_addr(ds_at(i)), b = shared_addr(k_tile(i));
        auto da = sw128_descriptor(a, PANEL, 1024), db = sw128_descriptor(b, PANEL, 1024);
        keep_in_place(reinterpret_cast<float(&)[D / 2]>(acc));
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++)
#pragma unroll
            for (int p = 0; p < H::PANELS; p++) {
                auto ad = advance(da, kk * 2048), bd = advance(db, p * PANEL + kk * 2048);
                if (D - 64 * p >= 64)
                    wgmma_bf16<1, 1>(reinterpret_cast<float(&)[32]>(acc[8 * p]), ad, bd);
                else
                    wgmma_bf16<1, 1>(reinterpret_cast<float(&)[16]>(acc[8 * p]), ad, bd);
            }
        wgmma_commit();
        wgmma_wait<0>();
        keep_in_place(reinterpret_cast<float(&)[D / 2]>(acc));
        __syncthreads();  // every product has read this stage before a later tile's loads overwrite it
    }
    wait_loads<0>();  // no copy outlives the block
    int rows[2] = {q0 + ds_query(16 * warp + g), q0 + ds_query(16 * warp + g + 8)};
    int bi = grid_head() / heads;
    store_grads<D>(dst.q_rows(grid_head(), heads), dst.row, acc, rows, t, grad_scale(scale2), dst.cos_of(bi, t, D),
                   dst.sin_of(bi, t, D));
}

// The forward for 64 queries (grid_head() = batch * heads + query head), one warpgroup, over the key tiles they
// see: S = Q K^T with both operands in shared memory, the online softmax in registers (flash_common.cuh, the
// portable forward's), O += P V with P from registers and V read MN-major (`sums`). Q stays resident; K and V
// have a tile each, loaded in flash attention 2's order: the next K during this tile's softmax and P V, the next
// V during the next S. Blocks an SM interleave one another's products and softmax: four at D = 64 and 96 (up to
// 48 KB of tiles and 128 registers), three at 128 (157 registers), two at 256 (97 KB); two stages of K and V,
// half as many blocks, ran 16-38% slower (BENCHMARKS.md). Reference:
// train::layers::flash_attention_forward_reference.
template <int D>
__device__ void forward_hopper(const bf16* q, const bf16* k, const bf16* v, const float* start, bf16* o, float* lse,
                               int t, int heads, int group, float scale2) {
    using H = HopperTiles<D, 1, 1>;
    constexpr int BQ = H::ROWS, BK = H::ROWS, NT = 128;
    H sm = H::here();  // Q; K, V
    unsigned char *qs = sm.resident(0), *ks = sm.staged(0, 0), *vs = sm.staged(0, 1);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    int q0 = first_query(BQ);
    size_t head = (size_t)grid_head() * t * D, kv = kv_head<D>(grid_head(), t, heads, group);
    start += (size_t)(grid_head() / heads) * t;
    load_swizzled<D, NT>(qs, q + head, q0, t);
    commit();
    // The window starts while Q loads: the first key tile depends on them.
    QueryRows w(start, q0, BQ, BK, warp, g, t);
    load_swizzled<D, NT>(ks, k + kv, w.k_first, t);
    commit();
    load_swizzled<D, NT>(vs, v + kv, w.k_first, t);
    commit();

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, acc[D / 8][4] = {};
    for (int k0 = w.k_first; k0 < w.k_end; k0 += BK) {
        bool more = k0 + BK < w.k_end;
        wait_loads<1>();  // Q and this K; V may be in flight
        fence_to_wgmma();
        __syncthreads();
        float s[BK / 8][4];
        scores<D, 1>({s}, {shared_addr(qs)}, {shared_addr(ks)});  // S = Q K^T
        __syncthreads();  // every warp's products have read K
        if (more) {
            load_swizzled<D, NT>(ks, k + kv, k0 + BK, t);
            commit();
        }
        online_softmax<BK, D>(s, acc, m, l, w.rows, w.lo, k0, c, !all_seen(q0, BQ, w.lo_last, k0, BK, t), scale2);
        if (more) wait_loads<1>(); else wait_loads<0>();  // V; the next K may be in flight
        fence_to_wgmma();
        __syncthreads();
        sums<D, 1>({acc}, {s}, {shared_addr(vs)});  // O += P V
        __syncthreads();  // every warp's products have read V
        if (more) {
            load_swizzled<D, NT>(vs, v + kv, k0 + BK, t);
            commit();
        }
    }
    store_output<D>(acc, m, l, w.rows, c, o + head, lse + (size_t)grid_head() * t, t);
}
#define HOPPER_FORWARD(D) forward_hopper<D>(q, k, v, start, o, lse, t, heads, group, scale2);
#define HOPPER_KV(D) backward_kv_hopper<D>(q, k, v, dout, lse, delta, start, dst, ds, t, heads, group, scale2);
#define HOPPER_Q(D) backward_q_hopper<D>(q, k, v, dout, o, lse, delta, start, dst, t, heads, group, scale2);
#define HOPPER_DELTAS(D) deltas_hopper<D>(dout, o, delta, t);
#define HOPPER_Q_DS(D) backward_q_from_ds<D>(k, ds, start, dst, t, heads, group, scale2);
#else
#define HOPPER_FORWARD(D)
#define HOPPER_KV(D)
#define HOPPER_Q(D)
#define HOPPER_DELTAS(D)
#define HOPPER_Q_DS(D)
#endif

// flash_forward_hopper_{64,96,128,256} and flash_backward_{kv,q}_hopper_{D}, with flash_forward_{D}'s and
// flash_backward_{kv,q}_{D}'s arguments (the dK/dV kernel's `ds` after `dst`: where not null, the dS tiles it
// writes); 128 threads a block, the backward's 256 (a pair) at head dim 256.
#define FLASH_HOPPER(D)                                                                                           \
    extern "C" __global__ void __launch_bounds__(128)                                                             \
        flash_forward_hopper_##D(const bf16* q, const bf16* k, const bf16* v, const float* start, bf16* o,        \
                                 float* lse, int t, int heads, int group, float scale2) {                         \
        follow_previous();                                                                                        \
        HOPPER_FORWARD(D)                                                                                         \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(D > 128 ? 256 : 128)                                             \
        flash_backward_kv_hopper_##D(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,               \
                                     const float* lse, const float* delta, const float* start, GradRows dst,      \
                                     bf16* ds, int t, int heads, int group, float scale2) {                       \
        follow_previous();                                                                                        \
        HOPPER_KV(D)                                                                                              \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(D > 128 ? 256 : 128)                                             \
        flash_backward_q_hopper_##D(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const bf16* o, \
                                    const float* lse, float* delta, const float* start, GradRows dst, int t,      \
                                    int heads, int group, float scale2) {                                         \
        follow_previous();                                                                                        \
        HOPPER_Q(D)                                                                                               \
    }
// flash_deltas_hopper_{D} and flash_backward_q_ds_hopper_{D}, a warpgroup a block.
#define FLASH_HOPPER_DS(D)                                                                                        \
    extern "C" __global__ void __launch_bounds__(128)                                                             \
        flash_deltas_hopper_##D(const bf16* dout, const bf16* o, float* delta, int t) {                           \
        follow_previous();                                                                                        \
        HOPPER_DELTAS(D)                                                                                          \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(128)                                                             \
        flash_backward_q_ds_hopper_##D(const bf16* k, const bf16* ds, const float* start, GradRows dst, int t,    \
                                       int heads, int group, float scale2) {                                      \
        follow_previous();                                                                                        \
        HOPPER_Q_DS(D)                                                                                            \
    }
FLASH_HOPPER(64)
FLASH_HOPPER(96)
FLASH_HOPPER(128)
FLASH_HOPPER(256)
FLASH_HOPPER_DS(64)
FLASH_HOPPER_DS(96)
FLASH_HOPPER_DS(128)
FLASH_HOPPER_DS(256)
