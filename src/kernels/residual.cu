// The residual stream's add, x + branch in bf16, 8 channels per thread in 16-byte accesses (candle's
// elementwise add reads and writes 2 bytes at a time and ran at a third of the memory's bandwidth); at
// inference also the branch times each output column's weight scale first (a BitLinear's GEMM output; candle's
// broadcast multiply ran at a fifteenth of the bandwidth, half of a 2,000-token prefill on an H200).
// References: the candle add in train::layers::residual_add, the broadcast multiply and add of
// model::bitnet's Stacked::forward.
#include "common.cuh"

// out = [x +] bf16(branch [* scale[column]]) over [rows, n] (n a multiple of 8), rounded as the candle ops
// round: x or scale null leave out the add or the multiply.
extern "C" __global__ void residual_add(const bf16* x, const bf16* branch, const bf16* scale, bf16* out,
                                        size_t vectors, int n) {
    follow_previous();
    GRID_STRIDE(v, vectors) {
        float a[8], b[8];
        load8(branch + 8 * v, b);
        if (scale) {
            float s[8];
            load8(scale + (8 * v) % n, s);
#pragma unroll
            for (int e = 0; e < 8; e++) b[e] = round_bf16(b[e] * s[e]);
        }
        if (x) {
            load8(x + 8 * v, a);
#pragma unroll
            for (int e = 0; e < 8; e++) b[e] += a[e];
        }
        store8(out + 8 * v, b);
    }
}
