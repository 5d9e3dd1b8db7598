// Flash attention's dK/dV kernel on Hopper's warpgroup products (wgmma), for heads of 64, 96 and 128 dims: the
// same work as flash_attention.cu's backward_kv (which other cards and head_dim 256 run), whose products are
// per-warp mma.syncs that each read their B operand from shared memory through ldmatrix. There the four
// warps of a block each read the whole query tile for every product, and shared memory's bandwidth, not the
// tensor cores, bounded the kernel (161 TFLOP/s at -large's shape on an H100). A wgmma reads its shared
// operands once for the warpgroup's 64 rows.
//
// A block (one warpgroup) takes 64 keys of a key/value head. For each query tile of 64 rows that sees them
// (of each query head of the group): S^T = K Q^T and dP^T = V dO^T (keys as rows, both operands from shared
// memory), the probabilities and score gradients in registers (flash_common.cuh, as backward_kv), then
// dV += P^T dO and dK += dS^T Q with P^T and dS^T from registers and dO and Q read transposed (MN-major) from
// the same tiles. Tiles sit in shared memory under the 128-byte swizzle wgmma reads, in panels of 64 columns
// (a row of a panel is 128 bytes; at D = 96 the second panel's rows are half used), loaded by cp.async; the
// next query tile's loads run during this one's products. Sums are in f32 in a fixed order (the same inputs
// give the same bits), but not the order of backward_kv's, so the two kernels' gradients differ in rounding.
// Reference: train::layers::flash_attention_backward_reference.
#include "flash_common.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#include "hopper.cuh"

// The kernel's shape and dynamic shared memory (flash_attention.rs's `HopperKv` sizes the launch by the same
// formula): K, V, then two stages of Q and dO tiles, each PANELS panels of rows x 128 bytes, then each stage's
// per-row values (lse in base 2, delta, window start), after 1024 bytes of room to align the tiles.
template <int D> struct HopperKv {
    static constexpr int BK = 64, BQ = 64, PANELS = (D + 63) / 64, THREADS = 128;
    static constexpr int KV_TILE = PANELS * BK * 128, Q_TILE = PANELS * BQ * 128;
    static constexpr int TILES = 2 * KV_TILE + 4 * Q_TILE;
};

// Rows row0 .. row0 + rows of a [t, D] head (zeros past t) into a swizzled tile of `rows` rows: 16-byte chunk
// c of row r to panel c / 8, at r * 128 + (c % 8 ^ r % 8) * 16.
template <int D> __device__ void load_swizzled(unsigned char* tile, const bf16* g, int row0, int rows, int t) {
    for (int ch = threadIdx.x; ch < rows * D / 8; ch += HopperKv<D>::THREADS) {
        int r = ch / (D / 8), c = ch % (D / 8);
        bool in = row0 + r < t;
        unsigned dst = shared_addr(tile + c / 8 * rows * 128 + r * 128 + ((c % 8 ^ r % 8) << 4));
        const bf16* src = g + (size_t)(in ? row0 + r : 0) * D + c * 8;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(in ? 16 : 0));
    }
}

