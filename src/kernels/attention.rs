//! Attention's masked softmax for one block of queries, forward and backward, between cuBLAS GEMMs.

use candle_core::{DType, Result, Tensor};

use cudarc::driver::LaunchConfig;

use super::{aligned_ptr, cuda_device, launch, ptr, ptx, uninit, Ptx};

const PTX: Ptx = ptx!("attention");

/// One warp per row, 8 rows per block of 256 threads (`WARPS` in the kernel).
fn warp_per_row(rows: usize) -> LaunchConfig {
    super::per_row(rows.div_ceil(8), 256)
}

/// The address of a `[rows, nk]` tensor; rows of a multiple of 8 keys are read 16 bytes at a time.
fn aligned(t: &Tensor, nk: usize) -> Result<u64> {
    if nk.is_multiple_of(8) {
        aligned_ptr(t)
    } else {
        ptr(t)
    }
}

/// For unscaled scores `s: [b, heads, nq, nk]` (bf16) of queries `q0..q0 + nq` against keys `0..nk`, and
/// `start: [b, t]` (f32, each token's first visible key): the probabilities (bf16, the scores' shape) and
/// each row's log-sum-exp (f32 `[b, heads, nq, 1]`). `Ok(None)` where the kernel does not apply.
pub fn try_block_forward(s: &Tensor, start: &Tensor, q0: usize, scale: f64) -> Result<Option<(Tensor, Tensor)>> {
    if !super::applies(s) {
        return Ok(None);
    }
    let (s, start) = (s.contiguous()?, start.contiguous()?);
    let (b, heads, nq, nk) = s.dims4()?;
    let t = start.dim(1)?;
    let dev = cuda_device(&s)?;
    let (p, lse) = (uninit(s.shape(), DType::BF16, &dev)?, uninit((b, heads, nq, 1), DType::F32, &dev)?);
    let rows = b * heads * nq;
    launch!(dev, PTX, "attention_block_forward", warp_per_row(rows);
        aligned(&s, nk)?, ptr(&start)?, aligned(&p, nk)?, ptr(&lse)?,
        rows as i32, q0 as i32, nq as i32, nk as i32, t as i32, heads as i32, scale as f32);
    Ok(Some((p, lse)))
}

/// From the recomputed scores `s`, the saved `lse` of the block's rows and `dp = dY V^T` (bf16): the
/// probabilities and the scores' gradient times `scale`, both bf16 in the scores' shape. `Ok(None)` where the
/// kernel does not apply.
pub fn try_block_backward(
    s: &Tensor,
    lse: &Tensor,
    dp: &Tensor,
    start: &Tensor,
    q0: usize,
    scale: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    if !super::applies(s) {
        return Ok(None);
    }
    let (s, lse, dp, start) = (s.contiguous()?, lse.contiguous()?, dp.contiguous()?, start.contiguous()?);
    let (b, heads, nq, nk) = s.dims4()?;
    let t = start.dim(1)?;
    let dev = cuda_device(&s)?;
    let (p, ds) = (uninit(s.shape(), DType::BF16, &dev)?, uninit(s.shape(), DType::BF16, &dev)?);
    let rows = b * heads * nq;
    launch!(dev, PTX, "attention_block_backward", warp_per_row(rows);
        aligned(&s, nk)?, ptr(&lse)?, aligned(&dp, nk)?, ptr(&start)?, aligned(&p, nk)?, aligned(&ds, nk)?,
        rows as i32, q0 as i32, nq as i32, nk as i32, t as i32, heads as i32, scale as f32);
    Ok(Some((p, ds)))
}
