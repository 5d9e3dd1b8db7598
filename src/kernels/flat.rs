//! Kernels over the flat f32 buffers: this step's weights (the ternary BitLinear matrices, absmean scale and
//! write, and the cast of the rest; of the whole buffer or of a ZeRO-1 shard), sums of squares for the
//! gradient norm, and AdamW over the whole buffer.

use std::ops::Range;

use candle_core::{DType, Result, Tensor};

use cudarc::driver::LaunchConfig;

use super::shapes::{first_rows, Int8Operand};
use super::{cuda_device, grid_stride, launch, ptr, ptx, uninit, Ptx};

const PTX: Ptx = ptx!("flat");

/// `sum(x^2)` of a contiguous f32 or bf16 tensor (the gradient buffer), accumulated in f64: an f64 scalar left
/// on the device. One partial sum a block, then candle's sum of those.
pub fn sum_squares(x: &Tensor) -> Result<Tensor> {
    let name = match x.dtype() {
        DType::F32 => "sum_squares_f32",
        DType::BF16 => "sum_squares_bf16",
        d => candle_core::bail!("sum_squares: no {d:?} kernel (f32 or bf16 only)"),
    };
    let n = x.elem_count();
    let cfg = grid_stride(n);
    let dev = cuda_device(x)?;
    let partials = uninit(cfg.grid_dim.0 as usize, DType::F64, &dev)?;
    launch!(dev, PTX, name, cfg; ptr(x)?, n as u64, ptr(&partials)?);
    partials.sum_all()
}

/// Partial sums of `|W|` per slot in [`absmean_partials`] (the same count on every rank, so that ZeRO-1's
/// ranks can sum them elementwise): enough blocks for the largest matrices to fill the card.
const SLOT_PARTS: u32 = 32;

/// [`step_weights`] where it applies (`flat` on CUDA, bf16 weights asked for), else `Ok(None)`.
pub fn try_step_weights(
    flat: &Tensor,
    slots: &[(Range<usize>, Option<usize>)],
    lambda: f64,
    dtype: DType,
    codes: bool,
) -> Result<Option<(Tensor, Option<TernaryCodes>)>> {
    if !(super::on_cuda(flat) && dtype == DType::BF16) {
        return Ok(None);
    }
    step_weights(&flat.contiguous()?, slots, lambda, codes).map(Some)
}

/// This step's weights in bf16, `[flat.len()]`, the layout of the f32 `flat`: every slot either the BitLinear
/// weight of its latent (`(range, Some(columns))`: ternary times the absmean scale, blended by `lambda`) or a
/// cast (`(range, None)`); with `codes` (lambda 1 only) also the matrices' [`TernaryCodes`]. Two launches for
/// the whole model: every matrix's partial sums of `|W|`, then every slot's writes.
pub fn step_weights(
    flat: &Tensor,
    slots: &[(Range<usize>, Option<usize>)],
    lambda: f64,
    codes: bool,
) -> Result<(Tensor, Option<TernaryCodes>)> {
    let table = SlotTable::new(flat, slots, 0..flat.elem_count(), |_| false)?;
    let partials = absmean_partials(flat, &table)?;
    step_weights_in(flat, &table, &partials, lambda, 0..flat.elem_count(), 0..slots.len(), codes)
}

/// The BitLinear matrices of a step's weights as the int8 GEMM reads them: the ternary codes (u8 holding
/// -1, 0, 1), laid out as the flat buffer from the first matrix to the last one built (the casts around them,
/// such as the embedding and the head, get none), and every matrix row's scale (f32, the rows of all the
/// table's matrices in slot order, [`first_rows`]), the bf16 value of the matrix's nonzero weights: each
/// weight is exactly its code times its row's scale.
#[derive(Clone)]
pub struct TernaryCodes {
    codes: Tensor,
    row_scales: Tensor,
    /// Where the codes' buffer starts in the flat layout, and each slot's first row.
    base: usize,
    first_rows: std::sync::Arc<Vec<Option<usize>>>,
}

impl TernaryCodes {
    /// The matrix `[rows, columns]` of the neighbouring slots whose elements are `range` (one matrix, or
    /// several read by one GEMM), the first of them slot `first`: its codes and row scales.
    pub fn operand(&self, first: usize, range: Range<usize>, columns: usize) -> Result<Int8Operand> {
        let Some(row) = self.first_rows[first] else {
            candle_core::bail!("slot {first} is not a BitLinear matrix: it has no ternary codes");
        };
        let rows = range.len() / columns;
        Ok(Int8Operand {
            codes: self.codes.narrow(0, range.start - self.base, range.len())?.reshape((rows, columns))?,
            scales: self.row_scales.narrow(0, row, rows)?,
        })
    }
}

