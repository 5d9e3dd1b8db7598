//! The residual stream's add.

use candle_core::{DType, Result, Tensor};

use super::{aligned_ptr, cuda_device, grid_stride, launch, ptx, uninit, Ptx};

const PTX: Ptx = ptx!("residual");

/// Whether the kernel takes tensors of `n` elements: whole 8-element vectors.
pub fn supports(n: usize) -> bool {
    n.is_multiple_of(8)
}

/// `x + branch` for two contiguous bf16 tensors of one shape.
pub fn residual_add(x: &Tensor, branch: &Tensor) -> Result<Tensor> {
    let dev = cuda_device(x)?;
    let out = uninit(x.shape(), DType::BF16, &dev)?;
    let vectors = x.elem_count() / 8;
    launch!(dev, PTX, "residual_add", grid_stride(vectors);
        aligned_ptr(x)?, aligned_ptr(branch)?, aligned_ptr(&out)?, vectors as u64);
    Ok(out)
}
