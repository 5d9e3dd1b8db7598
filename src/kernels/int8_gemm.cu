// An int8 x int8 GEMM with bf16 output on Hopper's tensor cores (wgmma with s8 inputs and s32 sums, at twice
// bf16's rate): out[m, n] = round_bf16(sum_k a[m, k] b[n, k] * a_scale[m] * b_scale[n]), both operands
// row-major with k contiguous (a BitLinear's int8 activations and its ternary weights as int8), plus
// residual[m, n] where given (the residual stream a block's o_proj or down adds to; 128-column tiles only),
// added to the rounded product and rounded again, as a separate bf16 add would. The sums are exact integers;
// the scales are applied once in f32, in that order. Compiled for sm_90a (build.rs): on other cards the module
// is empty and kernels::int8_gemm declines.
//
// A block takes 128 x BN tiles of the output in turn (BN 128 or 256; one block an SM). Its first warpgroup's
// first thread loads the operands with the tensor memory accelerator (TMA: one instruction a tile of 128
// bytes of k, zero past m and n, laid out as wgmma's 128-byte swizzle expects: row r's 16-byte chunk c at
// r * 128 + (c ^ r % 8) * 16, each operand's tile 1024-byte aligned) into STAGES shared-memory stages; the two
// other warpgroups multiply, 64 rows each, every wgmma m64nBNk32. Each stage has two mbarriers: `full` (the
// TMA's bytes landed) and `empty` (the wgmmas that read it finished), so the loads run STAGES steps ahead of
// the products without a block barrier, into the next tile's while the multiplying warpgroups write the last
// one's outputs.
//
// The rows kernels write their outputs through shared memory: each multiplying warpgroup puts 64 rows x 32
// columns of bf16 at a time into one of its two buffers (under the 64-byte swizzle: row r's 16-byte chunk c at
// r * 64 + (c ^ r / 2 % 4) * 16, so that a warp's stores take 32 banks) and one thread hands the buffer to the
// TMA, which writes it to global memory (clipped at m and n) while the warpgroup goes on to the next buffer and
// the next tile's products. Each thread storing its column pairs straight to global memory (four bytes, half a
// sector) held the products back: without those stores -large's gate/up at 6,144 rows ran 1.35x faster (H100).
//
// With CLUSTER 2 the blocks run in clusters of two that take pairs of tiles one above the other (rows m0 and
// m0 + 128, the same columns): each block loads its own rows of a and half of the pair's columns of b,
// multicast into both blocks' stages, so it reads 3/4 (BN 128) or 2/3 (BN 256) of the bytes it multiplies
// from L2. A stage's `full` then counts the peer's half of b too, and its `empty` the peer's products (the
// peer's producer writes into it). One kernel for each BN and CLUSTER (int8_gemm.rs picks by the shape).
//
// The `heads` kernels (HD > 0) write the q/k/v projection's output as attention reads it instead of rows: its
// columns are the q heads, then the k heads, then the v heads, of HD channels each, and each goes to its own
// [b, heads, t, HD] tensor, q and k turned by RoPE (what qkv_rope did in a pass over all three after the GEMM).
// A tile holds whole heads (BN a multiple of HD: 192 columns for heads of 96), and a head's channel pair (j, j +
// HD / 2) is one thread's: the accumulators of columns 8 g + 2 (lane % 4) and 8 (g + HD / 16) + 2 (lane % 4).
// Each value is scaled and rounded to bf16 as the rows' epilogue writes it, then turned and rounded once, as
// qkv_rope does: the same bits as the two passes.
#include "common.cuh"

#define IG_BM 128
#define IG_BK 128
// The columns of a rows kernel's output buffer (64 rows of bf16: 64 bytes a row), and its bytes.
#define IG_OUT_COLS 32
#define IG_OUT_BYTES (64 * IG_OUT_COLS * 2)

// A TMA descriptor (CUtensorMap), opaque.
struct alignas(64) TensorMap {
    unsigned long long opaque[16];
};

