//! SwiGLU over the fused gate/up projection, forward and backward.

use candle_core::{DType, Result, Tensor};

use super::{aligned_ptr, cuda_device, grid_stride, launch, ptx, uninit, Ptx};

const PTX: Ptx = ptx!("swiglu");

/// Whether the kernels take `m` channels per half: whole 8-channel vectors.
pub fn supports(m: usize) -> bool {
    m.is_multiple_of(8)
}

/// `h = silu(gate) * up` for `gu = [gate | up]: [n, 2m]` (bf16); `h: [n, m]`.
pub fn swiglu_forward(gu: &Tensor) -> Result<Tensor> {
    let (n, m) = (gu.dim(0)?, gu.dim(1)? / 2);
    let dev = cuda_device(gu)?;
    let h = uninit((n, m), DType::BF16, &dev)?;
    launch!(dev, PTX, "swiglu_forward", grid_stride(n * m / 8);
        aligned_ptr(gu)?, aligned_ptr(&h)?, n as i32, m as i32);
    Ok(h)
}

/// `[dgate | dup]: [n, 2m]` from `dh: [n, m]` and `gu` (bf16).
pub fn swiglu_backward(dh: &Tensor, gu: &Tensor) -> Result<Tensor> {
    let (n, m) = dh.dims2()?;
    let dev = cuda_device(gu)?;
    let dgu = uninit((n, 2 * m), DType::BF16, &dev)?;
    launch!(dev, PTX, "swiglu_backward", grid_stride(n * m / 8);
        aligned_ptr(dh)?, aligned_ptr(gu)?, aligned_ptr(&dgu)?, n as i32, m as i32);
    Ok(dgu)
}
