//! The residual stream's add, and at inference the BitLinear outputs' scales with it.

use candle_core::{DType, Result, Tensor, D};

use super::{aligned_ptr, cuda_device, grid_stride, launch, ptr, ptx, uninit, Ptx};

const PTX: Ptx = ptx!("residual");

/// `x + branch` for two bf16 tensors of one shape on CUDA, of whole 8-element vectors; `Ok(None)` otherwise.
pub fn try_residual_add(x: &Tensor, branch: &Tensor) -> Result<Option<Tensor>> {
    try_scale_add(branch, None, Some(x))
}

/// `branch * scale (+ residual)` for a bf16 `branch: [.., n]` (a GEMM's output), each column's `scale: [n]`
/// and a `residual` of its shape, rounded as candle's broadcast multiply and add round; `Ok(None)` where the
/// kernel does not apply (not bf16 on CUDA, `n` not a multiple of 8).
pub fn try_scale_add(branch: &Tensor, scale: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Option<Tensor>> {
    let n = branch.dim(D::Minus1)?;
    if !(super::applies(branch) && n.is_multiple_of(8)) {
        return Ok(None);
    }
    if scale.is_some_and(|s| s.elem_count() != n) || residual.is_some_and(|r| r.dims() != branch.dims()) {
        candle_core::bail!(
            "scale_add: {:?} with scale {:?}, residual {:?}",
            branch.dims(),
            scale.map(|s| s.dims()),
            residual.map(|r| r.dims())
        );
    }
    let branch = branch.contiguous()?;
    let (scale, residual) = (scale.map(|s| s.contiguous()).transpose()?, residual.map(|r| r.contiguous()).transpose()?);
    let dev = cuda_device(&branch)?;
    let out = uninit(branch.shape(), DType::BF16, &dev)?;
    let vectors = branch.elem_count() / 8;
    let or_null = |t: &Option<Tensor>| t.as_ref().map_or(Ok(0), aligned_ptr);
    launch!(dev, PTX, "residual_add", grid_stride(vectors);
        or_null(&residual)?, aligned_ptr(&branch)?, or_null(&scale)?, ptr(&out)?, vectors as u64, n as i32);
    Ok(Some(out))
}