// Mirrors int8_gemm.rs's `GemmParams`: the operands as TMA descriptors (cuTensorMapEncodeTiled), and the rows
// kernels' output `out` (bf16 [m, n], in boxes of 64 rows x IG_OUT_COLS under the 64-byte swizzle); each row's
// and each column's scale (f32) or null (1), and what the output adds to (bf16 [m, n], not `out`; its TMA
// descriptor as `out`'s) or null (ignored by the kernels of 256 columns, which have no room for its slabs); for
// the heads kernels the three outputs instead of `out`, RoPE's angles of each row (cos and sin [m, HD / 2],
// bf16), the rows' sequence length t (row = batch row t + position) and the q and k/v heads.
struct Int8Gemm {
    TensorMap a;
    TensorMap b;
    TensorMap out;
    TensorMap residual_map;
    const float* a_scale;
    const float* b_scale;
    const bf16* residual;
    int m, n, k;
    bf16* heads[3];
    const bf16* cos;
    const bf16* sin;
    int t, q_heads, kv_heads;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#include "hopper.cuh"

// The operands' descriptor: K-major rows of 128 bytes from `addr` (the start of 8-row groups 1024 bytes apart).
__device__ __forceinline__ unsigned long long descriptor(unsigned addr) { return sw128_descriptor(addr, 16, 1024); }

// d += a b for a 64 x 32 slab of a and an N x 32 slab of b (k-major, in shared memory).
__device__ __forceinline__ void wgmma_k32(int (&d)[64], unsigned long long a, unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p;\n}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
        : "l"(a), "l"(b), "r"(1));
}

__device__ __forceinline__ void wgmma_k32(int (&d)[96], unsigned long long a, unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n192k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, %96, %97, p;\n}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]), "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]), "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]), "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]), "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95])
        : "l"(a), "l"(b), "r"(1));
}

__device__ __forceinline__ void wgmma_k32(int (&d)[128], unsigned long long a, unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p;\n}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]), "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]), "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]), "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]), "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]), "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]), "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]), "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]), "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
        : "l"(a), "l"(b), "r"(1));
}

