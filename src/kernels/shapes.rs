//! Plain types that the layers and the kernels both take: a leaf, so that the kernels need not import the
//! trainer.

use candle_core::{Result, Tensor};

use crate::model::arch::Activation;

/// The operands of `c (+)= op(a) op(b)`, bf16 and row-major, their rows contiguous: `a` is `[m, k]`, or `[k,
/// m]` when `a_t` (its transpose is the operand); `b` is `[k, n]`, or `[n, k]` when `b_t`.
#[derive(Clone, Copy)]
pub struct Gemm<'a> {
    pub a: &'a Tensor,
    pub a_t: bool,
    pub b: &'a Tensor,
    pub b_t: bool,
    /// Add the product to `c` (beta = 1); else overwrite it (beta = 0: `c` is not read).
    pub add: bool,
}

impl Gemm<'_> {
    /// `(m, n, k)`.
    pub fn dims(&self) -> Result<(usize, usize, usize)> {
        let ((a0, a1), (b0, b1)) = (self.a.dims2()?, self.b.dims2()?);
        let (m, ka) = if self.a_t { (a1, a0) } else { (a0, a1) };
        let (kb, n) = if self.b_t { (b1, b0) } else { (b0, b1) };
        if ka != kb {
            candle_core::bail!("gemm: op(a) is {m} x {ka} but op(b) is {kb} x {n}");
        }
        Ok((m, n, ka))
    }
}

/// One weight gradient of RMSNorm for `rmsnorm::try_column_sums`: `dst += sum over rows of partial` (`add`),
/// or `dst = ` it (not reading `dst`), for `partial: [rows, c]` (f32) and a contiguous f32 or bf16 `dst` of `c`
/// elements (a slot of the flat gradient buffer).
pub struct ColumnSum<'a> {
    pub dst: Tensor,
    pub partial: &'a Tensor,
    pub add: bool,
}

/// The shape of attention's heads: `[batch, heads, seq, head_dim]`, `q_heads` for queries, `kv_heads` for
/// keys and values.
#[derive(Debug, Clone, Copy)]
pub struct HeadShape {
    pub batch: usize,
    pub seq: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Which kernels flash attention takes, forward and backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashKernels {
    /// Hopper's warpgroup-product kernels where the card (sm_90) allows them, the backward's dQ kernel reading
    /// the score gradients of its dK/dV kernel where they are handed over (`flash_ds_bytes`); else the portable
    /// ones: what training and inference run.
    Fastest,
    /// Hopper's kernels with the dQ kernel recomputing the scores: what `Fastest` runs where no score gradients
    /// are handed over; at the other shapes, the tests' check of it.
    HopperRecompute,
    /// The mma.sync kernels every card runs; on Hopper, the tests' check of them.
    Portable,
}

/// What flash attention's backward reads: the gradient at the output `dy` and the forward's output `o`
/// (`[b, h, t, d]`), its inputs `q` (`[b, h, t, d]`), `k` and `v` (`[b, h / group, t, d]`), each row's softmax
/// log-sum-exp `lse` (f32 `[b, h, t, 1]`) and window start `start` (f32 `[b, t]`, `train::layers::Windows`);
/// where the norm's backward before it computed them (`rmsnorm::try_rmsnorm_backward`), each row's `delta =
/// rowsum(dy o)` (f32 `[b, h, t]`), which the kernels that would compute them in a pass of their own then read.
#[derive(Clone, Copy)]
pub struct FlashInputs<'a> {
    pub dy: &'a Tensor,
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub o: &'a Tensor,
    pub lse: &'a Tensor,
    pub start: &'a Tensor,
    pub delta: Option<&'a Tensor>,
}

/// Which rows of a batch hold each token id, for the embedding's backward: the rows sorted by id (stable),
/// and per distinct id `(id, first, end)` into that order; u32 tensors on the batch's device.
#[derive(Clone)]
pub struct TokenRows {
    pub order: Tensor,
    pub runs: Tensor,
    pub distinct: usize,
}

impl TokenRows {
    pub fn new(ids: &[u32], device: &candle_core::Device) -> Result<Self> {
        let mut order: Vec<u32> = (0..ids.len() as u32).collect();
        order.sort_by_key(|&r| ids[r as usize]);
        let mut runs: Vec<u32> = Vec::new();
        for (k, &r) in order.iter().enumerate() {
            let id = ids[r as usize];
            match runs.len() {
                n if n > 0 && runs[n - 3] == id => runs[n - 1] = k as u32 + 1,
                _ => runs.extend([id, k as u32, k as u32 + 1]),
            }
        }
        let distinct = runs.len() / 3;
        Ok(Self { order: Tensor::new(order, device)?, runs: Tensor::from_vec(runs, (distinct, 3), device)?, distinct })
    }
}

