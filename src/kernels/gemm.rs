//! cuBLAS products of row-major bf16 matrices that candle's `matmul` cannot express: the weight gradient
//! straight into the gradient buffer (f32 accumulation, beta = 1 to add, no bf16 gradient in memory), and
//! the head's products with rows that lie apart (logits in rows padded to a multiple of 8, the input gradient
//! into its chunk of the rows), instead of a padded copy of the head.

use candle_core::{bail, DType, Result, Tensor};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};

pub use super::shapes::Gemm;
use super::{cuda_device, rows_ptr, uninit};

/// [`gemm`] where it applies (`a` bf16 on CUDA), else `Ok(None)`.
pub fn try_gemm(c: &Tensor, g: Gemm) -> Result<Option<()>> {
    if !super::applies(g.a) {
        return Ok(None);
    }
    gemm(c, g).map(Some)
}

/// `c (+)= op(a) op(b)` accumulated in f32, into `c`: f32 or bf16, `[m, n]` with contiguous rows that may lie
/// further apart than `n` (the first columns of a wider matrix), or `m * n` contiguous elements.
pub fn gemm(c: &Tensor, g: Gemm) -> Result<()> {
    let (m, n, k) = g.dims()?;
    let c = match c.rank() {
        1 => c.reshape((m, n))?,
        _ => c.clone(),
    };
    if c.dims2()? != (m, n)
        || !matches!(c.dtype(), DType::F32 | DType::BF16)
        || g.a.dtype() != DType::BF16
        || g.b.dtype() != DType::BF16
    {
        bail!(
            "gemm: c {:?} {:?} (+)= a {:?} {:?} times b {:?} {:?}",
            c.shape(),
            c.dtype(),
            g.a.shape(),
            g.a.dtype(),
            g.b.shape(),
            g.b.dtype()
        );
    }
    // cuBLAS's Hopper kernels take the product's dimensions in multiples of 8. A vocabulary such as 32002 is
    // not one, and a product over it ran on a generic kernel at half the rate (the head's weight gradient: 321
    // us a loss chunk of 1024 rows, H100): the bulk of such a dimension and its last few are two products.
    let bulk = |len: usize| Some(len / 8 * 8).filter(|&b| b != len && b > 0);
    if let Some(split) = bulk(m) {
        for (at, len) in [(0, split), (split, m - split)] {
            gemm(&c.narrow(0, at, len)?, Gemm { a: &g.a.narrow(g.a_t as usize, at, len)?, ..g })?;
        }
        return Ok(());
    }
    if let Some(split) = bulk(n) {
        for (at, len) in [(0, split), (split, n - split)] {
            gemm(&c.narrow(1, at, len)?, Gemm { b: &g.b.narrow(!g.b_t as usize, at, len)?, ..g })?;
        }
        return Ok(());
    }
    if let Some(split) = bulk(k) {
        for (at, len, add) in [(0, split, g.add), (split, k - split, true)] {
            let (a, b) = (g.a.narrow(!g.a_t as usize, at, len)?, g.b.narrow(g.b_t as usize, at, len)?);
            gemm(&c, Gemm { a: &a, b: &b, add, ..g })?;
        }
        return Ok(());
    }
    let row_major = |x: &Tensor| match x.stride()[1] {
        1 => Ok(x.clone()),
        _ => x.contiguous(),
    };
    let (a, b) = (row_major(g.a)?, row_major(g.b)?);
    let ((a_ptr, lda), (b_ptr, ldb), (c_ptr, ldc)) = (rows_ptr(&a)?, rows_ptr(&b)?, rows_ptr(&c)?);
    let blas = cuda_device(&c)?.cublas_handle();
    let (alpha, beta) = (1f32, if g.add { 1f32 } else { 0f32 });
    let c_type = match c.dtype() {
        DType::BF16 => cudaDataType::CUDA_R_16BF,
        _ => cudaDataType::CUDA_R_32F,
    };
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    // cuBLAS is column-major and sees each row-major matrix transposed: c^T = op(b)^T op(a)^T, an n x m
    // product whose first operand is b (transposed again where b_t) and second a (where a_t).
    // SAFETY: the three addresses point into live tensors whose rows (at their strides) hold the sizes
    // checked above, and the handle runs on candle's stream, ordered with the kernels that made and will
    // read them.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            op(g.b_t),
            op(g.a_t),
            n as i32,
            m as i32,
            k as i32,
            &alpha as *const f32 as *const _,
            b_ptr as *const _,
            cudaDataType::CUDA_R_16BF,
            ldb as i32,
            a_ptr as *const _,
            cudaDataType::CUDA_R_16BF,
            lda as i32,
            &beta as *const f32 as *const _,
            c_ptr as *mut _,
            c_type,
            ldc as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| candle_core::Error::Msg(format!("cublasGemmEx: {e:?}")))
}

/// The head's logits `h w^T` (`h: [n, c]`, `w: [vocab, c]`, bf16 on CUDA) as bf16 rows of the vocabulary
/// rounded up to a multiple of 8, the padding columns unset (the cross-entropy kernel and cuBLAS's fast
/// kernels read aligned rows); `Ok(None)` where it does not apply.
pub fn try_padded_logits(h: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if !super::applies(h) {
        return Ok(None);
    }
    let (n, vocab) = (h.dim(0)?, w.dim(0)?);
    let logits = uninit((n, vocab.next_multiple_of(8)), DType::BF16, &cuda_device(h)?)?;
    gemm(&logits.narrow(1, 0, vocab)?, Gemm { a: h, a_t: false, b: w, b_t: true, add: false })?;
    Ok(Some(logits))
}
