// Hopper's warpgroup matrix multiply (wgmma) and what it reads: shared-memory operand descriptors under the
// 128-byte swizzle, the fences that keep a wgmma's registers in place, and the bf16 products the flash
// backward uses. Included by the modules built for sm_90a only (build.rs's HOPPER_ONLY); everything here is
// inside their `__CUDA_ARCH_FEAT_SM90_ALL` guard.
#pragma once
#include "common.cuh"

__device__ __forceinline__ unsigned shared_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// A wgmma operand descriptor for a tile under the 128-byte swizzle (rows of 128 bytes, row r's 16-byte chunk c
// at r * 128 + (c ^ r % 8) * 16, 8-row groups 1024 bytes apart and 1024-byte aligned) from `addr`. K-major (k
// contiguous in a row): k advances within a row by adding to the address, and `lbo` is unused. MN-major (m or
// n contiguous in a row, k one row after another): `lbo` is the distance from one 64-element panel of m or n
// to the next, and k advances 8 rows a group. `sbo` is the distance between 8-row groups in both.
__device__ __forceinline__ unsigned long long sw128_descriptor(unsigned addr, unsigned lbo, unsigned sbo) {
    unsigned long long d = (unsigned long long)((addr & 0x3FFFF) >> 4);
    d |= (unsigned long long)(lbo >> 4) << 16;
    d |= (unsigned long long)(sbo >> 4) << 32;
    d |= 1ull << 62;  // 128-byte swizzle
    return d;
}
// The descriptor of the same tile `bytes` (a multiple of 16) further on. The start address is the low field, in
// 16-byte units, and shared memory's addresses (below 256 KB) never carry out of it: one add to the low word,
// where building each descriptor anew cost about eight instructions a product in the flash kernels.
__device__ __forceinline__ unsigned long long advance(unsigned long long desc, unsigned bytes) {
    return (desc & ~0xFFFFFFFFull) | (unsigned)(desc + (bytes >> 4));
}

// Holds the sums where they are across the products in flight (as CUTLASS's warpgroup_fence_operand): without
// it the compiler moves them between registers, reading them while a wgmma writes them, and ptxas serializes
// every wgmma (its C7514 note). Also keeps a register operand alive until its product has read it.
template <int N> __device__ __forceinline__ void keep_in_place(int (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+r"(d[i])::"memory");
}
template <int N> __device__ __forceinline__ void keep_in_place(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}
template <int N> __device__ __forceinline__ void keep_in_place(uint32_t (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+r"(d[i])::"memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Shared memory written by the threads (st.shared, cp.async) made visible to the wgmmas that read it (the
// async proxy); a block barrier after it orders every thread's writes.
__device__ __forceinline__ void fence_to_wgmma() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// d (64 x N, f32, the accumulator layout: thread t of the warpgroup holds rows 16 (t / 32) + t % 32 / 4 and
// + 8, columns 8 j + 2 (t % 4) and + 1 at d[4 j ..]) += A B for bf16 A 64 x 16 and B 16 x N, both from
// shared memory (descriptors), K-major, or MN-major where TRANS_A or TRANS_B is 1.
template <int TRANS_A = 0, int TRANS_B = 0>
__device__ __forceinline__ void wgmma_bf16(float (&d)[16], unsigned long long a, unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, %19, %20;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(a), "l"(b), "r"(1), "n"(TRANS_A), "n"(TRANS_B));
}

template <int TRANS_A = 0, int TRANS_B = 0>
__device__ __forceinline__ void wgmma_bf16(float (&d)[32], unsigned long long a, unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(a), "l"(b), "r"(1), "n"(TRANS_A), "n"(TRANS_B));
}

// The same with A from registers (this thread's fragment of A 64 x 16, mma.m16n8k16's A layout for its warp's
// rows) and B MN-major (n contiguous in shared memory).
__device__ __forceinline__ void wgmma_bf16_t(float (&d)[16], const uint32_t (&a)[4], unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

__device__ __forceinline__ void wgmma_bf16_t(float (&d)[32], const uint32_t (&a)[4], unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}