/// Rows the decoding step's matrix-vector kernel takes at a time (`GEMV_ROWS` in decode.cu); more rows are
/// a GEMM's work.
pub const GEMV_ROWS: usize = 8;

/// Warps of `bitlinear_step` (`STEP_WARPS` in decode.cu): one block an SM.
pub const STEP_WARPS: usize = 32;

/// The widest input `bitlinear_step` takes: a thread holds two 8-channel chunks of a row in registers
/// (`STEP_CHUNKS` in decode.cu).
pub const STEP_K_MAX: usize = 2 * 8 * 32 * STEP_WARPS;

/// A BitLinear operand as the int8 GEMM reads it: codes `[rows, k]` (u8 holding int8, two's complement) and
/// each row's f32 scale `[rows]`, the operand being `round_bf16(code * scale)` exactly: the forward's input
/// at lambda 1 (per-token codes and scales) or a ternary weight (codes -1, 0, 1; its matrix's scale on every
/// row).
#[derive(Clone)]
pub struct Int8Operand {
    pub codes: Tensor,
    pub scales: Tensor,
}

/// Each BitLinear matrix's first row among all the matrices' rows, in slot order (None for a slot that is
/// only cast), and the rows in all, for `slots` as the step weights take them: `(elements, Some(columns))`
/// for a matrix. Where the step weights' kernel writes each matrix's row scales.
pub fn first_rows(slots: &[(std::ops::Range<usize>, Option<usize>)]) -> (Vec<Option<usize>>, usize) {
    let mut rows = 0;
    let firsts = slots
        .iter()
        .map(|(r, c)| {
            c.map(|c| {
                rows += r.len() / c;
                rows - r.len() / c
            })
        })
        .collect();
    (firsts, rows)
}

/// How `bitlinear_step` shares `n` outputs of `k` inputs for `rows` rows out over its blocks, and the shared
/// memory that takes, in decode.cu's order: the codes' buffers, the int8 rows (`rows k` bytes), the block's
/// scales and residuals (f32). `shared` is the most dynamic shared memory a block may take on the device.
#[derive(Debug, PartialEq)]
pub struct StepLayout {
    pub blocks: usize,
    pub block_outputs: usize,
    pub stage_outputs: usize,
    pub bytes: usize,
}

impl StepLayout {
    /// The bytes of the rows, which do not depend on how the outputs are shared out.
    fn fixed(rows: usize, k: usize) -> usize {
        rows * k
    }

    /// Whether the kernel takes `rows` rows of `k` inputs within `shared` bytes: `k` within
    /// [`STEP_K_MAX`], and room for at least two outputs' codes beside the rows.
    pub fn fits(rows: usize, k: usize, shared: usize) -> bool {
        k <= STEP_K_MAX && shared.checked_sub(Self::fixed(rows, k)).is_some_and(|room| room >= 2 * k / 4 + 16)
    }

    /// At most `wave` blocks (those that fit the card at once), no fewer than [`STEP_WARPS`] outputs each:
    /// every block norms the rows once. A block keeps all its outputs' codes in shared memory where they fit
    /// (every BitLinear of the shipped shapes on a 24 GB card and up), else two stages of as many as half
    /// the room holds. None where a block's scales and residuals leave too little room for two outputs'.
    pub fn new(rows: usize, n: usize, k: usize, wave: usize, shared: usize) -> Option<Self> {
        if !Self::fits(rows, k, shared) {
            return None;
        }
        let row_bytes = k / 4;
        let block_outputs = n.div_ceil(n.div_ceil(STEP_WARPS).min(wave).max(1));
        let own = Self::fixed(rows, k) + 4 * (1 + rows) * block_outputs;
        let room = shared.checked_sub(own)? & !15;
        let (stage_outputs, buffers) = match block_outputs * row_bytes <= room {
            true => (block_outputs, 1),
            false => (room / 2 / row_bytes, 2),
        };
        let codes = (buffers * stage_outputs * row_bytes).next_multiple_of(16);
        (stage_outputs > 0).then(|| Self {
            blocks: n.div_ceil(block_outputs),
            block_outputs,
            stage_outputs,
            bytes: codes + own,
        })
    }
}

