// RMSNorm with the BitLinear input quantization that always follows it, forward and backward.
// Reference: train::layers::{rmsnorm_forward + effective_input, rmsnorm_backward}.
//
// The `glu_` kernels norm down_proj's input h = act(gate) up without it ever being in memory: they read
// the fused gate/up rows [n, 2c] (GLU), compute h in registers, and the backward writes [dgate | dup]
// instead of dh (reference: train::layers::glu_{forward,backward} around the norm). The activation is an
// argument (`act`: SiLU or relu^2), uniform across the grid, so its branch costs nothing measurable.
//
// A row of c channels is spread over a group of threads: in the forward a warp (G = 32, rows up to 1536
// channels: no block barriers, and each lane has several loads in flight), else the whole block (G = 0). Lane `l`
// owns the 8-channel vectors l, l + group size, ... (K of them, K a template parameter so they live in
// registers), so each row is read from memory once, in 16-byte accesses (x, dy, dx; c % 8 == 0 keeps every
// row aligned; x and dx may be attention's heads, see `at`), and kept in registers between the passes that
// need its statistics.
#include "common.cuh"

// Where channel i of row `row` lies in x (and dx): rows [n, c] when d == 0, else attention's heads
// [b, c / d, t, d] read as rows [b t, c] (d % 8 == 0, so a vector of 8 channels stays in one head).
__device__ __forceinline__ size_t at(int row, int i, int c, int t, int d) {
    if (d == 0) return (size_t)row * c + i;
    int bi = row / t, ti = row - bi * t, h = i / d;
    return (((size_t)bi * (c / d) + h) * t + ti) * d + (i - h * d);
}

// The 8 input channels from i of row `row`: x itself, or with GLU h computed from the gate and up halves of
// the row of gu [n, 2c] (what `glu_h` rounds is what the unfused SwiGLU stored); `g` and `u` keep the halves
// for the backward.
template <bool GLU>
__device__ __forceinline__ void load_input(const bf16* x, int row, int i, int c, int t, int hd, int act, float* v,
                                           float* g, float* u) {
    if constexpr (GLU) {
        load8(x + (size_t)row * 2 * c + i, g);
        load8(x + (size_t)row * 2 * c + c + i, u);
#pragma unroll
        for (int e = 0; e < 8; e++) v[e] = glu_h(act, g[e], u[e]);
    } else {
        load8(x + at(row, i, c, t, hd), v);
    }
}

// The threads that share a row: a warp (G = 32) or the block (G = 0).
template <int G> struct Group {
    __device__ static int lane() { return G ? threadIdx.x % G : threadIdx.x; }
    __device__ static int size() { return G ? G : blockDim.x; }
    // This group's number in the grid, and the grid's number of groups.
    __device__ static int index() { return G ? blockIdx.x * (blockDim.x / G) + threadIdx.x / G : blockIdx.x; }
    __device__ static int count() { return G ? gridDim.x * (blockDim.x / G) : gridDim.x; }
    // `v` reduced over the group, in a fixed order.
    template <typename Op> __device__ static float reduce(float v, Op op) {
        if (!G) return block_reduce(v, op);
        for (int o = 16; o > 0; o /= 2) v = op(v, __shfl_xor_sync(0xffffffff, v, o));
        return v;
    }
    // The channel of vector k of this thread, or c when it has none.
    __device__ static int column(int k, int c) {
        int i = (lane() + k * size()) * 8;
        return i < c ? i : c;
    }
};

// The gated activation's gradients: dgate = dh up act'(g), dup = dh act(g), with silu'(g) = s (1 + g (1 - s))
// (s = sigmoid(g), gate_sigmoid's) and (relu(g)^2)' = 2 relu(g).
__device__ __forceinline__ void glu_grad(int act, float dh, float g, float u, float s, float& dg, float& du) {
    if (act == ACT_RELU2) {
        float r = fmaxf(g, 0.f);
        dg = dh * u * (2.f * r);
        du = dh * (r * r);
        return;
    }
    dg = dh * u * (s * (g * (1.f - s) + 1.f));
    du = dh * g * s;
}

