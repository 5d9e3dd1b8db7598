// The embedding: the forward gathers each token's row of the table (reference: candle's index_select); the
// backward adds each token's gradient row to its id's row of the table's gradient, in a fixed order (no atomics:
// deterministic; reference: train::layers::embedding_backward).
#include "common.cuh"

// out[r] = table[ids[r]] for n rows of c8 16-byte vectors (8 bf16 channels each). candle's index_select, a
// 2-byte access and an index division per element, took 111 us for -large's 8,192 rows (H100): 0.23 TB/s.
extern "C" __global__ void embedding_forward(const uint4* table, const uint32_t* ids, uint4* out, size_t n, int c8) {
    follow_previous();
    GRID_STRIDE(i, n * c8) {
        size_t r = i / c8;
        out[i] = table[(size_t)ids[r] * c8 + (i - r * c8)];
    }
}

// One block per distinct id: runs[3 b] = the id, runs[3 b + 1 .. 3 b + 2] its range of `order`, the batch's
// rows sorted by id (stable, so each id's rows are summed in batch order, as the reference does).
template <typename D>
__device__ void embedding_backward(D* dtable, const bf16* dx, const uint32_t* order, const uint32_t* runs, int c) {
    follow_previous();
    uint32_t id = runs[3 * blockIdx.x], first = runs[3 * blockIdx.x + 1], end = runs[3 * blockIdx.x + 2];
    for (int col = threadIdx.x; col < c; col += blockDim.x) {
        float s = 0.f;
        for (uint32_t r = first; r < end; r++) s += f32(dx[(size_t)order[r] * c + col]);
        D* out = dtable + (size_t)id * c + col;
        store_f32(out, load_f32(out) + s);
    }
}
// Into an f32 or a bf16 gradient buffer (train.grad_buffer).
extern "C" __global__ void embedding_backward_f32(float* dtable, const bf16* dx, const uint32_t* order,
                                                  const uint32_t* runs, int c) {
    embedding_backward(dtable, dx, order, runs, c);
}
extern "C" __global__ void embedding_backward_bf16(bf16* dtable, const bf16* dx, const uint32_t* order,
                                                   const uint32_t* runs, int c) {
    embedding_backward(dtable, dx, order, runs, c);
}
