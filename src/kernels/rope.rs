//! RoPE fused with the head split of the fused q, k, v projection, forward and backward.

use candle_core::{DType, Result, Tensor};

use super::{aligned_ptr, cuda_device, launch, ptx, uninit, Ptx};
use crate::train::layers::HeadShape;

const PTX: Ptx = ptx!("rope");

/// Whether the kernel takes heads of `head_dim` channels: halves of whole 8-channel vectors.
pub fn supports(head_dim: usize) -> bool {
    head_dim.is_multiple_of(16)
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

/// `(q, k, v)` heads from the projection rows `qkv` (bf16), q and k rotated.
pub fn qkv_heads(qkv: &Tensor, s: HeadShape, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = cuda_device(qkv)?;
    let (b, t, d) = (s.batch, s.seq, s.head_dim);
    let q = uninit((b, s.q_heads, t, d), DType::BF16, &dev)?;
    let k = uninit((b, s.kv_heads, t, d), DType::BF16, &dev)?;
    let v = uninit((b, s.kv_heads, t, d), DType::BF16, &dev)?;
    launch_qkv_rope(qkv, [&q, &k, &v], cos, sin, s, false)?;
    Ok((q, k, v))
}

/// The gradient at the projection rows from the heads' gradients (bf16).
pub fn qkv_heads_backward(
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    s: HeadShape,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let dev = cuda_device(dq)?;
    let dqkv = uninit((s.batch * s.seq, (s.q_heads + 2 * s.kv_heads) * s.head_dim), DType::BF16, &dev)?;
    launch_qkv_rope(&dqkv, [dq, dk, dv], cos, sin, s, true)?;
    Ok(dqkv)
}
