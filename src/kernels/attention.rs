//! Attention's masked softmax, forward and backward, between cuBLAS GEMMs.

use candle_core::{DType, Result, Tensor};

use super::{cuda_device, launch, ptr, ptx, uninit, Ptx};

const PTX: Ptx = ptx!("attention");

/// `P = softmax(S scale + mask)` in bf16 for unscaled scores `s: [b, heads, t, t]` (bf16) and the packed
/// examples' segment ids `segments: [b, t]` (u32), which define the block-diagonal causal mask.
pub fn softmax_forward(s: &Tensor, segments: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, heads, t, _) = s.dims4()?;
    let dev = cuda_device(s)?;
    let p = uninit(s.shape(), DType::BF16, &dev)?;
    launch!(dev, PTX, "attention_softmax_forward", super::per_row(b * heads * t, 256);
        ptr(s)?, ptr(segments)?, ptr(&p)?, t as i32, heads as i32, scale as f32);
    Ok(p)
}

/// The scores' gradient times `scale`, from the saved probabilities `p` and `dp = dY V^T` (bf16).
pub fn softmax_backward(p: &Tensor, dp: &Tensor, scale: f64) -> Result<Tensor> {
    let t = p.dim(3)?;
    let rows = p.elem_count() / t;
    let dev = cuda_device(p)?;
    let ds = uninit(p.shape(), DType::BF16, &dev)?;
    launch!(dev, PTX, "attention_softmax_backward", super::per_row(rows, 256);
        ptr(p)?, ptr(dp)?, ptr(&ds)?, t as i32, scale as f32);
    Ok(ds)
}
