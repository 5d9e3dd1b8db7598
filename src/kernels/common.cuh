// Shared by the kernels: bf16 conversions, a deterministic block reduction, and the pieces of a BitLinear
// input (the gated activation, the norm weight, the int8 quantization) that the norm kernels and the decoding
// step's product share.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float f32(bf16 x) { return __bfloat162float(x); }
// Rounded to nearest even through the packed conversion (cvt.rn.bf16x2.f32: F2FP, an ALU instruction on Hopper)
// rather than the scalar one (F2F), which issues on the 16-lanes-a-clock unit that also runs the exponentials and
// reciprocals: the same bits, and the gated norm kernels, which round up to five times an element, leave that
// unit to their sigmoids.
__device__ __forceinline__ bf16 to_bf16(float x) { return __low2bfloat16(__floats2bfloat162_rn(x, x)); }
// The value a cast to bf16 and back gives: fused kernels round where the unfused ops stored bf16.
__device__ __forceinline__ float round_bf16(float x) { return f32(to_bf16(x)); }

// An element of the gradient buffer, f32 or bf16 (train.grad_buffer), read as f32 and written from f32.
__device__ __forceinline__ float load_f32(const float* p) { return *p; }
__device__ __forceinline__ float load_f32(const bf16* p) { return f32(*p); }
__device__ __forceinline__ void store_f32(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f32(bf16* p, float v) { *p = to_bf16(v); }
// Four of them from a 16-byte (f32) or 8-byte (bf16) aligned address.
__device__ __forceinline__ float4 load4_f32(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4_f32(const bf16* p) {
    uint2 u = *reinterpret_cast<const uint2*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
    float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
    return make_float4(a.x, a.y, b.x, b.y);
}

struct Sum {
    template <typename T> __device__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Reduces `v` over the block and gives every thread the result. The order of the additions is fixed by the
// block's shape, so results repeat bit for bit run to run (no atomics). blockDim.x: a multiple of 32.
// The warps' partials are combined by every warp in a tree of shuffles, lane i holding warp i's: a serial
// loop over them took one shared-memory load after another (about 1,000 cycles at 32 warps, most of a
// decoding step's norm).
template <typename T, typename Op> __device__ T block_reduce(T v, Op op) {
    __shared__ T warps[32];
    int lane = threadIdx.x % 32, count = blockDim.x / 32;
    for (int o = 16; o > 0; o /= 2) v = op(v, __shfl_xor_sync(0xffffffff, v, o));
    __syncthreads();  // a previous call may still be reading `warps`
    if (lane == 0) warps[threadIdx.x / 32] = v;
    __syncthreads();
    v = warps[lane < count ? lane : 0];
    // A lane takes its partner's partial only where the partner holds a warp's: lanes past `count` hold
    // none, and every partial a lane below `count` holds covers warps below `count` only.
    for (int o = 16; o > 0; o /= 2) {
        T other = __shfl_xor_sync(0xffffffff, v, o);
        if ((lane ^ o) < count) v = op(v, other);
    }
    return __shfl_sync(0xffffffff, v, 0);
}

// `x + lambda (q - x)`, the quantization warm-up, exact at the ends as the reference is.
__device__ __forceinline__ float blend(float x, float q, float lambda) {
    if (lambda >= 1.f) return q;
    if (lambda <= 0.f) return x;
    return x + (q - x) * lambda;
}

// Programmatic dependent launch (Hopper on; no-ops before it, and for a kernel launched without it):
// `let_next_start` lets the stream's next kernel (kernels::launch_kernel launches every kernel so) start its
// blocks where the card has room, and `wait_for_inputs` holds a kernel until the grids before it finished and
// their writes are seen. Before the wait a kernel may only read what no kernel of the step writes (weights, the
// KV cache's earlier columns) and write nothing: whatever it reads after may still be being written.
__device__ __forceinline__ void let_next_start() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_inputs() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// The first thing a kernel does that reads nothing before its inputs (all but decode's): waits for the kernels
// before it, then lets the next one start its blocks beside this one's last. So at most one kernel of the
// stream waits at a time.
__device__ __forceinline__ void follow_previous() {
    wait_for_inputs();
    let_next_start();
}
// Asks the memory for the 128-byte line at `p` into L2 without waiting for it: a later load of it is an L2 hit.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

#define GRID_STRIDE(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

// Eight bf16 in one 16-byte access (the address must be 16-byte aligned), widened to f32 or rounded back.
__device__ __forceinline__ void load8(const bf16* p, float* out) {
    uint4 u = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int e = 0; e < 4; e++) {
        float2 f = __bfloat1622float2(h[e]);
        out[2 * e] = f.x;
        out[2 * e + 1] = f.y;
    }
}
__device__ __forceinline__ uint4 pack8(const float* in) {
    uint4 u;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
    for (int e = 0; e < 4; e++) h[e] = __floats2bfloat162_rn(in[2 * e], in[2 * e + 1]);
    return u;
}
__device__ __forceinline__ void store8(bf16* p, const float* in) { *reinterpret_cast<uint4*>(p) = pack8(in); }
// Eight bf16 of a 16-byte chunk held in registers (pack8's), widened to f32.
__device__ __forceinline__ void unpack8(const uint4& u, float* out) { load8(reinterpret_cast<const bf16*>(&u), out); }

// The norm kernels are as much arithmetic as memory traffic, so the exponentials and divisions are the fast
// intrinsics (a few ulp of f32, below the bf16 rounding that follows; the tests compare against the exact
// reference).
__device__ __forceinline__ float sigmoid(float g) { return __fdividef(1.f, 1.f + __expf(-g)); }

// e's base-2 logarithm and 2's natural one: the softmax kernels run in base 2 (exp2, log2).
#define LOG2E 1.44269504089f
#define LN2 0.69314718056f

// The gated activations (`act`), as rmsnorm.rs numbers them.
#define ACT_SILU 0
#define ACT_RELU2 1

// The gate's sigmoid where the activation is SiLU (relu^2 needs none): the backward can compute it once for its
// passes and the gradient (its exponential and reciprocal are two instructions of the 16-lane unit).
__device__ __forceinline__ float gate_sigmoid(int act, float g) { return act == ACT_RELU2 ? 0.f : sigmoid(g); }
// act(g), given s = gate_sigmoid(act, g).
__device__ __forceinline__ float act_of(int act, float g, float s) {
    if (act == ACT_RELU2) {
        float r = fmaxf(g, 0.f);
        return r * r;
    }
    return g * s;
}

// RoPE's turn of a channel pair (x1, x2) = (j, j + d / 2) by the angle of cosine c and sine s, in f32, each sum
// one fused multiply-add after a product (pinned, not left to contraction): qkv_rope and the int8 GEMM's heads
// epilogue share it, so the two round alike.
__device__ __forceinline__ void rope_turn(float& x1, float& x2, float c, float s) {
    float y1 = __fmaf_rn(x1, c, -__fmul_rn(x2, s));
    x2 = __fmaf_rn(x1, s, __fmul_rn(x2, c));
    x1 = y1;
}

// h = act(gate) up, rounded to bf16 where the unfused ops stored it (the activation, then the product).
__device__ __forceinline__ float glu_h(int act, float g, float u, float s) {
    return round_bf16(round_bf16(act_of(act, g, s)) * u);
}
__device__ __forceinline__ float glu_h(int act, float g, float u) { return glu_h(act, g, u, gate_sigmoid(act, g)); }

// Eight bf16 at w + i as raw bits (16 bytes), in one access where the address lies on the 16-byte grid, else
// one by one (a norm weight is a view into the step's flat weight buffer, so it may not).
__device__ __forceinline__ uint4 load8_raw(const bf16* w, int i) {
    w += i;
    if (((uintptr_t)w & 15) == 0) return *reinterpret_cast<const uint4*>(w);
    uint4 u;
    bf16* h = reinterpret_cast<bf16*>(&u);
#pragma unroll
    for (int e = 0; e < 8; e++) h[e] = w[e];
    return u;
}
// Eight bf16 ones as raw bits: the weight of a norm that has none.
#define BF16_ONES8 make_uint4(0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u)

// The norm weight's 8 channels from i, widened, read per row from L1. No weight (null): ones.
__device__ __forceinline__ void load_weights(const bf16* w, int i, float* out) {
    uint4 u = w ? load8_raw(w, i) : BF16_ONES8;
    load8(reinterpret_cast<const bf16*>(&u), out);
}

// roundf(x) (ties away from zero, the sign of zero kept) for a caller that clamps it to a range within +-2^22,
// on the FMA pipe: adding and taking away 1.5 * 2^23 rounds to the nearest integer with ties to even where
// |x| < 2^22, and a tie (x - r = +-1/2, exact) is moved away from zero; past 2^22 the result keeps x's sign and
// is at least 2^22 - 1 in magnitude, which the clamp takes to roundf's end of the range. The int8 codes' and
// the ternary weights' clamps give roundf's bits for every f32 (tests/reference/round_for_clamp.c checks all
// 2^32). roundf's FRND and F2I issue on the 16-lane conversion unit.
#define ONE_AND_A_HALF_2_23 12582912.f
__device__ __forceinline__ float round_for_clamp(float x) {
    float r = copysignf(__fsub_rn(__fadd_rn(x, ONE_AND_A_HALF_2_23), ONE_AND_A_HALF_2_23), x);
    return fabsf(__fsub_rn(x, r)) == 0.5f ? __fadd_rn(x, copysignf(0.5f, x)) : r;
}

// A row's int8 quantization (the BitLinear input's, per token): the scale from the row's largest magnitude,
// and each value's code, round(v / scale) clamped to [-128, 127].
__device__ __forceinline__ float int8_scale(float amax) { return fmaxf(amax, 1e-5f) * (1.f / 127.f); }
__device__ __forceinline__ float int8_code(float v, float scale) {
    return fminf(fmaxf(round_for_clamp(__fdividef(v, scale)), -128.f), 127.f);
}
// Waits at named barrier `id` (1..15; 0 is __syncthreads') for N threads (whole warps): a group of
// warps, not the whole block. Like __syncthreads it orders the group's shared-memory accesses, so the
// compiler may move none across it.
template <int N> __device__ __forceinline__ void named_sync(int id) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(N) : "memory");
}

// Code q (int8_code's) as byte e of eight codes held in two words (one 8-byte store, the int8 GEMM's row-major
// layout). q + 1.5 * 2^23 holds the integer q in its low bits, two's complement: an add instead of a conversion.
__device__ __forceinline__ void pack_code(unsigned (&packed)[2], int e, float q) {
    packed[e / 4] |= ((unsigned)__float_as_int(__fadd_rn(q, ONE_AND_A_HALF_2_23)) & 0xffu) << (8 * (e % 4));
}
