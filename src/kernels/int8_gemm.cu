// An int8 x int8 GEMM with bf16 output on Hopper's tensor cores (wgmma with s8 inputs and s32 sums, at twice
// bf16's rate): out[m, n] = round_bf16(sum_k a[m, k] b[n, k] * a_scale[m] * b_scale[n]), both operands
// row-major with k contiguous (a BitLinear's int8 activations and its ternary weights as int8). The sums are
// exact integers; the scales are applied once in f32, in that order. Compiled for sm_90a (build.rs): on
// other cards the module is empty and kernels::int8_gemm declines.
//
// A block takes a 128 x BN tile of the output (BN 128 or 256, one kernel each): two warpgroups, 64 rows
// each, every wgmma m64nBNk32. The operands stream through IG_STAGES shared-memory stages of 128 bytes of k
// (cp.async by every thread, 16 bytes each, zero-filled past m and n), laid out as wgmma's 128-byte swizzle
// expects: row r's 16-byte chunk c at r * 128 + (c ^ r % 8) * 16, each operand's tile 1024-byte aligned.
#include "common.cuh"

#define IG_BM 128
#define IG_BK 128
#define IG_THREADS 256

// Mirrors int8_gemm.rs's `GemmParams`.
struct Int8Gemm {
    const signed char* a;
    const signed char* b;
    // Each row's and each column's scale (f32), or null: 1.
    const float* a_scale;
    const float* b_scale;
    bf16* out;
    int m, n, k;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ unsigned shared_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// The byte of row r's 16-byte chunk c in a tile of 128-byte rows under the 128-byte swizzle.
__device__ __forceinline__ int swizzled(int r, int c) { return r * 128 + ((c ^ (r % 8)) * 16); }

// A wgmma operand descriptor for K-major rows of 128 bytes under the 128-byte swizzle, from `addr` (the
// start of 8-row groups 1024 bytes apart; k advances within a row by adding to the address).
__device__ __forceinline__ unsigned long long descriptor(unsigned addr) {
    unsigned long long d = (unsigned long long)((addr & 0x3FFFF) >> 4);
    d |= 1ull << 16;                             // leading byte offset: unused for swizzled K-major operands
    d |= (unsigned long long)(1024 >> 4) << 32;  // stride byte offset: from one 8-row group to the next
    d |= 1ull << 62;                             // 128-byte swizzle
    return d;
}

__device__ __forceinline__ void copy16(void* dst, const void* src, bool in) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_addr(dst)), "l"(src), "r"(in ? 16 : 0)
                 : "memory");
}

// d += a b for a 64 x 32 slab of a and an N x 32 slab of b (k-major, in shared memory).
__device__ __forceinline__ void wgmma_k32(int (&d)[64], unsigned long long a, unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p;\n}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
        : "l"(a), "l"(b), "r"(1));
}

__device__ __forceinline__ void wgmma_k32(int (&d)[128], unsigned long long a, unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p;\n}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]), "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]), "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]), "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]), "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]), "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]), "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]), "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]), "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
        : "l"(a), "l"(b), "r"(1));
}