/// The slots as the kernels read them, for the elements of the flat buffer in a range (the whole buffer, or
/// under ZeRO-1 a rank's shard): per slot, the first element and the count of its part in the range, for a
/// BitLinear matrix its whole element count (0 for a cast), its first block of the grid of the step weights'
/// writes and of AdamW, and whether weight decay applies to it (AdamW's table only). One upload, which waits
/// for the stream.
pub struct SlotTable {
    table: Tensor,
    slots: usize,
    /// The grid: a block per `WRITE_CHUNK` elements of each slot's part.
    blocks: u32,
    /// Each slot's first block of the grid, and the grid's size last (host copies of the table's column).
    firsts: Vec<u32>,
    /// Each matrix's first row among all the matrices' rows, and the rows in all ([`first_rows`]).
    first_rows: std::sync::Arc<Vec<Option<usize>>>,
    rows: usize,
    /// Each slot's elements in the flat buffer (all of the slot's, whatever the range).
    ranges: Vec<Range<usize>>,
    /// Whether the range holds part of a matrix only (a ZeRO-1 shard's ends).
    partial: bool,
}

/// Elements per block of the step weights' writes and of AdamW (8 accesses of 4 per thread).
const WRITE_CHUNK: usize = 256 * 4 * 8;

impl SlotTable {
    /// `decays(k)`: whether AdamW's weight decay applies to slot k.
    pub fn new(
        flat: &Tensor,
        slots: &[(Range<usize>, Option<usize>)],
        range: Range<usize>,
        decays: impl Fn(usize) -> bool,
    ) -> Result<Self> {
        let mut blocks = 0;
        let mut table = Vec::with_capacity(7 * slots.len());
        let mut firsts = Vec::with_capacity(slots.len() + 1);
        let (first_rows, rows) = first_rows(slots);
        let mut partial = false;
        for (k, (r, c)) in slots.iter().enumerate() {
            let (first, end) = (r.start.max(range.start), r.end.min(range.end));
            let count = end.saturating_sub(first);
            let matrix = if c.is_some() { r.len() as i64 } else { 0 };
            partial |= c.is_some() && count > 0 && count < r.len();
            let (columns, row) = (c.unwrap_or(0) as i64, first_rows[k].unwrap_or(0) as i64);
            table.extend([first as i64, count as i64, matrix, blocks as i64, decays(k) as i64, columns, row]);
            firsts.push(blocks as u32);
            blocks += count.div_ceil(WRITE_CHUNK);
        }
        firsts.push(blocks as u32);
        let table = Tensor::new(table, flat.device())?;
        Ok(Self {
            table,
            slots: slots.len(),
            blocks: blocks as u32,
            firsts,
            first_rows: first_rows.into(),
            rows,
            ranges: slots.iter().map(|(r, _)| r.clone()).collect(),
            partial,
        })
    }

