//! The arithmetic that BitNet inference (`model::bitnet`) and training (`train`) share: the weight and
//! activation quantizers, the gate's activation and grouped-query attention's key/value repetition. A leaf:
//! it depends on candle and the family table only.

use candle_core::{DType, Result, Tensor, D};

use crate::model::arch::Activation;

/// Quantizes a latent weight matrix to ternary: `s = 1 / mean|W|`, `Wq = clamp(round(W s), -1, 1)`.
/// Returns the ternary matrix (values -1, 0, 1, f32) and `1 / s` as a one-element f32 tensor, so that
/// `W ≈ Wq / s` without a device round trip.
pub fn quantize_weight(w: &Tensor) -> Result<(Tensor, Tensor)> {
    let w = w.to_dtype(DType::F32)?;
    // Two stages (rows, then their sums in f64): GPU reductions parallelise over the rows, and the f64
    // second stage keeps the scale, and with it every rounding boundary, as exact as PyTorch's.
    let rows = w.abs()?.sum(D::Minus1)?.to_dtype(DType::F64)?;
    quantize_weight_part(&w, &rows.sum_all()?, w.elem_count())
}

/// [`quantize_weight`] of some elements of a matrix of `n` elements (under ZeRO-1, a rank's shard of it), the
/// scale from `abs_sum`, the f64 sum of `|W|` over the whole matrix.
pub fn quantize_weight_part(w: &Tensor, abs_sum: &Tensor, n: usize) -> Result<(Tensor, Tensor)> {
    let mean = (abs_sum / n as f64)?.to_dtype(DType::F32)?;
    let s = mean.clamp(1e-5f32, f32::INFINITY)?.recip()?;
    let ternary = w.to_dtype(DType::F32)?.broadcast_mul(&s)?.round()?.clamp(-1f32, 1f32)?;
    Ok((ternary, s.recip()?))
}

/// Quantizes activations per token (last dim) to int8: `s = 127 / max|x|`, `xq = clamp(round(x s), -128, 127)`.
/// Returns the integer values as f32 and `1 / s` per token (shape `[.., 1]`).
/// candle rounds halves away from zero where PyTorch rounds them to even; exact halves are measure-zero
/// events for real activations.
pub fn quantize_activations(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let x = x.to_dtype(DType::F32)?;
    let absmax = x.abs()?.max_keepdim(D::Minus1)?.clamp(1e-5f32, f32::INFINITY)?;
    let scale = (absmax / 127.0)?;
    let q = x.broadcast_div(&scale)?.round()?.clamp(-128f32, 127f32)?;
    Ok((q, scale))
}

/// The gate's activation: `silu(x)`, or `relu(x)^2` (2B4T).
pub fn activate(x: &Tensor, activation: Activation) -> Result<Tensor> {
    match activation {
        Activation::Silu => x.silu(),
        Activation::Relu2 => x.relu()?.sqr(),
    }
}

/// Grouped-query attention: each key/value head serves `groups` query heads. With one group `x` is returned
/// as it is: the KV cache's keys are a strided view of its buffer that matmul reads in place, and copying
/// them for every layer and token (with the page faults of the fresh buffers) was a third of packed CPU
/// decoding time.
pub fn repeat_kv(x: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(x.clone());
    }
    let (b, n, t, d) = x.dims4()?;
    x.unsqueeze(2)?.expand((b, n, groups, t, d))?.reshape((b, n * groups, t, d))
}
