//! The embedding's backward: token gradients summed into their ids' rows.

use candle_core::{Result, Tensor};

use super::{cuda_device, launch, ptr, ptx, Ptx};
use crate::train::layers::TokenRows;

const PTX: Ptx = ptx!("embedding");

/// `dtable += ` the embedding's gradient, in place: row `id` of the contiguous f32 `dtable` (`[vocab, c]`, a
/// slot of the gradient buffer) gets the sum of the rows of `dx: [n, c]` (bf16) whose token is `id`; the
/// rows of ids the batch does not hold are not touched.
pub fn add_embedding_rows(dtable: &Tensor, dx: &Tensor, rows: &TokenRows) -> Result<()> {
    let c = dx.dim(1)?;
    let dev = cuda_device(dx)?;
    // SAFETY (of writing through `dtable`): the gradient buffer is the backward's alone until it ends.
    launch!(dev, PTX, "embedding_backward", super::per_row(rows.distinct, 256);
        ptr(dtable)?, ptr(dx)?, ptr(&rows.order)?, ptr(&rows.runs)?, c as i32);
    Ok(())
}