template <int D>
__device__ void backward_kv_hopper(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
                                   const float* delta, const float* start, bf16* dk, bf16* dv, int t, int heads,
                                   int group, float scale2) {
    using H = HopperKv<D>;
    constexpr int BK = H::BK, BQ = H::BQ, P = H::PANELS;
    extern __shared__ unsigned char hopper_smem_raw[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(((uintptr_t)hopper_smem_raw + 1023) & ~(uintptr_t)1023);
    unsigned char *ks = smem, *vs = smem + H::KV_TILE;
    auto q_tile = [&](int stage) { return smem + 2 * H::KV_TILE + stage * 2 * H::Q_TILE; };
    auto do_tile = [&](int stage) { return q_tile(stage) + H::Q_TILE; };
    float* small = reinterpret_cast<float*>(smem + H::TILES);  // per stage: lse2[BQ], delta[BQ], lo[BQ]
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    int k0 = blockIdx.x * BK;  // the keys seen by the most queries first
    int kv_heads = heads / group, bi = blockIdx.y / kv_heads;
    size_t head = (size_t)blockIdx.y * t * D;
    int qh0 = bi * heads + blockIdx.y % kv_heads * group;  // the group's first query head, of [batch * heads]
    start += (size_t)bi * t;
    int keys[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
    // The query tiles that see these keys: from k0 on, those whose first row's window starts in them.
    int n_tiles = 0;
    for (int base = 0;; base += H::THREADS) {
        int i = k0 + (base + threadIdx.x) * BQ;
        int n = __syncthreads_count(i < t && (int)start[i] < k0 + BK);
        n_tiles += n;
        if (n < H::THREADS) break;
    }
    // Step `it` takes query head qh0 + it / n_tiles and its query tile it % n_tiles, into stage it % 2.
    auto load_tile = [&](int it) {
        size_t qh = qh0 + it / n_tiles;
        int q0 = k0 + it % n_tiles * BQ, stage = it % 2;
        load_swizzled<D>(q_tile(stage), q + qh * t * D, q0, BQ, t);
        load_swizzled<D>(do_tile(stage), dout + qh * t * D, q0, BQ, t);
        commit();
        float* row = small + stage * 3 * BQ;
        int i = q0 + threadIdx.x;
        if (threadIdx.x < BQ) {
            bool in = i < t;
            row[threadIdx.x] = in ? lse[qh * t + i] * 1.44269504089f : 0.f;
            row[BQ + threadIdx.x] = in ? delta[qh * t + i] : 0.f;
            reinterpret_cast<int*>(row)[2 * BQ + threadIdx.x] = in ? (int)start[i] : NO_KEYS;
        }
    };
    load_swizzled<D>(ks, k + head, k0, BK, t);
    load_swizzled<D>(vs, v + head, k0, BK, t);
    if (n_tiles > 0) load_tile(0);

    float dv_acc[D / 8][4] = {}, dk_acc[D / 8][4] = {};
    for (int it = 0; it < group * n_tiles; it++) {
        int q0 = k0 + it % n_tiles * BQ, stage = it % 2;
        if (it + 1 < group * n_tiles) {
            load_tile(it + 1);
            wait_loads<1>();
        } else {
            wait_loads<0>();
        }
        fence_to_wgmma();
        __syncthreads();
        const float* lse2 = small + stage * 3 * BQ;
        const float* dl = lse2 + BQ;
        const int* lo_of = reinterpret_cast<const int*>(lse2 + 2 * BQ);
        unsigned qs = shared_addr(q_tile(stage)), dos = shared_addr(do_tile(stage));
        unsigned ka = shared_addr(ks), va = shared_addr(vs);

        // S^T = K Q^T, dP^T = V dO^T: k runs along D, 16 at a time (32 bytes within a panel's rows).
        float s[BQ / 8][4] = {}, dp[BQ / 8][4] = {};
        auto& s_flat = reinterpret_cast<float(&)[BQ / 2]>(s);
        auto& dp_flat = reinterpret_cast<float(&)[BQ / 2]>(dp);
        keep_in_place(s_flat);
        keep_in_place(dp_flat);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            unsigned at = kk % 4 * 32;  // within the panel's rows
            unsigned kv_panel = kk / 4 * BK * 128, q_panel = kk / 4 * BQ * 128;
            wgmma_bf16(s_flat, sw128_descriptor(ka + kv_panel + at, 16, 1024),
                       sw128_descriptor(qs + q_panel + at, 16, 1024));
            wgmma_bf16(dp_flat, sw128_descriptor(va + kv_panel + at, 16, 1024),
                       sw128_descriptor(dos + q_panel + at, 16, 1024));
        }
        wgmma_commit();
        wgmma_wait<0>();
        keep_in_place(s_flat);
        keep_in_place(dp_flat);

        auto grads = [&](auto tag) {
            constexpr bool masked = decltype(tag)::value;
#pragma unroll
            for (int n = 0; n < BQ / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int col = n * 8 + 2 * c + e % 2, qi = q0 + col, lo = masked ? lo_of[col] : 0;
                    bool seen = !masked || sees(qi, lo, keys[e / 2]);
                    float& p = s[n][e];
                    p = prob(p, seen, lse2[col], scale2);
                    dp[n][e] = score_grad(p, dp[n][e], seen, masked && lo == qi, dl[col], scale2);
                }
        };
        if (all_seen(q0, BQ, lo_of[BQ - 1], k0, BK, t)) grads(Flag<false>{}); else grads(Flag<true>{});

        // dV += P^T dO, dK += dS^T Q: k runs along the queries, 16 rows (2048 bytes of a panel) at a time; n
        // along D, a panel (64 columns, or the 32 left at D = 96) a product.
        uint32_t pa[BQ / 16][4], da[BQ / 16][4];
#pragma unroll
        for (int kk = 0; kk < BQ / 16; kk++) {
            as_a(pa[kk], s[2 * kk], s[2 * kk + 1]);
            as_a(da[kk], dp[2 * kk], dp[2 * kk + 1]);
        }
        auto& pa_flat = reinterpret_cast<uint32_t(&)[BQ / 4]>(pa);
        auto& da_flat = reinterpret_cast<uint32_t(&)[BQ / 4]>(da);
        auto& dv_flat = reinterpret_cast<float(&)[D / 2]>(dv_acc);
        auto& dk_flat = reinterpret_cast<float(&)[D / 2]>(dk_acc);
        keep_in_place(dv_flat);
        keep_in_place(dk_flat);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BQ / 16; kk++)
#pragma unroll
            for (int p = 0; p < P; p++) {
                unsigned at = p * BQ * 128 + kk * 2048;
                auto b_do = sw128_descriptor(dos + at, BQ * 128, 1024), b_q = sw128_descriptor(qs + at, BQ * 128, 1024);
                if (D - 64 * p >= 64) {
                    wgmma_bf16_t(reinterpret_cast<float(&)[32]>(dv_acc[8 * p]), pa[kk], b_do);
                    wgmma_bf16_t(reinterpret_cast<float(&)[32]>(dk_acc[8 * p]), da[kk], b_q);
                } else {
                    wgmma_bf16_t(reinterpret_cast<float(&)[16]>(dv_acc[8 * p]), pa[kk], b_do);
                    wgmma_bf16_t(reinterpret_cast<float(&)[16]>(dk_acc[8 * p]), da[kk], b_q);
                }
            }
        wgmma_commit();
        wgmma_wait<0>();
        keep_in_place(dv_flat);
        keep_in_place(dk_flat);
        keep_in_place(pa_flat);
        keep_in_place(da_flat);
        __syncthreads();  // every product has read this stage before the tile after next overwrites it
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
        if (keys[h] >= t) continue;
        size_t at = head + (size_t)keys[h] * D + 2 * c;
#pragma unroll
        for (int n = 0; n < D / 8; n++) {
            *reinterpret_cast<uint32_t*>(dk + at + n * 8) = pack(dk_acc[n][2 * h], dk_acc[n][2 * h + 1]);
            *reinterpret_cast<uint32_t*>(dv + at + n * 8) = pack(dv_acc[n][2 * h], dv_acc[n][2 * h + 1]);
        }
    }
}
#define HOPPER_BODY(D) backward_kv_hopper<D>(q, k, v, dout, lse, delta, start, dk, dv, t, heads, group, scale2);
#else
#define HOPPER_BODY(D)
#endif

// flash_backward_kv_hopper_{64,96,128}, with flash_backward_kv_{D}'s arguments.
#define FLASH_KV_HOPPER(D)                                                                                        \
    extern "C" __global__ void __launch_bounds__(128)                                                             \
        flash_backward_kv_hopper_##D(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,               \
                                     const float* lse, const float* delta, const float* start, bf16* dk,          \
                                     bf16* dv, int t, int heads, int group, float scale2) {                       \
        HOPPER_BODY(D)                                                                                            \
    }
FLASH_KV_HOPPER(64)
FLASH_KV_HOPPER(96)
FLASH_KV_HOPPER(128)
