//! The embedding: its forward's gather of the tokens' rows, and its backward's token gradients summed into
//! their ids' rows.

use candle_core::{DType, Result, Tensor};

use super::shapes::TokenRows;
use super::{aligned_ptr, cuda_device, grid_stride, launch, ptr, ptx, uninit, Ptx};

const PTX: Ptx = ptx!("embedding");

/// The rows of `table` (`[vocab, c]`, bf16) at `ids` (u32, each below `vocab`, as the trainer checks its data
/// before the first step): `[n, c]`, as `table.index_select(ids, 0)`.
/// `Ok(None)` where the kernel does not apply (not bf16 on CUDA, `c` not a multiple of 8, a table that does
/// not start on the 16-byte grid).
pub fn try_embedding_rows(table: &Tensor, ids: &Tensor) -> Result<Option<Tensor>> {
    let c = table.dim(1)?;
    if !(super::applies(table) && c.is_multiple_of(8) && table.is_contiguous() && ids.dtype() == DType::U32) {
        return Ok(None);
    }
    let Ok(table_ptr) = aligned_ptr(table) else { return Ok(None) };
    let ids = ids.contiguous()?;
    let n = ids.elem_count();
    let dev = cuda_device(table)?;
    let out = uninit((n, c), DType::BF16, &dev)?;
    launch!(dev, PTX, "embedding_forward", grid_stride(n * c / 8);
        table_ptr, ptr(&ids)?, aligned_ptr(&out)?, n as u64, (c / 8) as i32);
    Ok(Some(out))
}

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
        DType::BF16 => "embedding_backward_bf16",
        _ => "embedding_backward_f32",
    };
    launch!(dev, PTX, name, super::per_row(rows.distinct, 256);
        ptr(dtable)?, ptr(&dx)?, ptr(&rows.order)?, ptr(&rows.runs)?, c as i32);
    Ok(Some(()))
}
