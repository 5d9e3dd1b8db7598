//! The embedding's backward: token gradients summed into their ids' rows.

use candle_core::{DType, Result, Tensor};

use super::{cuda_device, launch, ptr, ptx, Ptx};
use crate::train::layers::TokenRows;

const PTX: Ptx = ptx!("embedding");

/// `[vocab, c]` f32: row `id` holds the sum of the rows of `dx: [n, c]` (bf16) whose token is `id`.
pub fn embedding_backward(dx: &Tensor, rows: &TokenRows, vocab: usize) -> Result<Tensor> {
    let c = dx.dim(1)?;
    let dev = cuda_device(dx)?;
    let dtable = Tensor::zeros((vocab, c), DType::F32, dx.device())?;
    launch!(dev, PTX, "embedding_backward", super::per_row(rows.distinct, 256);
        ptr(&dtable)?, ptr(dx)?, ptr(&rows.order)?, ptr(&rows.runs)?, c as i32);
    Ok(dtable)
}
