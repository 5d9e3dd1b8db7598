//! Plain types that the layers and the kernels both take: a leaf, so that the kernels need not import the
//! trainer.

use candle_core::{Result, Tensor};

use crate::model::arch::Activation;

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