    fn grid(&self) -> LaunchConfig {
        LaunchConfig { grid_dim: (self.blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }
}

/// The first launch of [`step_weights`]: `SLOT_PARTS` partial sums of `|W|` per slot of `table` (f64,
/// `[slots * SLOT_PARTS]`), 0 for casts and for what lies outside its range. Under ZeRO-1 each rank sums its
/// shard, and the partials summed over the ranks are the whole matrices'.
pub fn absmean_partials(flat: &Tensor, table: &SlotTable) -> Result<Tensor> {
    let dev = cuda_device(flat)?;
    let partials = uninit(table.slots * SLOT_PARTS as usize, DType::F64, &dev)?;
    let cfg =
        LaunchConfig { grid_dim: (SLOT_PARTS, table.slots as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    launch!(dev, PTX, "slot_absmean_partials", cfg; ptr(flat)?, ptr(&table.table)?, ptr(&partials)?);
    Ok(partials)
}

/// The second launch of [`step_weights`]: this step's weights of the elements of `flat` in the table's range,
/// each BitLinear matrix scaled by the sums of `|W|` of the whole matrix in `partials` (f64, a fixed number per
/// slot: [`absmean_partials`]'s, or one from [`adamw`]), of the table's slots `slots` (all of them, or one
/// block's: `train.step_weights = "per_block"`, which builds the table once for every block), in a new bf16
/// buffer that holds the elements `out` of `flat`'s layout, which must contain those slots' parts of the
/// table's range and start at a multiple of 4 (the writes go 4 elements at a time, aligned as in `flat`); its
/// other elements are left unset (under ZeRO-1, for the other ranks to send). With `codes` the matrices'
/// [`TernaryCodes`] too, which only lambda 1 and whole matrices have (the blend is no code times a scale).
pub fn step_weights_in(
    flat: &Tensor,
    table: &SlotTable,
    partials: &Tensor,
    lambda: f64,
    out: Range<usize>,
    slots: Range<usize>,
    codes: bool,
) -> Result<(Tensor, Option<TernaryCodes>)> {
    if !out.start.is_multiple_of(4) || out.end > flat.elem_count() || slots.end > table.slots {
        candle_core::bail!("step_weights_in: output range {out:?} of {} elements, slots {slots:?}", flat.elem_count());
    }
    if codes && (lambda < 1.0 || table.partial) {
        candle_core::bail!("step_weights_in: ternary codes need lambda 1 ({lambda}) and whole matrices");
    }
    let dev = cuda_device(flat)?;
    let buffer = uninit(out.len(), DType::BF16, &dev)?;
    // The codes' buffer spans the matrices among `slots` only, from the first one's start on the 16-byte grid
    // (the TMA reads a matrix at the alignment it has in the flat buffer) to the last one's end.
    let mut matrices = slots.clone().filter(|&k| table.first_rows[k].is_some()).map(|k| table.ranges[k].clone());
    let span = matrices.next().map(|first| first.start / 16 * 16..matrices.next_back().unwrap_or(first).end);
    let codes = match span.filter(|_| codes) {
        Some(span) => Some(TernaryCodes {
            codes: uninit(span.len(), DType::U8, &dev)?,
            row_scales: Tensor::zeros(table.rows.max(1), DType::F32, flat.device())?,
            base: span.start,
            first_rows: table.first_rows.clone(),
        }),
        None => None,
    };
    let (first, blocks) = (table.firsts[slots.start], table.firsts[slots.end] - table.firsts[slots.start]);
    if blocks == 0 {
        return Ok((buffer, codes));
    }
    let parts = (partials.elem_count() / table.slots) as i32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (code_ptr, code_base, scale_ptr) = match &codes {
        Some(c) => (ptr(&c.codes)?, c.base, ptr(&c.row_scales)?),
        None => (0, 0, 0),
    };
    launch!(dev, PTX, "step_weights", cfg;
        ptr(flat)?, ptr(&table.table)?, table.slots as i32, ptr(partials)?, parts, lambda as f32, ptr(&buffer)?,
        code_ptr, code_base as i64, scale_ptr, out.start as i64, first as i32, table.blocks as i32);
    Ok((buffer, codes))
}

/// [`accumulate`] where it applies (`dst` on CUDA), else `Ok(None)`.
pub fn try_accumulate(dst: &Tensor, src: &Tensor, add: bool) -> Result<Option<()>> {
    if !super::on_cuda(dst) {
        return Ok(None);
    }
    accumulate(dst, &src.contiguous()?, add).map(Some)
}

/// `dst += src` (`add`), or `dst = src` (not reading `dst`), for a contiguous view `dst` of the gradient
/// buffer (f32 or bf16) and a gradient `src` (f32 or bf16) of as many elements, in place, summed in f32.
pub fn accumulate(dst: &Tensor, src: &Tensor, add: bool) -> Result<()> {
    let n = dst.elem_count();
    if src.elem_count() != n {
        candle_core::bail!("accumulate: {n} gradient slots but {} values", src.elem_count());
    }
    let name = match (src.dtype(), dst.dtype()) {
        (DType::F32, DType::F32) => "accumulate_f32_f32",
        (DType::BF16, DType::F32) => "accumulate_bf16_f32",
        (DType::F32, DType::BF16) => "accumulate_f32_bf16",
        (DType::BF16, DType::BF16) => "accumulate_bf16_bf16",
        (s, d) => candle_core::bail!("accumulate: no {s:?} gradients into a {d:?} buffer"),
    };
    let dev = cuda_device(dst)?;
    // SAFETY (of writing through `dst`): the gradient buffer is the backward's alone until it ends.
    launch!(dev, PTX, name, grid_stride(n); ptr(dst)?, ptr(src)?, n as u64, add as i32);
    Ok(())
}

/// `dst = 0` for a contiguous view `dst` of the gradient buffer: one memset on candle's stream.
pub fn zero(dst: &Tensor) -> Result<()> {
    let stream = cuda_device(dst)?.cuda_stream();
    let bytes = dst.elem_count() * dst.dtype().size_in_bytes();
    let to_err = |e: cudarc::driver::DriverError| candle_core::Error::Msg(format!("zeroing gradients: {e:?}"));
    stream.context().bind_to_thread().map_err(to_err)?;
    // SAFETY: `ptr` is the address of `dst`'s first element and the `bytes` after it are `dst`'s own; the
    // gradient buffer is the backward's alone until it ends, and the stream orders the memset with its kernels.
    unsafe { cudarc::driver::result::memset_d8_async(ptr(dst)?, 0, bytes, stream.cu_stream()) }.map_err(to_err)
}

/// The 8-bit moments of a shard as [`adamw_int8`] updates them (`train::moments::Moments::Int8`): u8 codes
/// of whole blocks of 256 and an f32 scale per block, for `len` values.
pub struct Int8Moments<'a> {
    pub u: &'a Tensor,
    pub u_scale: &'a Tensor,
    pub v: &'a Tensor,
    pub v_scale: &'a Tensor,
    pub len: usize,
}

/// AdamW with 8-bit moments in place over `params[shard_start..][..len]` and `grads` (f32 or bf16) of the same
/// range, decoding and coding the moments `mo` in the kernel, a block of 256 values per CUDA block (the
/// reference: the candle-op update of `train::optim::AdamW::step`). `runs`: i64 pairs (first element, 1 where
/// weight decay applies) of the flat buffer's runs (`ParamLayout::runs`), on the device. `s.decay` is what
/// the decaying runs' parameters are multiplied by.
pub fn adamw_int8(
    params: &Tensor,
    grads: &Tensor,
    mo: &Int8Moments,
    shard_start: usize,
    runs: &Tensor,
    s: &AdamWStep,
) -> Result<()> {
    let blocks = mo.len.div_ceil(256);
    if mo.len == 0 {
        return Ok(());
    }
    if mo.u.elem_count() < blocks * 256 || mo.u_scale.elem_count() < blocks {
        candle_core::bail!(
            "adamw_int8: {} codes and {} scales for {} values",
            mo.u.elem_count(),
            mo.u_scale.elem_count(),
            mo.len
        );
    }
    let name = match grads.dtype() {
        DType::F32 => "adamw_int8_f32",
        DType::BF16 => "adamw_int8_bf16",
        d => candle_core::bail!("adamw_int8: no {d:?} gradients"),
    };
    let dev = cuda_device(params)?;
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY (of writing through `params` and the moments): the optimizer owns these buffers, and nothing reads
    // them between this launch and the next op on the same stream.
    launch!(dev, PTX, name, cfg;
        ptr(params)?, ptr(grads)?, ptr(mo.u)?, ptr(mo.u_scale)?, ptr(mo.v)?, ptr(mo.v_scale)?, mo.len as u64,
        shard_start as u64, ptr(runs)?, (runs.elem_count() / 2) as i32, *s);
    Ok(())
}

/// AdamW's constants for one step, in the f32 the kernel computes with: one parameter of the kernels (flat.cu's
/// `AdamW`, laid out alike).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AdamWStep {
    pub grad_scale: f32,
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// What weight decay multiplies the parameters by, where it applies.
    pub decay: f32,
    pub inv_sqrt_bc2: f32,
    pub eps: f32,
    pub step_size: f32,
}

// SAFETY: nine f32, as the kernel's struct.
unsafe impl cudarc::driver::DeviceRepr for AdamWStep {}

/// AdamW in place over the table's range of `params` and `grads` (the flat f32 buffers; the gradients f32 or
/// bf16, `train.grad_buffer`) and over `m, v` (that
/// range's moments, the range starting at flat element `shard_start`), each slot's parameters multiplied by
/// `s.decay` first where the table says weight decay applies. Returns the sum of `|W|` over each BitLinear matrix's part of the range after the update (f64, one
/// per slot, 0 for the others): the next step weights' absmean sums ([`step_weights_in`]).
pub fn adamw(
    params: &Tensor,
    grads: &Tensor,
    m: &Tensor,
    v: &Tensor,
    table: &SlotTable,
    shard_start: usize,
    s: &AdamWStep,
) -> Result<Tensor> {
    let dev = cuda_device(params)?;
    let partials = uninit(table.blocks.max(1) as usize, DType::F64, &dev)?;
    let totals = uninit(table.slots, DType::F64, &dev)?;
    // SAFETY (of writing through `params`, `m`, `v`): the optimizer owns these buffers, and nothing reads them
    // between this launch and the next op on the same stream.
    let name = match grads.dtype() {
        DType::F32 => "adamw_f32",
        DType::BF16 => "adamw_bf16",
        d => candle_core::bail!("adamw: no {d:?} gradients"),
    };
    if table.blocks > 0 {
        launch!(dev, PTX, name, table.grid();
            ptr(params)?, ptr(grads)?, ptr(m)?, ptr(v)?, shard_start as u64, ptr(&table.table)?, table.slots as i32,
            *s, ptr(&partials)?);
    }
    let cfg = LaunchConfig { grid_dim: (table.slots as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    launch!(dev, PTX, "slot_totals", cfg;
        ptr(&partials)?, ptr(&table.table)?, table.slots as i32, table.blocks as i32, ptr(&totals)?);
    Ok(totals)
}