// Per row of x [n, c] (one block each): r = 1 / sqrt(mean(x^2) + eps), y = bf16(x r w), then y quantized per
// token to int8 (scale max|y| / 127) and back, blended with y by lambda. Writes the BitLinear input and r, and
// where `codes` is not null the int8 codes [n, c] and each row's scale (`scales` [n]) for the int8 GEMM.
// Without a weight (w null: a family without this sub-norm) there is no norm: r = 1, y = bf16(x), quantized.
// Between the passes each thread holds its vectors as bf16 bits, which they are (the input is bf16 or, with
// GLU, rounded to it by glu_h; y is rounded): half the registers of f32, so that the warp-per-row w6 variant
// fits 64 registers and four blocks an SM instead of three (two waves of -large's rows instead of three).
template <int K, int G, bool GLU>
__device__ void rmsnorm_quant_forward(const bf16* x, const bf16* w, bf16* y, float* rrms, signed char* codes,
                                      float* scales, int n, int c, float inv_c, float eps, float lambda, int t,
                                      int hd, int act) {
    using R = Group<G>;
    int rw = R::index();
    if (rw >= n) return;  // whole groups only: the block reduction is reached by every thread or none
    size_t row = (size_t)rw * c;
    uint4 held[K];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < K; k++) {
        int i = R::column(k, c);
        if (i == c) continue;
        float v[8];
        if constexpr (GLU) {
            float g[8], u[8];
            load_input<GLU>(x, rw, i, c, t, hd, act, v, g, u);
            held[k] = pack8(v);
        } else {
            held[k] = *reinterpret_cast<const uint4*>(x + at(rw, i, c, t, hd));
            unpack8(held[k], v);
        }
#pragma unroll
        for (int e = 0; e < 8; e++) ss += v[e] * v[e];
    }
    // `w` is the same for every thread: all reach the reduction or none.
    float r = w ? 1.f / sqrtf(R::reduce(ss, Sum()) * inv_c + eps) : 1.f;
    float amax = 0.f;
#pragma unroll
    for (int k = 0; k < K; k++) {
        int i = R::column(k, c);
        if (i == c) continue;
        float v[8], wv[8];
        unpack8(held[k], v);
        load_weights(w, i, wv);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            v[e] = round_bf16(v[e] * r * wv[e]);
            amax = fmaxf(amax, fabsf(v[e]));
        }
        held[k] = pack8(v);
    }
    float scale = int8_scale(R::reduce(amax, Max()));
#pragma unroll
    for (int k = 0; k < K; k++) {
        int i = R::column(k, c);
        if (i == c) continue;
        float v[8];
        unpack8(held[k], v);
        unsigned packed[2] = {0u, 0u};
#pragma unroll
        for (int e = 0; e < 8; e++) {
            float q = int8_code(v[e], scale);
            pack_code(packed, e, q);
            v[e] = blend(v[e], q * scale, lambda);
        }
        store8(y + row + i, v);
        // c % 8 == 0: the 8 codes lie on the 8-byte grid.
        if (codes) *reinterpret_cast<uint2*>(codes + row + i) = make_uint2(packed[0], packed[1]);
    }
    if (R::lane() == 0) {
        rrms[rw] = r;
        if (scales) scales[rw] = scale;
    }
}

// One 8-channel vector of a row's data for the backward, as loaded (bf16 bits): dy, x (with GLU the gate half)
// and the third operand (with GLU the up half, else the residual stream's gradient, where there is one).
template <bool GLU> struct RowVector {
    uint4 dy, x, third;
    __device__ static RowVector load(const bf16* gdy, const bf16* gx, const bf16* residual, int row, int i, int c,
                                     int t, int hd) {
        RowVector v;
        v.dy = *reinterpret_cast<const uint4*>(gdy + (size_t)row * c + i);
        if constexpr (GLU) {
            v.x = *reinterpret_cast<const uint4*>(gx + (size_t)row * 2 * c + i);
            v.third = *reinterpret_cast<const uint4*>(gx + (size_t)row * 2 * c + c + i);
        } else {
            v.x = *reinterpret_cast<const uint4*>(gx + at(row, i, c, t, hd));
            if (residual) v.third = *reinterpret_cast<const uint4*>(residual + at(row, i, c, t, hd));
        }
        return v;
    }
    // The norm's input, widened: x, or with GLU h = act(gate) up with the halves in g and u and the gate's
    // sigmoids in s (computed here where `fresh`, else as an earlier call left them).
    __device__ void input(int act, float* v, float* g, float* u, float* s, bool fresh) const {
        if constexpr (GLU) {
            load8(reinterpret_cast<const bf16*>(&x), g);
            load8(reinterpret_cast<const bf16*>(&third), u);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                if (fresh) s[e] = gate_sigmoid(act, g[e]);
                v[e] = glu_h(act, g[e], u[e], s[e]);
            }
        } else {
            load8(reinterpret_cast<const bf16*>(&x), v);
        }
    }
};

