//! The embedding's backward: token gradients summed into their ids' rows.

use candle_core::{Result, Tensor};

use super::shapes::TokenRows;
use super::{cuda_device, launch, ptr, ptx, Ptx};

const PTX: Ptx = ptx!("embedding");

/// `dtable += ` the embedding's gradient (`add`), or `dtable = ` it, in place: row `id` of the contiguous f32
/// or bf16 `dtable` (`[vocab, c]`, a slot of the gradient buffer) gets the sum of the rows of `dx: [n, c]` (bf16)
/// whose token is `id`. `Ok(None)` where the kernel does not apply.
pub fn try_add_embedding_rows(dtable: &Tensor, dx: &Tensor, rows: &TokenRows, add: bool) -> Result<Option<()>> {
    if !super::applies(dx) {
        return Ok(None);
    }
    // The kernel writes the rows of the batch's ids only: when overwriting, the table's other rows need zeros.
    if !add {
        super::flat::zero(dtable)?;
    }
    let dx = dx.contiguous()?;
    let c = dx.dim(1)?;
    let dev = cuda_device(&dx)?;
    // SAFETY (of writing through `dtable`): the gradient buffer is the backward's alone until it ends.
    let name = match dtable.dtype() {
        candle_core::DType::BF16 => "embedding_backward_bf16",
        _ => "embedding_backward_f32",
    };
    launch!(dev, PTX, name, super::per_row(rows.distinct, 256);
        ptr(dtable)?, ptr(&dx)?, ptr(&rows.order)?, ptr(&rows.runs)?, c as i32);
    Ok(Some(()))
}
