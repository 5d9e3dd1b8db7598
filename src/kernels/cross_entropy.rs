//! Cross-entropy forward and backward in one kernel over the bf16 logits.

use candle_core::{DType, Result, Tensor};

use super::{aligned_ptr, cuda_device, launch, ptr, ptx, uninit, Ptx};

const PTX: Ptx = ptx!("cross_entropy");

/// The summed masked loss (an f64 scalar on the device) and `dlogits` (bf16, the logits' shape) for
/// `logits: [n, stride]` (bf16, `stride` a multiple of 8: the kernel reads 16 bytes at a time) of which the
/// first `v` columns are the vocabulary, `targets: [n]` (u32) and `mask: [n]` (f32). `Ok(None)` where the
/// kernel does not apply (not bf16 on CUDA, or `stride` not a multiple of 8, which the head's padding gives).
pub fn try_cross_entropy_forward_backward(
    logits: &Tensor,
    v: usize,
    targets: &Tensor,
    mask: &Tensor,
) -> Result<Option<(Tensor, Tensor)>> {
    let (n, stride) = logits.dims2()?;
    if !(super::applies(logits) && stride.is_multiple_of(8)) {
        return Ok(None);
    }
    let (logits, targets, mask) = (logits.contiguous()?, targets.contiguous()?, mask.contiguous()?);
    let dev = cuda_device(&logits)?;
    let (loss, dlogits) = (uninit(n, DType::F32, &dev)?, uninit((n, stride), DType::BF16, &dev)?);
    launch!(dev, PTX, "cross_entropy_forward_backward", super::per_row(n, 512);
        aligned_ptr(&logits)?, ptr(&targets)?, ptr(&mask)?, ptr(&loss)?, aligned_ptr(&dlogits)?, v as i32,
        stride as i32);
    Ok(Some((loss.to_dtype(DType::F64)?.sum_all()?, dlogits)))
}