// With xhat = x r and g = dy w: dx = r (g - xhat mean(g xhat)), plus the residual stream's gradient when
// `residual` is not null (the add that follows every pre-norm block's branch, fused). Group j takes rows
// j + i * (groups) and writes its share of dw = sum_rows(dy xhat) to dw_partial[j, :]; `column_sums` sums
// the partial rows in a fixed order (deterministic, unlike atomics). With one vector a thread (every family's
// residual norms and -large's gate/up) each thread holds its vectors of the row as loaded (RowVector) from the
// pass before the block's reduction to the pass after it, and loads the next row's before the reduction, so
// that they are in flight during it and the pass after: rereading the row from L2 after the reduction left
// the memory idle meanwhile (126 us a call at -large's gate/up, 6144 rows, H100: 2/3 of the bandwidth). With
// more vectors two held rows spill (two blocks of 512 threads an SM): the row is loaded for each pass.
// With `deltas` (x is attention's output heads, hd != 0) each head row's delta = sum over its channels of dx x (dx
// as stored, bf16) goes to deltas [b, c / hd, t]: flash attention's backward reads them (dS = P (dP - delta)),
// and both operands are in registers here, where a kernel of their own read them again.
template <int K, bool GLU>
__device__ void rmsnorm_backward(const bf16* dy, const bf16* x, const bf16* w, const float* rrms, const bf16* residual,
                                 bf16* dx, float* dw_partial, float* deltas, int n, int c, float inv_c, int t, int hd,
                                 int act) {
    using R = Group<0>;  // a block per row
    constexpr bool AHEAD = K == 1;
    // With GLU and one vector a thread the gate's sigmoids are kept from the first pass to the second (8
    // registers: 24 bytes spill); with more, the second pass computes them again for h and for the gradient
    // (kept alive there, they made the b2 variant spill).
    constexpr bool HOLD = GLU && AHEAD;
    // Each 8-channel vector's share of its head's delta, summed per head in order after the row.
    __shared__ float delta_parts[GLU ? 1 : 4 * 512];
    auto load = [&](int row, int k) {
        int i = R::column(k, c);
        return i == c ? RowVector<GLU>{} : RowVector<GLU>::load(dy, x, residual, row, i, c, t, hd);
    };
    RowVector<GLU> held[AHEAD ? K : 1];  // under AHEAD, this row's vectors, loaded during the row before
    if (AHEAD && R::index() < n)
#pragma unroll
        for (int k = 0; k < K; k++) held[k] = load(R::index(), k);
    float acc[K][8] = {};
    for (int row = R::index(); row < n; row += R::count()) {
        int next_row = row + R::count();
        auto vector = [&](int k) { return AHEAD ? held[k] : load(row, k); };
        float r = rrms[row];
        float dot = 0.f;
        float held_s[8];  // under HOLD (K = 1), vector 0's
#pragma unroll
        for (int k = 0; k < K; k++) {
            int i = R::column(k, c);
            if (i == c) continue;
            // The same sums as one loop over e, in an order that keeps fewer arrays of 8 alive.
            float d[8], xh[8];
            {
                RowVector<GLU> rv = vector(k);
                float g[8], u[8], fresh_s[8];
                load8(reinterpret_cast<const bf16*>(&rv.dy), d);
                rv.input(act, xh, g, u, HOLD ? held_s : fresh_s, true);
            }
#pragma unroll
            for (int e = 0; e < 8; e++) {
                xh[e] *= r;
                acc[k][e] += d[e] * xh[e];
            }
            {
                float wv[8];
                load_weights(w, i, wv);
#pragma unroll
                for (int e = 0; e < 8; e++) dot += d[e] * wv[e] * xh[e];
            }
        }
        RowVector<GLU> next[AHEAD ? K : 1];
        if (AHEAD && next_row < n)
#pragma unroll
            for (int k = 0; k < K; k++) next[k] = load(next_row, k);
        // Without a norm (w null, r = 1) the gradient passes straight through: no projection.
        float proj = w ? R::reduce(dot, Sum()) * inv_c : 0.f;
#pragma unroll
        for (int k = 0; k < K; k++) {
            int i = R::column(k, c);
            if (i == c) continue;
            // o = (dy w - xhat r proj) r + residual.
            // Built in place so that few arrays of 8 live at once (the gated kernels' gate and up halves stay to
            // the end): the b2 and b4 variants spilled otherwise.
            RowVector<GLU> rv = vector(k);
            float o[8], g[8], u[8], fresh_s[8];
            float* gs = HOLD ? held_s : fresh_s;
            load8(reinterpret_cast<const bf16*>(&rv.dy), o);
            {
                float wv[8];
                load_weights(w, i, wv);
#pragma unroll
                for (int e = 0; e < 8; e++) o[e] *= wv[e];
            }
            {
                float xh[8];
                rv.input(act, xh, g, u, gs, !HOLD);
#pragma unroll
                for (int e = 0; e < 8; e++) o[e] = (o[e] - xh[e] * r * proj) * r;
            }
            if (!GLU && residual) {
                float res[8];
                load8(reinterpret_cast<const bf16*>(&rv.third), res);
#pragma unroll
                for (int e = 0; e < 8; e++) o[e] += res[e];
            }
            if constexpr (GLU) {
                // dh rounded to bf16 as the unfused norm stored it, then through the activation into [dgate | dup].
                float dg[8], du[8];
#pragma unroll
                for (int e = 0; e < 8; e++)
                    glu_grad(act, round_bf16(o[e]), g[e], u[e], HOLD ? gs[e] : gate_sigmoid(act, g[e]), dg[e], du[e]);
                store8(dx + (size_t)row * 2 * c + i, dg);
                store8(dx + (size_t)row * 2 * c + c + i, du);
            } else {
                store8(dx + at(row, i, c, t, hd), o);
                if (deltas) {
                    float xv[8], part = 0.f;
                    load8(reinterpret_cast<const bf16*>(&rv.x), xv);
#pragma unroll
                    for (int e = 0; e < 8; e++) part += round_bf16(o[e]) * xv[e];
                    delta_parts[i / 8] = part;
                }
            }
        }
        if (!GLU && deltas) {
            __syncthreads();  // the parts are in
            int per = hd / 8, heads = c / hd, bi = row / t;
            for (int h = threadIdx.x; h < heads; h += blockDim.x) {
                float sum = 0.f;
                for (int j = 0; j < per; j++) sum += delta_parts[h * per + j];
                deltas[((size_t)bi * heads + h) * t + row - bi * t] = sum;
            }
            __syncthreads();  // read before the next row's overwrite them
        }
        if constexpr (AHEAD)
#pragma unroll
            for (int k = 0; k < K; k++) held[k] = next[k];
    }
#pragma unroll
    for (int k = 0; k < K; k++) {
        int i = R::column(k, c);
        if (i == c) continue;
        float4* out = reinterpret_cast<float4*>(dw_partial + (size_t)R::index() * c + i);
        out[0] = make_float4(acc[k][0], acc[k][1], acc[k][2], acc[k][3]);
        out[1] = make_float4(acc[k][4], acc[k][5], acc[k][6], acc[k][7]);
    }
}