// A stage's mbarriers (in shared memory at `bar`): made for `count` arrivals a phase; waited on until the
// phase of the given parity has finished; arrived at; arrived at by the producer, which also tells it how
// many bytes the TMA will bring.
__device__ __forceinline__ void barrier_init(unsigned bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void barrier_wait(unsigned bar, int parity) {
    asm volatile(
        "{\n.reg .pred p;\nWAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
__device__ __forceinline__ void barrier_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Arrives at the barrier at the same place in block `rank` of the cluster (this block's own included). The
// release is the CTA's (the default), as for a local arrival: at the cluster's scope it also waited for the
// thread's earlier global stores (the last tile's outputs), and the kernel ran 1.2-1.6x slower.
__device__ __forceinline__ void barrier_arrive_in(unsigned bar, unsigned rank) {
    asm volatile(
        "{\n.reg .b32 r;\nmapa.shared::cluster.u32 r, %0, %1;\n"
        "mbarrier.arrive.shared::cluster.b64 _, [r];\n}\n" ::"r"(bar),
        "r"(rank)
        : "memory");
}
__device__ __forceinline__ void barrier_expect(unsigned bar, int bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// The box at column (or byte of k) kb, row `row` of the matrix `map` describes (an operand's rows and 128 bytes
// of k; the residual's 64 rows and IG_OUT_COLS columns) into `dst`, the barrier at `bar` told of its bytes: of
// this block only (`blocks` 0), or of every block of the cluster in `blocks` (a bit each), at the same places.
__device__ __forceinline__ void tma_load(unsigned dst, const TensorMap* map, int kb, int row, unsigned bar,
                                         unsigned short blocks = 0) {
    auto m = reinterpret_cast<unsigned long long>(map);
    if (blocks == 0)
        asm volatile(
            "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::
                "r"(dst),
            "l"(m), "r"(kb), "r"(row), "r"(bar)
            : "memory");
    else
        asm volatile(
            "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
            " [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
            "l"(m), "r"(kb), "r"(row), "r"(bar), "h"(blocks)
            : "memory");
}
// The box at (col, row) of the matrix `map` describes from the shared memory at `src`, as one bulk group; the
// wait until no more than N of this thread's groups are still reading shared memory; the fence that makes this
// thread's shared-memory stores visible to the TMA (the async proxy).
__device__ __forceinline__ void tma_store(const TensorMap* map, int col, int row, unsigned src) {
    asm volatile(
        "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n"
        "cp.async.bulk.commit_group;\n" ::"l"(reinterpret_cast<unsigned long long>(map)),
        "r"(col), "r"(row), "r"(src)
        : "memory");
}
template <int N> __device__ __forceinline__ void tma_stores_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_to_tma() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// This block's rank in its cluster, its cluster's index in the grid, and the grid's clusters.
#define IG_SPECIAL(name, reg)                                       \
    __device__ __forceinline__ int name() {                         \
        unsigned v;                                                 \
        asm volatile("mov.u32 %0, %%" reg ";\n" : "=r"(v));         \
        return (int)v;                                              \
    }
IG_SPECIAL(cluster_rank, "cluster_ctarank")
IG_SPECIAL(cluster_index, "clusterid.x")
IG_SPECIAL(cluster_count, "nclusterid.x")
// Every thread of the cluster's blocks (that has not exited) here: the barriers' initialization seen by the
// peer before it multicasts into them or arrives at them.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// RoPE's angles of this thread's channel pairs 8 g + 2 (lane % 4), + 1 (g < HD / 16) in rows r0 and r0 + 8 (as
// bf16 pairs: cos, sin), where the tile from column n0 holds q or k heads. Read before the epilogue's stores, which
// might alias them: read between them, each load would wait for the stores before it.
template <int HD> struct Angles {
    uint32_t at[2][HD / 16][2];
    static_assert(HD % 16 == 0, "a head's halves of whole 8-column groups");
    __device__ __forceinline__ void load(const Int8Gemm& p, int n0, int r0, int lane) {
        bool turned = n0 < (p.q_heads + p.kv_heads) * HD;
#pragma unroll
        for (int h = 0; h < 2; h++)
#pragma unroll
            for (int g = 0; g < HD / 16; g++) {
                int row = r0 + 8 * h;
                size_t i = (size_t)row * (HD / 2) + 8 * g + 2 * (lane % 4);
                bool in = turned && row < p.m;
                at[h][g][0] = in ? *reinterpret_cast<const uint32_t*>(p.cos + i) : 0u;
                at[h][g][1] = in ? *reinterpret_cast<const uint32_t*>(p.sin + i) : 0u;
            }
    }
};
// The rows' kernels turn nothing.
template <> struct Angles<0> {
    __device__ __forceinline__ void load(const Int8Gemm&, int, int, int) {}
};

// The heads kernels' epilogue for one tile (see the top): accumulators d of rows r0 and r0 + 8, each row's
// scale sa, the tile's column scales (from column n0) in shared memory, the rows' angles.
template <int BN, int HD>
__device__ __forceinline__ void store_heads(const Int8Gemm& p, const int (&d)[BN / 2], const float (&sa)[2],
                                            const float* col_scales, const Angles<HD>& angles, int n0, int r0,
                                            int lane) {
    constexpr int HALF = HD / 16;  // a head's first half in 8-column groups; the second half lies HALF further
    int c2 = 2 * (lane % 4), t = p.t, q_heads = p.q_heads, kv_heads = p.kv_heads;
    // Each row's batch row and position, once (the parameters are read once: a store might alias a load).
    int bi[2], ti[2];
    bool in[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        int row = r0 + 8 * h;
        in[h] = row < p.m, bi[h] = row / t, ti[h] = row - bi[h] * t;
    }
#pragma unroll
    for (int hh = 0; hh < BN / HD; hh++) {
        int head = n0 / HD + hh;  // of the projection's q, k and v heads
        if (n0 + hh * HD >= p.n) continue;
        int part = head < q_heads ? 0 : head < q_heads + kv_heads ? 1 : 2;
        int of_part = head - (part > 0 ? q_heads : 0) - (part > 1 ? kv_heads : 0);
        int heads = part == 0 ? q_heads : kv_heads;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            if (!in[h]) continue;
            // Channel 0 of this head in this row, then the thread's pairs at constant offsets from it.
            bf16* out = p.heads[part] + (((size_t)bi[h] * heads + of_part) * t + ti[h]) * HD + c2;
#pragma unroll
            for (int g = 0; g < HALF; g++) {
                int g1 = hh * HD / 8 + g, g2 = g1 + HALF;
                float2 s1 = *reinterpret_cast<const float2*>(col_scales + 8 * g1 + c2);
                float2 s2 = *reinterpret_cast<const float2*>(col_scales + 8 * g2 + c2);
                float x1[2], x2[2];
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    x1[e] = round_bf16((float)d[4 * g1 + 2 * h + e] * sa[h] * (e ? s1.y : s1.x));
                    x2[e] = round_bf16((float)d[4 * g2 + 2 * h + e] * sa[h] * (e ? s2.y : s2.x));
                }
                if (part < 2) {
                    float2 c = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&angles.at[h][g][0]));
                    float2 s = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&angles.at[h][g][1]));
                    rope_turn(x1[0], x2[0], c.x, s.x);
                    rope_turn(x1[1], x2[1], c.y, s.y);
                }
                *reinterpret_cast<__nv_bfloat162*>(out + 8 * g) = __floats2bfloat162_rn(x1[0], x1[1]);
                *reinterpret_cast<__nv_bfloat162*>(out + 8 * g + HD / 2) = __floats2bfloat162_rn(x2[0], x2[1]);
            }
        }
    }
}