// Holds the sums where they are across the products in flight (as CUTLASS's warpgroup_fence_operand): without
// it the compiler moves them between registers, reading them while a wgmma writes them, and ptxas serializes
// every wgmma (its C7514 note).
template <int N> __device__ __forceinline__ void keep_in_place(int (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+r"(d[i])::"memory");
}

// The tile's 128 x BN outputs over all of k, each warpgroup's 64 x BN sums in d.
template <int BN, int STAGES> __device__ __forceinline__ void int8_gemm_tile(const Int8Gemm& p) {
    constexpr int A_BYTES = IG_BM * IG_BK, STAGE_BYTES = (IG_BM + BN) * IG_BK;
    extern __shared__ unsigned char smem_raw[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
    int t = threadIdx.x, wg = t / 128;
    int m0 = blockIdx.y * IG_BM, n0 = blockIdx.x * BN, tiles = p.k / IG_BK;
    // Tile kt of k into stage s: 8 chunks a row, (128 + BN) rows.
    auto load = [&](int kt, int s) {
        unsigned char* sa = smem + s * STAGE_BYTES;
        unsigned char* sb = sa + A_BYTES;
#pragma unroll
        for (int j = 0; j < (IG_BM + BN) * 8 / IG_THREADS; j++) {
            int i = t + j * IG_THREADS, r = i / 8, c = i % 8;
            size_t kb = (size_t)kt * IG_BK + 16 * c;
            if (r < IG_BM) {
                copy16(sa + swizzled(r, c), p.a + (size_t)min(m0 + r, p.m - 1) * p.k + kb, m0 + r < p.m);
            } else {
                int rb = r - IG_BM;
                copy16(sb + swizzled(rb, c), p.b + (size_t)min(n0 + rb, p.n - 1) * p.k + kb, n0 + rb < p.n);
            }
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    };
    // The sums start at zero, and every wgmma adds to them.
    int d[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; i++) d[i] = 0;
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < tiles) load(s, s);
        else asm volatile("cp.async.commit_group;\n" ::: "memory");
    }
    for (int kt = 0; kt < tiles; kt++) {
        // Tile kt has landed (each iteration commits one group), and is seen by the tensor cores' proxy.
        asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 2) : "memory");
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        int s = kt % STAGES;
        unsigned a = shared_addr(smem + s * STAGE_BYTES + wg * 64 * IG_BK);
        unsigned b = shared_addr(smem + s * STAGE_BYTES + A_BYTES);
        keep_in_place(d);
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int kk = 0; kk < IG_BK / 32; kk++) wgmma_k32(d, descriptor(a + 32 * kk), descriptor(b + 32 * kk));
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        keep_in_place(d);
        // The stage the next load overwrites was read by the previous tile's products: both warpgroups' must
        // have finished.
        asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
        __syncthreads();
        int next = kt + STAGES - 1;
        if (next < tiles) load(next, next % STAGES);
        else asm volatile("cp.async.commit_group;\n" ::: "memory");
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    keep_in_place(d);

    // d[i] holds row 16 warp + lane / 4 (+ 8 for i % 4 >= 2) and column 8 (i / 4) + 2 (lane % 4) + i % 2 of
    // the warpgroup's 64 x BN part.
    int warp = t % 128 / 32, lane = t % 32;
#pragma unroll
    for (int i = 0; i < BN / 2; i += 2) {
        int row = m0 + 64 * wg + 16 * warp + lane / 4 + 8 * (i / 2 % 2);
        int col = n0 + 8 * (i / 4) + 2 * (lane % 4);
        if (row >= p.m || col >= p.n) continue;
        float sa = p.a_scale ? p.a_scale[row] : 1.f;
        float s0 = p.b_scale ? p.b_scale[col] : 1.f, s1 = p.b_scale ? p.b_scale[col + 1] : 1.f;
        *reinterpret_cast<__nv_bfloat162*>(p.out + (size_t)row * p.n + col) =
            __floats2bfloat162_rn((float)d[i] * sa * s0, (float)d[i + 1] * sa * s1);
    }
}
#endif

// The kernels of each tile width, with as many stages as fit 227 KB: 4 of 32 KB for 128 columns, 4 of 48 KB
// for 256 (int8_gemm.rs's `Tile`).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define IG_BODY(BN, STAGES) int8_gemm_tile<BN, STAGES>(p);
#else
#define IG_BODY(BN, STAGES)
#endif
extern "C" __global__ void __launch_bounds__(IG_THREADS) int8_gemm_n128(const Int8Gemm p) { IG_BODY(128, 4) }
extern "C" __global__ void __launch_bounds__(IG_THREADS) int8_gemm_n256(const Int8Gemm p) { IG_BODY(256, 4) }