// Kernels `[glu_]rmsnorm_quant_forward_{w,b}K` (a warp or a block per row) and `[glu_]rmsnorm_backward_bK`; `act`
// is read by the `glu_` ones only.
// Measured on an H200 at 6144 rows: a warp per row is slower where its registers allow one block per SM, the
// backward at 1536 channels (68 us against 31 us) and the forward at 4096 (119 us against 58 us).
#define RMSNORM_FORWARD(K, G, GLU, NAME)                                                                           \
    extern "C" __global__ void NAME(const bf16* x, const bf16* w, bf16* y, float* rrms, signed char* codes,        \
                                    float* scales, int n, int c, float inv_c, float eps, float lambda, int t,     \
                                    int hd, int act) {                                                             \
        follow_previous();                                                                                         \
        rmsnorm_quant_forward<K, G, GLU>(x, w, y, rrms, codes, scales, n, c, inv_c, eps, lambda, t, hd, act);     \
    }
#define RMSNORM_BACKWARD(K, GLU, NAME)                                                                             \
    extern "C" __global__ void __launch_bounds__(512, 2)                                                           \
        NAME(const bf16* dy, const bf16* x, const bf16* w, const float* rrms, const bf16* residual, bf16* dx,     \
             float* dw_partial, float* deltas, int n, int c, float inv_c, int t, int hd, int act) {               \
        follow_previous();                                                                                         \
        rmsnorm_backward<K, GLU>(dy, x, w, rrms, residual, dx, dw_partial, deltas, n, c, inv_c, t, hd, act);       \
    }
