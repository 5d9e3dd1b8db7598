// Can the training backward's bf16 GEMMs go faster than cuBLAS's default choice? At each BitLinear's input- and
// weight-gradient GEMM of -large (6,144 and 8,192 tokens), 2B4T and Falcon3-1B (8,192), row-major as Bessie calls
// them (c[m, n] = op(a) op(b), bf16 out, f32 sums): cublasGemmEx with its default algorithm (what
// kernels::gemm and candle's matmul run) against every algorithm cuBLASLt's heuristic offers for the product
// (up to 32, a 32 MiB workspace), each timed; then each layer's GEMMs in order on one stream against each
// input gradient beside its weight gradient on a second stream. Results in BENCHMARKS.md.
//
// Build (here, against the cuBLAS wheel's headers; `pip download nvidia-cublas==13.*`, and the link stubs of
// ../shared/tools/cuda-toolchain.sh):
//   gcc -O2 -o cublaslt_probe cublaslt_probe.c -I$CUBLAS/include -I$CUDA_HOME/include -L$STUBS -lcublasLt -lcublas -lcudart
// Run (there): LD_LIBRARY_PATH=/usr/local/cuda/lib64 ./cublaslt_probe, or with PyTorch's own cuBLAS first on
// the path to compare the library torch.compile runs.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

#define CK(x) do { int e = (int)(x); if (e) { printf("error %d at %s:%d\n", e, __FILE__, __LINE__); exit(1); } } while (0)

static float time_it(void (*f)(void *), void *arg, int reps, cudaEvent_t a, cudaEvent_t b) {
  for (int i = 0; i < 3; i++) f(arg);
  CK(cudaEventRecord(a, 0));
  for (int i = 0; i < reps; i++) f(arg);
  CK(cudaEventRecord(b, 0));
  CK(cudaEventSynchronize(b));
  float ms; CK(cudaEventElapsedTime(&ms, a, b));
  return ms * 1000.f / reps;
}

typedef struct {
  cublasHandle_t blas; cublasLtHandle_t lt;
  int m, n, k, a_t, b_t;
  void *A, *B, *C, *ws; size_t ws_size;
  cublasLtMatmulDesc_t desc; cublasLtMatrixLayout_t la, lb, lc;
  cublasLtMatmulAlgo_t algo;
} Job;