template <int BN, int STAGES, int CLUSTER, int HD>
__device__ __forceinline__ void int8_gemm_tiles(const Int8Gemm& p) {
    constexpr int A_BYTES = IG_BM * IG_BK, STAGE_BYTES = (IG_BM + BN) * IG_BK, B_PART = BN / CLUSTER * IG_BK;
    // The rows kernels' output buffers: two for each multiplying warpgroup. The 128-column ones add the residual
    // (ADDS): each multiplying warpgroup's 64 rows of it come into its slab (as IG_OUT_COLS-column boxes laid out
    // as the buffers are) by the TMA while the products run.
    constexpr bool ADDS = BN == 128 && HD == 0;
    constexpr int OUT_BYTES = HD == 0 ? 2 * 2 * IG_OUT_BYTES : 0, SLAB = 64 * BN * 2, SLABS = ADDS ? 2 * SLAB : 0;
    static_assert(BN % (2 * IG_OUT_COLS) == 0, "a tile's buffers alternate alike in every tile");
    extern __shared__ unsigned char smem_raw[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
    // The stages, the output buffers, the residual slabs, then the barriers: full[s] at 8 s, empty[s] at 8
    // (STAGES + s), each multiplying warpgroup's residual barrier at 8 (2 STAGES + c).
    unsigned char* out_buffers = smem + STAGES * STAGE_BYTES;
    unsigned char* slabs = out_buffers + OUT_BYTES;
    unsigned bars = shared_addr(slabs + SLABS);
    auto full = [&](int s) { return bars + 8 * s; };
    auto empty = [&](int s) { return bars + 8 * (STAGES + s); };
    auto residual_in = [&](int c) { return bars + 8 * (2 * STAGES + c); };
    int t = threadIdx.x, wg = t / 128, rank = CLUSTER > 1 ? cluster_rank() : 0;
    int first = CLUSTER > 1 ? cluster_index() : blockIdx.x, stride = CLUSTER > 1 ? cluster_count() : gridDim.x;
    int n_tiles = (p.n + BN - 1) / BN, steps = p.k / IG_BK;
    int groups = n_tiles * ((p.m + CLUSTER * IG_BM - 1) / (CLUSTER * IG_BM));
    if (t == 0) {
        for (int s = 0; s < STAGES; s++) {
            barrier_init(full(s), 1);
            // Alone, every multiplying thread; in a cluster, lane 0 of each multiplying warp of every block.
            barrier_init(empty(s), CLUSTER == 1 ? 2 * 128 : CLUSTER * 2 * 4);
        }
        for (int c = 0; c < 2; c++) barrier_init(residual_in(c), 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    if (CLUSTER > 1)
        cluster_sync();
    else
        __syncthreads();

    // Each cluster (or block) takes the groups of CLUSTER tiles above each other g, g + stride, ... (the
    // columns' tiles of CLUSTER rows of tiles in turn), this block the one of its rank. Every (group, k step)
    // in that order goes through the stages in turn, in the cluster's blocks alike: `it` counts them, which
    // gives each its stage (it % STAGES) and the round of that stage's barriers (it / STAGES).
    if (wg == 0) {
        // The producer: its registers given to the consumers. It runs ahead into the next tile's stages
        // while the consumers write the last one's outputs.
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (t == 0) {
            int it = 0;
            for (int group = first; group < groups; group += stride) {
                int m0 = (group / n_tiles * CLUSTER + rank) * IG_BM, n0 = group % n_tiles * BN;
                for (int kt = 0; kt < steps; kt++, it++) {
                    int s = it % STAGES;
                    // A fresh barrier counts as having finished the phase before its first: round 0 passes.
                    barrier_wait(empty(s), (it / STAGES + 1) % 2);
                    barrier_expect(full(s), STAGE_BYTES);
                    unsigned sa = shared_addr(smem + s * STAGE_BYTES);
                    tma_load(sa, &p.a, kt * IG_BK, m0, full(s));
                    tma_load(sa + A_BYTES + rank * B_PART, &p.b, kt * IG_BK, n0 + rank * BN / CLUSTER, full(s),
                             CLUSTER > 1 ? (1 << CLUSTER) - 1 : 0);
                }
            }
            // The peer's products arrive at this block's barriers until its last stage: the block stays until
            // they have (its shared memory is freed when it exits).
            if (CLUSTER > 1)
                for (int s = 0; s < STAGES; s++, it++) barrier_wait(empty(it % STAGES), (it / STAGES + 1) % 2);
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    int c = wg - 1, warp = t % 128 / 32, lane = t % 32, it = 0, wt = t % 128;  // wt: the thread in its warpgroup
    // A stage is free once the products of every multiplying warp of the cluster have finished reading it.
    // Alone, each thread arrives: with a lane per warp, the branch around it cost the kernel 1-8% (H100).
    auto release = [&](int s) {
        if (CLUSTER == 1) barrier_arrive(empty(s));
        if (CLUSTER > 1 && lane < CLUSTER) barrier_arrive_in(empty(s), lane);
    };
    // Each multiplying warpgroup's column scales of its tile, after the barriers.
    float* col_scales = reinterpret_cast<float*>(slabs + SLABS + 16 * STAGES + 16) + c * BN;
    unsigned char* slab = slabs + c * SLAB;
    for (int group = first, tile = 0; group < groups; group += stride, tile++) {
        int m0 = (group / n_tiles * CLUSTER + rank) * IG_BM, n0 = group % n_tiles * BN;
        // The scales are read from global memory before the products (whose asm clobbers memory, so the
        // loads stay here) and their latency hides under them: read in the epilogue, between its stores,
        // which might alias them, each waited in turn, they cost the scaled GEMM 1.2-1.4x its time.
        // Rows r0 and r0 + 8 are this thread's; columns n0 + wt + 128 j its share of the warpgroup's.
        int r0 = m0 + 64 * c + 16 * warp + lane / 4;
        constexpr int SB = (BN + 127) / 128;  // the columns' scales a thread reads (wt + 128 j < BN)
        float sa[2], sb[SB];
#pragma unroll
        for (int h = 0; h < 2; h++) sa[h] = p.a_scale && r0 + 8 * h < p.m ? p.a_scale[r0 + 8 * h] : 1.f;
#pragma unroll
        for (int j = 0; j < SB; j++) {
            int col = n0 + wt + 128 * j;
            sb[j] = p.b_scale && col < p.n ? p.b_scale[col] : 1.f;
        }
        int d[BN / 2];
#pragma unroll
        for (int i = 0; i < BN / 2; i++) d[i] = 0;
        // The residual this warpgroup's outputs add to, asked for before the products, which its loads run
        // under (each thread loading its column pairs, four bytes a load, cost -large's o_proj at 6,144 rows
        // 1.44-1.53x its time without the add, H100). The slab is free: the tile before ended with the
        // warpgroup's barrier.
        if (ADDS && p.residual && wt == 0) {
            barrier_expect(residual_in(c), SLAB);
#pragma unroll
            for (int j = 0; j < BN / IG_OUT_COLS; j++)
                tma_load(shared_addr(slab + j * IG_OUT_BYTES), &p.residual_map, n0 + j * IG_OUT_COLS, m0 + 64 * c,
                         residual_in(c));
        }
        for (int kt = 0; kt < steps; kt++, it++) {
            int s = it % STAGES;
            barrier_wait(full(s), it / STAGES % 2);
            unsigned a = shared_addr(smem + s * STAGE_BYTES + c * 64 * IG_BK);
            unsigned b = shared_addr(smem + s * STAGE_BYTES + A_BYTES);
            keep_in_place(d);
            asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
            for (int kk = 0; kk < IG_BK / 32; kk++) wgmma_k32(d, descriptor(a + 32 * kk), descriptor(b + 32 * kk));
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
            keep_in_place(d);
            // The previous step's products have finished: its stage is free for the producer.
            asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
            if (kt > 0) release((it - 1) % STAGES);
        }
        // The heads' angles asked for while the last products run.
        Angles<HD> angles;
        angles.load(p, n0, r0, lane);
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        keep_in_place(d);
        release((it - 1) % STAGES);

        // The column scales through shared memory to the threads that hold those columns' sums: rows r0 and
        // r0 + 8, column pairs col, col + 1 of 8-column groups g, at d[4 g + 2 h] (h: the row).
#pragma unroll
        for (int j = 0; j < SB; j++)
            if (wt + 128 * j < BN) col_scales[wt + 128 * j] = sb[j];
        named_sync<128>(1 + c);  // the warpgroup's barrier
        if (ADDS && p.residual) barrier_wait(residual_in(c), tile % 2);
        if constexpr (HD > 0) {
            store_heads<BN, HD>(p, d, sa, col_scales, angles, n0, r0, lane);
        } else {
            // Buffer by buffer: this thread's rows rl and rl + 8 of the warpgroup's 64, its column pairs.
            int rl = 16 * warp + lane / 4;
#pragma unroll
            for (int j = 0; j < BN / IG_OUT_COLS; j++) {
                unsigned char* buf = out_buffers + (2 * c + j % 2) * IG_OUT_BYTES;
#pragma unroll
                for (int q = 0; q < IG_OUT_COLS / 8; q++) {
                    int g = j * IG_OUT_COLS / 8 + q;
                    float2 sc = *reinterpret_cast<const float2*>(col_scales + 8 * g + 2 * (lane % 4));
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        int r = rl + 8 * h;
                        float y0 = (float)d[4 * g + 2 * h] * sa[h] * sc.x;
                        float y1 = (float)d[4 * g + 2 * h + 1] * sa[h] * sc.y;
                        // Where this thread's pair lies in a buffer, and in the slab's box of the same columns.
                        int at = r * 64 + ((q ^ r / 2 % 4) << 4) + 4 * (lane % 4);
                        if (ADDS && p.residual) {
                            float2 res2 = __bfloat1622float2(
                                *reinterpret_cast<const __nv_bfloat162*>(slab + j * IG_OUT_BYTES + at));
                            y0 = round_bf16(y0) + res2.x, y1 = round_bf16(y1) + res2.y;
                        }
                        *reinterpret_cast<__nv_bfloat162*>(buf + at) = __floats2bfloat162_rn(y0, y1);
                    }
                }
                fence_to_tma();
                // The store before this one has read its buffer, which the next one fills.
                if (wt == 0) tma_stores_read<0>();
                named_sync<128>(1 + c);
                if (wt == 0) tma_store(&p.out, n0 + j * IG_OUT_COLS, m0 + 64 * c, shared_addr(buf));
            }
        }
        // Every thread has read the scales and the slab before the next tile's overwrite them (the slab by the TMA).
        fence_to_tma();
        named_sync<128>(1 + c);
    }
    if (HD == 0 && wt == 0) tma_stores_read<0>();  // the shared memory outlives the stores' reads of it
}
#define IG_BODY(BN, STAGES, CLUSTER, HD) int8_gemm_tiles<BN, STAGES, CLUSTER, HD>(p);
#else
#define IG_BODY(BN, STAGES, CLUSTER, HD)
#endif

// The kernels of each tile width, with as many stages as fit 227 KB beside the rows kernels' 16 KB of output
// buffers (and at 128 columns their 32 KB of residual slabs): 6 of 32 KB for 128 columns (5 for rows), 5 of 40 KB
// for 192, 4 of 48 KB for 256 (int8_gemm.rs's `Tile`), alone or in clusters of two, writing rows (HD 0) or heads
// of HD channels. Three warpgroups: the loads' registers go to the products (setmaxnreg).
#define IG_KERNEL(name, BN, STAGES, HD)                                                                    \
    extern "C" __global__ void __launch_bounds__(384, 1) name(const __grid_constant__ Int8Gemm p) {        \
        follow_previous();                                                                                 \
        IG_BODY(BN, STAGES, 1, HD)                                                                         \
    }                                                                                                      \
    extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(384, 1)                         \
        name##_pair(const __grid_constant__ Int8Gemm p) {                                                  \
        follow_previous();                                                                                 \
        IG_BODY(BN, STAGES, 2, HD)                                                                         \
    }
IG_KERNEL(int8_gemm_n128, 128, 5, 0)
IG_KERNEL(int8_gemm_n256, 256, 4, 0)
IG_KERNEL(int8_gemm_heads64_n128, 128, 6, 64)
IG_KERNEL(int8_gemm_heads64_n256, 256, 4, 64)
IG_KERNEL(int8_gemm_heads96_n192, 192, 5, 96)
IG_KERNEL(int8_gemm_heads128_n128, 128, 6, 128)
IG_KERNEL(int8_gemm_heads128_n256, 256, 4, 128)
IG_KERNEL(int8_gemm_heads256_n256, 256, 4, 256)
