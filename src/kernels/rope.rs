//! RoPE fused with the head split of the fused q, k, v projection, forward and backward.

use candle_core::{DType, Result, Tensor};

use super::shapes::HeadShape;
use super::{aligned_ptr, cuda_device, launch, ptx, uninit, Ptx};

const PTX: Ptx = ptx!("rope");

/// Whether the kernel takes heads of `head_dim` channels: halves of whole 8-channel vectors (64, 96, 128, 256
/// and the rest of the multiples of 16).
pub fn supports(head_dim: usize) -> bool {
    head_dim.is_multiple_of(16)
}

/// Whether the kernel applies to `x`: bf16 on CUDA, heads it takes.
fn takes(x: &Tensor, s: HeadShape) -> bool {
    super::applies(x) && supports(s.head_dim)
}

fn launch_qkv_rope(
    qkv: &Tensor,
    heads: [&Tensor; 3],
    cos: &Tensor,
    sin: &Tensor,
    s: HeadShape,
    backward: bool,
) -> Result<()> {
    let dev = cuda_device(qkv)?;
    let rows = (s.batch * s.seq).clamp(1, 65_535);
    // A thread per (head, 8 pairs) slot of the row, so that no block runs a second, mostly idle round over
    // them (256 threads for the large model's 288 slots: 47 us a call, H100).
    let slots = (s.q_heads + 2 * s.kv_heads) * s.head_dim / 16;
    let threads = (slots.div_ceil(32) * 32).min(1024) as u32;
    launch!(dev, PTX, "qkv_rope", super::per_row(rows, threads);
        aligned_ptr(qkv)?, aligned_ptr(heads[0])?, aligned_ptr(heads[1])?, aligned_ptr(heads[2])?, aligned_ptr(cos)?,
        aligned_ptr(sin)?,
        s.batch as i32, s.seq as i32, s.q_heads as i32, s.kv_heads as i32, s.head_dim as i32, backward as i32);
    Ok(())
}

/// `(q, k, v)` heads from the projection rows `qkv` (bf16), q and k rotated by `cos, sin: [b, t, d/2]`.
/// `Ok(None)` where the kernel does not apply.
pub fn try_qkv_heads(
    qkv: &Tensor,
    s: HeadShape,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if !takes(qkv, s) {
        return Ok(None);
    }
    let (qkv, cos, sin) = (qkv.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let dev = cuda_device(&qkv)?;
    let (b, t, d) = (s.batch, s.seq, s.head_dim);
    let q = uninit((b, s.q_heads, t, d), DType::BF16, &dev)?;
    let k = uninit((b, s.kv_heads, t, d), DType::BF16, &dev)?;
    let v = uninit((b, s.kv_heads, t, d), DType::BF16, &dev)?;
    launch_qkv_rope(&qkv, [&q, &k, &v], &cos, &sin, s, false)?;
    Ok(Some((q, k, v)))
}

/// The gradient at the projection rows from the heads' gradients (bf16). `Ok(None)` where the kernel does
/// not apply.
pub fn try_qkv_heads_backward(
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    s: HeadShape,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Option<Tensor>> {
    if !takes(dq, s) {
        return Ok(None);
    }
    let (dq, dk, dv) = (dq.contiguous()?, dk.contiguous()?, dv.contiguous()?);
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let dev = cuda_device(&dq)?;
    let dqkv = uninit((s.batch * s.seq, (s.q_heads + 2 * s.kv_heads) * s.head_dim), DType::BF16, &dev)?;
    launch_qkv_rope(&dqkv, [&dq, &dk, &dv], &cos, &sin, s, true)?;
    Ok(Some(dqkv))
}