static void run_default(void *p) {
  Job *j = p; float alpha = 1.f, beta = 0.f;
  int ldb = j->b_t ? j->k : j->n, lda = j->a_t ? j->m : j->k;
  CK(cublasGemmEx(j->blas, j->b_t ? CUBLAS_OP_T : CUBLAS_OP_N, j->a_t ? CUBLAS_OP_T : CUBLAS_OP_N, j->n, j->m, j->k,
                  &alpha, j->B, CUDA_R_16BF, ldb, j->A, CUDA_R_16BF, lda, &beta, j->C, CUDA_R_16BF, j->n,
                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
static void run_lt(void *p) {
  Job *j = p; float alpha = 1.f, beta = 0.f;
  CK(cublasLtMatmul(j->lt, j->desc, &alpha, j->B, j->lb, j->A, j->la, &beta, j->C, j->lc, j->C, j->lc, &j->algo,
                    j->ws, j->ws_size, 0));
}

typedef struct { const char *name; int m, n, k, a_t, b_t; } Shape;

// `j` with the product of shape `s`: its sizes and which operands are transposed.
static Job shaped(Job j, const Shape *s) {
  j.m = s->m; j.n = s->n; j.k = s->k; j.a_t = s->a_t; j.b_t = s->b_t;
  return j;
}

int main(void) {
  Job j = {0};
  printf("cublasLt version %zu\n", cublasLtGetVersion());
  CK(cublasCreate(&j.blas)); CK(cublasLtCreate(&j.lt));
  j.ws_size = 32u << 20; CK(cudaMalloc(&j.ws, j.ws_size));
  size_t most = (size_t)160 << 20;  // elements
  CK(cudaMalloc(&j.A, most * 2)); CK(cudaMalloc(&j.B, most * 2)); CK(cudaMalloc(&j.C, most * 2));
  CK(cudaMemset(j.A, 0x3c, most * 2)); CK(cudaMemset(j.B, 0x3c, most * 2));
  cudaEvent_t ea, eb; CK(cudaEventCreate(&ea)); CK(cudaEventCreate(&eb));
  Shape shapes[] = {
#define LAYER(tag, T, h, qkv, inter)                                                                            \
    {tag " dX qkv", T, h, qkv, 0, 0}, {tag " dW qkv", qkv, h, T, 1, 0}, {tag " dX o", T, h, h, 0, 0},            \
    {tag " dW o", h, h, T, 1, 0}, {tag " dX gate/up", T, h, 2 * inter, 0, 0}, {tag " dW gate/up", 2 * inter, h, T, 1, 0}, \
    {tag " dX down", T, inter, h, 0, 0}, {tag " dW down", h, inter, T, 1, 0}
    LAYER("large 6144", 6144, 1536, 4608, 4096), LAYER("large 8192", 8192, 1536, 4608, 4096),
    LAYER("2b4t 8192", 8192, 2560, 3840, 6912), LAYER("falcon 8192", 8192, 2048, 4096, 8192),
  };
  int ns = sizeof(shapes) / sizeof(shapes[0]);
  double tot_def = 0, tot_best = 0, tot_h0 = 0;
  for (int s = 0; s < ns; s++) {
    j = shaped(j, &shapes[s]);
    float def = time_it(run_default, &j, 20, ea, eb);
    CK(cublasLtMatmulDescCreate(&j.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t ta = j.b_t ? CUBLAS_OP_T : CUBLAS_OP_N, tb = j.a_t ? CUBLAS_OP_T : CUBLAS_OP_N;
    CK(cublasLtMatmulDescSetAttribute(j.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    CK(cublasLtMatmulDescSetAttribute(j.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    // Lt's A is our b, Lt's B is our a (column-major view).
    CK(cublasLtMatrixLayoutCreate(&j.lb, CUDA_R_16BF, j.b_t ? j.k : j.n, j.b_t ? j.n : j.k, j.b_t ? j.k : j.n));
    CK(cublasLtMatrixLayoutCreate(&j.la, CUDA_R_16BF, j.a_t ? j.m : j.k, j.a_t ? j.k : j.m, j.a_t ? j.m : j.k));
    CK(cublasLtMatrixLayoutCreate(&j.lc, CUDA_R_16BF, j.n, j.m, j.n));
    cublasLtMatmulPreference_t pref; CK(cublasLtMatmulPreferenceCreate(&pref));
    CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &j.ws_size, sizeof(j.ws_size)));
    cublasLtMatmulHeuristicResult_t res[32]; int found = 0;
    CK(cublasLtMatmulAlgoGetHeuristic(j.lt, j.desc, j.lb, j.la, j.lc, j.lc, pref, 32, res, &found));
    float best = 1e9, h0 = 0; int bi = -1;
    for (int i = 0; i < found; i++) {
      if (res[i].state) continue;
      j.algo = res[i].algo;
      float t = time_it(run_lt, &j, 12, ea, eb);
      if (i == 0) h0 = t;
      if (t < best) { best = t; bi = i; }
    }
    // Re-time the winner and the default once more, interleaved, so that clocks are comparable.
    j.algo = res[bi].algo;
    float best2 = time_it(run_lt, &j, 20, ea, eb), def2 = time_it(run_default, &j, 20, ea, eb);
    if (best2 < best) best = best2;
    if (def2 < def) def = def2;
    double flop = 2.0 * j.m * j.n * j.k;
    printf("%-22s m %5d n %5d k %5d  default %7.1f us (%4.0f TF)  heur0 %7.1f  best[%2d of %2d] %7.1f us (%4.0f TF)  %.3fx\n",
           shapes[s].name, j.m, j.n, j.k, def, flop / def / 1e6, h0, bi, found, best, flop / best / 1e6, def / best);
    fflush(stdout);
    tot_def += def; tot_best += best; tot_h0 += h0;
    if ((s + 1) % 8 == 0) {
      printf("  layer total: default %.1f us, heur0 %.1f, best %.1f (%.3fx)\n", tot_def, tot_h0, tot_best, tot_def / tot_best);
      tot_def = tot_best = tot_h0 = 0;
    }
    cublasLtMatmulPreferenceDestroy(pref); cublasLtMatrixLayoutDestroy(j.la); cublasLtMatrixLayoutDestroy(j.lb);
    cublasLtMatrixLayoutDestroy(j.lc); cublasLtMatmulDescDestroy(j.desc);
  }
  // Each layer's eight GEMMs in order on one stream, against each dX beside its dW on a second stream (the
  // weight gradient needs nothing the input gradient makes), joined by events after each pair.
  cudaStream_t s2; CK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
  cublasHandle_t blas2; CK(cublasCreate(&blas2)); CK(cublasSetStream(blas2, s2));
  void *C2; CK(cudaMalloc(&C2, most * 2));
  cudaEvent_t fork, join; CK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming)); CK(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
  for (int layer = 0; layer < ns / 8; layer++) {
    float serial = 0, paired = 0;
    for (int mode = 0; mode < 2; mode++) {
      for (int rep = 0; rep < 12; rep++) {
        if (rep == 2) CK(cudaEventRecord(ea, 0));
        for (int p = 0; p < 4; p++) {
          Job x = shaped(j, &shapes[layer * 8 + 2 * p]), w = shaped(j, &shapes[layer * 8 + 2 * p + 1]);
          if (mode == 0) { run_default(&x); run_default(&w); }
          else {
            CK(cudaEventRecord(fork, 0)); CK(cudaStreamWaitEvent(s2, fork, 0));
            run_default(&x);
            w.blas = blas2; w.C = C2; run_default(&w);
            CK(cudaEventRecord(join, s2)); CK(cudaStreamWaitEvent(0, join, 0));
          }
        }
      }
      CK(cudaEventRecord(eb, 0)); CK(cudaEventSynchronize(eb));
      float ms; CK(cudaEventElapsedTime(&ms, ea, eb));
      if (mode == 0) serial = ms * 100.f; else paired = ms * 100.f;
    }
    printf("%s: the layer's 8 GEMMs serial %.1f us, dX beside dW on two streams %.1f us (%.3fx)\n", shapes[layer * 8].name,
           serial, paired, serial / paired);
  }
  return 0;
}
