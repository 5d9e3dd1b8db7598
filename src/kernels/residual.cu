// The residual stream's add, x + branch in bf16, 8 channels per thread in 16-byte accesses (candle's
// elementwise add reads and writes 2 bytes at a time and ran at a third of the memory's bandwidth).
// Reference: the candle add in train::layers::residual_add.
#include "common.cuh"

extern "C" __global__ void residual_add(const bf16* x, const bf16* branch, bf16* out, size_t vectors) {
    GRID_STRIDE(v, vectors) {
        float a[8], b[8];
        load8(x + 8 * v, a);
        load8(branch + 8 * v, b);
#pragma unroll
        for (int e = 0; e < 8; e++) a[e] += b[e];
        store8(out + 8 * v, a);
    }
}
