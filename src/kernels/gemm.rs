//! The weight-gradient GEMM of a linear layer, straight into the f32 gradient buffer: one cuBLAS call with bf16
//! inputs, f32 accumulation and beta = 1 (or 0 for the step's first gradient of the slot), instead of a bf16
//! gradient in memory and an addition.

use candle_core::{bail, DType, Result, Tensor};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};

use super::{cuda_device, ptr, rows_ptr};

/// [`gemm_at_b`] where it applies (`a` bf16 on CUDA), else `Ok(None)`.
pub fn try_gemm_at_b(c: &Tensor, a: &Tensor, b: &Tensor, add: bool) -> Result<Option<()>> {
    if !super::applies(a) {
        return Ok(None);
    }
    gemm_at_b(c, a, b, add).map(Some)
}

/// `c += a^T b` (`add`), or `c = a^T b` (beta = 0: cuBLAS does not read `c`), for row-major bf16 `a: [n, m]`
/// and `b: [n, k]`, into the contiguous f32 or bf16 `c` (the gradient buffer, `train.grad_buffer`) of `m * k`
/// elements (row-major `[m, k]`), accumulated in f32. `a`'s rows may lie
/// further apart than `m` (the first columns of a wider matrix: the head's gradient skips the logits' padding
/// columns so).
pub fn gemm_at_b(c: &Tensor, a: &Tensor, b: &Tensor, add: bool) -> Result<()> {
    let ((n, m), (nb, k)) = (a.dims2()?, b.dims2()?);
    if n != nb
        || c.elem_count() != m * k
        || !matches!(c.dtype(), DType::F32 | DType::BF16)
        || a.dtype() != DType::BF16
        || b.dtype() != DType::BF16
    {
        bail!(
            "gemm_at_b: c {:?} {:?} (+)= a^T b with a {:?} {:?}, b {:?} {:?}",
            c.shape(),
            c.dtype(),
            a.shape(),
            a.dtype(),
            b.shape(),
            b.dtype()
        );
    }
    // cuBLAS's Hopper kernels take the product's dimensions in multiples of 8. The head's 32002 vocabulary
    // columns are not one, and its whole product ran on a generic kernel at half the rate (321 us a loss chunk
    // of 1024 rows, H100): the bulk of the columns and the last few are two products instead.
    let bulk = m / 8 * 8;
    if bulk != m && bulk > 0 {
        gemm_at_b(&c.narrow(0, 0, bulk * k)?, &a.narrow(1, 0, bulk)?, b, add)?;
        return gemm_at_b(&c.narrow(0, bulk * k, (m - bulk) * k)?, &a.narrow(1, bulk, m - bulk)?, b, add);
    }
    let b = b.contiguous()?;
    let (a_ptr, lda) = rows_ptr(a)?;
    let blas = cuda_device(c)?.cublas_handle();
    let (alpha, beta) = (1f32, if add { 1f32 } else { 0f32 });
    let c_type = match c.dtype() {
        DType::BF16 => cudaDataType::CUDA_R_16BF,
        _ => cudaDataType::CUDA_R_32F,
    };
    // cuBLAS is column-major and sees each row-major matrix transposed: c^T = b^T a, with b^T a k x n
    // matrix (ld k) and a^T an m x n one (ld: a's row stride), so the first operand is b as is, the second a
    // transposed.
    // SAFETY: the three addresses point into live contiguous tensors of the sizes checked above, and the
    // handle runs on candle's stream, ordered with the kernels that made and will read them.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            cublasOperation_t::CUBLAS_OP_N,
            cublasOperation_t::CUBLAS_OP_T,
            k as i32,
            m as i32,
            n as i32,
            &alpha as *const f32 as *const _,
            ptr(&b)? as *const _,
            cudaDataType::CUDA_R_16BF,
            k as i32,
            a_ptr as *const _,
            cudaDataType::CUDA_R_16BF,
            lda as i32,
            &beta as *const f32 as *const _,
            ptr(c)? as *mut _,
            c_type,
            k as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| candle_core::Error::Msg(format!("cublasGemmEx (weight gradient): {e:?}")))
}
