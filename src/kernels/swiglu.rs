//! SwiGLU `h = silu(a) b`, forward and backward, elementwise in one pass each.

use candle_core::{DType, Result, Tensor};

use super::{cuda_device, grid_stride, launch, ptr, ptx, uninit, Ptx};

const PTX: Ptx = ptx!("swiglu");

/// `silu(a) * b` for bf16 `a, b` of one shape.
pub fn swiglu_forward(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dev = cuda_device(a)?;
    let h = uninit(a.shape(), DType::BF16, &dev)?;
    let n = a.elem_count();
    launch!(dev, PTX, "swiglu_forward", grid_stride(n); ptr(a)?, ptr(b)?, ptr(&h)?, n as u64);
    Ok(h)
}

/// `(da, db)` for the upstream gradient `dh`.
pub fn swiglu_backward(dh: &Tensor, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(a)?;
    let (da, db) = (uninit(a.shape(), DType::BF16, &dev)?, uninit(a.shape(), DType::BF16, &dev)?);
    let n = a.elem_count();
    launch!(dev, PTX, "swiglu_backward", grid_stride(n);
        ptr(dh)?, ptr(a)?, ptr(b)?, ptr(&da)?, ptr(&db)?, n as u64);
    Ok((da, db))
}