// The forward: a warp per row with 1, 2, 4 or 6 vectors per lane, or a block per row with 4; the backward: a
// block per row (at most 512 threads) with 1, 2 or 4.
#define FORWARDS(GLU, PREFIX)                      \
    RMSNORM_FORWARD(1, 32, GLU, PREFIX##w1)        \
    RMSNORM_FORWARD(2, 32, GLU, PREFIX##w2)        \
    RMSNORM_FORWARD(4, 32, GLU, PREFIX##w4)        \
    RMSNORM_FORWARD(6, 32, GLU, PREFIX##w6)        \
    RMSNORM_FORWARD(4, 0, GLU, PREFIX##b4)
#define BACKWARDS(GLU, PREFIX)                     \
    RMSNORM_BACKWARD(1, GLU, PREFIX##b1)           \
    RMSNORM_BACKWARD(2, GLU, PREFIX##b2)           \
    RMSNORM_BACKWARD(4, GLU, PREFIX##b4)
FORWARDS(false, rmsnorm_quant_forward_)
FORWARDS(true, glu_rmsnorm_quant_forward_)
BACKWARDS(false, rmsnorm_backward_)
BACKWARDS(true, glu_rmsnorm_backward_)

// out[j] += sum over rows of x[:, j] (add = 1; add = 0: out[j] = the sum, out not read) for x [rows, cols] f32,
// rows in order: the weight's gradient straight into the gradient buffer. Up to COLUMN_JOBS such sums in one
// launch (a block's norms at once: a launch each took 3.2 us and left the GPU idle 1.6 us before it without
// early launches, 97 a step at -large, H100), job j on the blocks from first[j] on. Block (32, 32): 32 columns,
// the 32 thread rows take every 32nd row (many loads in flight: the grid is only cols / 32 blocks a job), then
// the first adds the 32 sums.
#define COLUMN_JOBS 4
struct ColumnSums {
    const float* x[COLUMN_JOBS];
    void* out[COLUMN_JOBS];
    int rows[COLUMN_JOBS], cols[COLUMN_JOBS], add[COLUMN_JOBS], first[COLUMN_JOBS];
    int jobs;
};
template <typename D> __device__ void column_sums(const ColumnSums& p) {
    __shared__ float part[32][33];
    follow_previous();
    int job = 0;
    while (job + 1 < p.jobs && (int)blockIdx.x >= p.first[job + 1]) job++;
    const float* x = p.x[job];
    D* out = static_cast<D*>(p.out[job]);
    int rows = p.rows[job], cols = p.cols[job];
    int j = ((int)blockIdx.x - p.first[job]) * 32 + threadIdx.x;
    float s = 0.f;
    if (j < cols)
        for (int r = threadIdx.y; r < rows; r += 32) s += x[(size_t)r * cols + j];
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && j < cols) {
        float total = 0.f;
        for (int y = 0; y < 32; y++) total += part[y][threadIdx.x];
        store_f32(out + j, p.add[job] ? load_f32(out + j) + total : total);
    }
}
// Into an f32 or a bf16 gradient buffer (train.grad_buffer).
extern "C" __global__ void column_sums_f32(const __grid_constant__ ColumnSums p) { column_sums<float>(p); }
extern "C" __global__ void column_sums_bf16(const __grid_constant__ ColumnSums p) { column_sums<bf16>(p); }
