//! The residual stream's add.

use candle_core::{DType, Result, Tensor};

use super::{aligned_ptr, cuda_device, grid_stride, launch, ptx, uninit, Ptx};

const PTX: Ptx = ptx!("residual");

/// `x + branch` for two bf16 tensors of one shape on CUDA, of whole 8-element vectors; `Ok(None)` otherwise.
pub fn try_residual_add(x: &Tensor, branch: &Tensor) -> Result<Option<Tensor>> {
    if !(super::applies(x) && x.elem_count().is_multiple_of(8)) {
        return Ok(None);
    }
    let (x, branch) = (x.contiguous()?, branch.contiguous()?);
    let dev = cuda_device(&x)?;
    let out = uninit(x.shape(), DType::BF16, &dev)?;
    let vectors = x.elem_count() / 8;
    launch!(dev, PTX, "residual_add", grid_stride(vectors);
        aligned_ptr(&x)?, aligned_ptr(&branch)?, aligned_ptr(&out)?, vectors as u64);
    Ok(Some(out))
}