/// A decoding step's BitLinear in one launch (`kernels::decode::try_bitlinear_step`): its input before the
/// norm, normed and quantized to int8 per row, times ternary weights packed 2 bits each.
pub struct BitLinearStep<'a> {
    /// bf16 `[.., k]` of at most [`GEMV_ROWS`] rows; with `glu`, the gate/up rows `[.., 2k]` whose gated
    /// activation is the input.
    pub x: &'a Tensor,
    /// The norm's weight `[k]` (bf16), or None: the input only quantized.
    pub norm: Option<&'a Tensor>,
    pub eps: f64,
    pub glu: Option<Activation>,
    /// The ternary weights packed 16 to a u32, `[n, k / 16]` (`kernels::decode::pack_ternary`).
    pub codes: &'a Tensor,
    /// Each output's weight scale, bf16 `[n]`.
    pub scales: &'a Tensor,
    /// Added to the output (`[.., n]`), or None.
    pub residual: Option<&'a Tensor>,
    /// Where the output goes (bf16 `[.., n]`, not `residual`'s buffer), or None: a fresh tensor. A captured
    /// step writes buffers of its own: an allocation between two kernels of a CUDA graph is a node that keeps
    /// them from overlapping.
    pub out: Option<&'a Tensor>,
}

/// One decoding step's attention (`kernels::decode`): every row's new token over its KV cache.
pub struct DecodeAttention<'a> {
    /// The stacked q, k, v projection of the new tokens, bf16 `[rows, (heads + 2 kv_heads) head_dim]`.
    pub qkv: &'a Tensor,
    /// The layer's caches, bf16 `[rows, kv_heads, width, head_dim]`; the new keys and values go to `column`.
    pub k_cache: &'a Tensor,
    pub v_cache: &'a Tensor,
    /// The join's counts, u32, at least `kernels::decode::join_counts` of them, zero: the kernel leaves them
    /// zero, so one buffer serves every layer and step.
    pub done: &'a Tensor,
    /// u32 `[4 rows + 2]`: per row the new token's RoPE position, and the row's start, gap and gap length
    /// (`model::kv_cache`'s span; a retired row starts at `u32::MAX`); then `first` and `column`, which the
    /// kernel reads from here (a captured step replays for the next column).
    pub meta: &'a Tensor,
    /// RoPE's inverse frequencies, f32 `[head_dim / 2]`.
    pub inv_freq: &'a Tensor,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Columns the caches have room for: the kernel's splits cover them.
    pub width: usize,
    /// Where the output goes (bf16 `[rows, heads head_dim]`) and the splits' partial results (f32, as many as
    /// `kernels::decode::partial_len` says), or None: fresh tensors (as [`BitLinearStep::out`]).
    pub out: Option<&'a Tensor>,
    pub partial: Option<&'a Tensor>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocks cover the outputs once, their stages cover each block's, and the shared memory holds
    /// what decode.cu puts there, for the shipped shapes (one stage a block) and ones whose codes need two.
    #[test]
    fn step_layout_covers_the_outputs_within_shared_memory() {
        // (rows, n, k, wave, shared): -large's and 2B4T's BitLinears on an H100's 132 SMs (227 KB a block
        // less the static), 8 rows, wide inputs, and an A10's 99 KB.
        let (h100, a10) = (226 * 1024, 98 * 1024);
        let cases = [
            (1, 4608, 1536, 132, h100),
            (1, 13824, 2560, 132, h100),
            (1, 2560, 6912, 132, h100),
            (8, 8192, 1536, 132, h100),
            (8, 4096, 14336, 132, h100),
            (1, 28672, 16384, 132, h100),
            (1, 13824, 2560, 72, a10),
            (1, 28672, 4096, 72, a10),
        ];
        for (rows, n, k, wave, shared) in cases {
            let l = StepLayout::new(rows, n, k, wave, shared).expect("the shape is taken");
            assert!(l.blocks <= wave.max(n.div_ceil(STEP_WARPS)), "{l:?}");
            assert!(l.block_outputs * (l.blocks - 1) < n && l.block_outputs * l.blocks >= n, "{l:?} for {n}");
            assert!(l.block_outputs >= STEP_WARPS.min(n), "{l:?}");
            let buffers = if l.stage_outputs < l.block_outputs { 2 } else { 1 };
            let codes = (buffers * l.stage_outputs * k / 4).next_multiple_of(16);
            assert_eq!(l.bytes, codes + rows * k + 4 * (1 + rows) * l.block_outputs, "{l:?}");
            assert!(l.bytes <= shared, "{l:?}");
        }
        let gate_up = StepLayout::new(1, 13824, 2560, 132, h100).map(|l| (l.block_outputs, l.stage_outputs));
        assert_eq!(gate_up, Some((105, 105)));
        let wide = StepLayout::new(1, 28672, 4096, 72, a10).expect("taken");
        assert!(wide.stage_outputs < wide.block_outputs, "{wide:?}: two stages");
        // Inputs wider than a block's registers hold, or whose rows leave no room for two outputs' codes, are
        // not taken.
        assert!(StepLayout::fits(1, STEP_K_MAX, h100) && !StepLayout::fits(1, STEP_K_MAX + 16, h100));
        assert!(StepLayout::fits(8, 11792, a10) && !StepLayout::fits(8, 11808, a10));
    }
}
