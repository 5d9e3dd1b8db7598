//! BitNet training forward and backward over the whole network (llm.c's `gpt2_forward` /
//! `gpt2_backward`): the forward keeps what each layer's backward needs, the backward walks the blocks in
//! reverse and returns one f32 gradient per parameter, in the order of [`ParamLayout`].
//!
//! Long sequences: attention is computed in blocks of queries and keeps no `[seq, seq]` matrix, the loss
//! in chunks of rows, and `train.recompute` chooses how much of each block the forward keeps
//! ([`MemoryPlan`]). Recomputation runs the same ops on the same inputs, so it changes no gradient.

use std::ops::{Range, RangeInclusive};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::grads::Gradients;
use super::layers::*;
use super::params::{BlockSlots, ParamLayout};
use crate::config::run::{Recompute, StepWeightsPlan, TrainSection};
use crate::config::ModelConfig;
use crate::data::Batch;
use crate::model::arch::{self, Activation};
use crate::model::is_bitlinear;
use crate::ops::quantize_weight_part;

/// A stretch of this step's weights in the compute dtype: `flat` holds the elements `base..` of the flat
/// buffer's layout; `int8`, where the step has them, its matrices' ternary codes for the int8 forward GEMM.
#[derive(Clone)]
pub struct WeightPart {
    flat: Tensor,
    base: usize,
    int8: Option<TernaryCodes>,
}

impl WeightPart {
    /// Slot `i`, which the part must hold, in its own shape.
    pub fn slot(&self, layout: &ParamLayout, i: usize) -> Result<Tensor> {
        let s = &layout.slots[i];
        Ok(self.flat.narrow(0, s.offset - self.base, s.len)?.reshape(s.shape.as_slice())?)
    }

    /// The neighbouring matrices `slots`, which share their number of columns, as one: their rows stacked.
    /// Neighbouring matrices that read the same input (q, k, v; gate, up) are thus one matrix, for one GEMM.
    fn stacked(&self, layout: &ParamLayout, slots: RangeInclusive<usize>) -> Result<Tensor> {
        let cols = layout.slots[*slots.start()].shape[1];
        let r = layout.span(slots);
        Ok(self.flat.narrow(0, r.start - self.base, r.len())?.reshape((r.len() / cols, cols))?)
    }

    /// [`WeightPart::stacked`]'s matrix in its int8 form, where the part has its codes.
    fn stacked_int8(&self, layout: &ParamLayout, slots: RangeInclusive<usize>) -> Result<Option<Int8Operand>> {
        let Some(codes) = &self.int8 else { return Ok(None) };
        let first = *slots.start();
        Ok(Some(codes.operand(first, layout.span(slots), layout.slots[first].shape[1])?))
    }
}

/// Whether this step's weights come with their ternary codes, for the int8 forward GEMM: at lambda 1 (the
/// blend of the warm-up is no code times a scale) on a GPU that runs the kernel (Hopper). The norms then
/// write their outputs' int8 form too.
fn int8_forward(flat: &Tensor, lambda: f64) -> bool {
    lambda >= 1.0 && crate::kernels::int8_gemm::available(flat.device())
}

/// This step's weights in the compute dtype: BitLinear weights quantized (once per optimizer step, shared by
/// every micro-batch), norms and the embedding cast. `train.step_weights` says where they live:
/// - `"kept"`: all of them, built once per step and kept for it (`e` bytes a parameter);
/// - `"per_block"`: the slots outside the blocks (embedding, final norm, head) kept, each block's built from
///   the latents whenever its forward or backward needs it, with the scales of the step (`sums`), so that
///   one block's weights exist at a time: the same values for three more passes over the block's latents per
///   micro-batch (two under `recompute = "blocks"`, whose recomputed forward and backward share them).
pub struct StepWeights {
    /// The whole buffer, or (per block) the slots before the blocks and those after them.
    kept: Vec<WeightPart>,
    per_block: Option<BlockSource>,
}

/// What per-block weights are built from: the f32 latents, every BitLinear matrix's sum of `|W|` (as
/// [`shard_abs_sums`] gives them for the whole buffer), the quantizer's strength and the compute dtype; on
/// CUDA the kernel's slot table of the whole buffer, uploaded once a step (an upload waits for the stream),
/// from which each block's launch takes its slots.
struct BlockSource {
    latents: Tensor,
    sums: Tensor,
    lambda: f64,
    dtype: DType,
    #[cfg(feature = "cuda")]
    table: Option<crate::kernels::flat::SlotTable>,
}

impl StepWeights {
    /// All of them, built now from the f32 latents `flat`.
    pub fn new(layout: &ParamLayout, flat: &Tensor, lambda: f64, dtype: DType) -> Result<Self> {
        let (weights, int8) = step_weights(flat, &slot_kinds(layout), lambda, dtype, int8_forward(flat, lambda))?;
        Self::from_flat(weights, int8)
    }

    /// The step weights in `flat`, built whole (with their codes where [`int8_forward`]) or gathered from the
    /// ZeRO-1 shards ([`shard_step_weights`]; no codes).
    pub fn from_flat(flat: Tensor, int8: Option<TernaryCodes>) -> Result<Self> {
        Ok(Self { kept: vec![WeightPart { flat, base: 0, int8 }], per_block: None })
    }

    /// `train.step_weights = "per_block"`: the slots outside the blocks built now from the whole f32 latents
    /// `latents`, the blocks' when [`StepWeights::block`] asks; `sums` are every matrix's sums of `|W|`.
    pub fn per_block(layout: &ParamLayout, latents: &Tensor, sums: Tensor, lambda: f64, dtype: DType) -> Result<Self> {
        #[cfg(feature = "cuda")]
        let table = match fused(latents, dtype) {
            true => {
                Some(crate::kernels::flat::SlotTable::new(latents, &slot_kinds(layout), 0..layout.total, |_| false)?)
            }
            false => None,
        };
        let source = BlockSource {
            latents: latents.clone(),
            sums,
            lambda,
            dtype,
            #[cfg(feature = "cuda")]
            table,
        };
        let n = layout.slots.len();
        let blocks = match (layout.blocks.first(), layout.blocks.last()) {
            (Some(first), Some(last)) => first.input_norm..last.down + 1,
            _ => n..n,
        };
        let kept = [0..blocks.start, blocks.end..n]
            .into_iter()
            .filter(|r| !r.is_empty())
            .map(|r| source.build(layout, r))
            .collect::<Result<_>>()?;
        Ok(Self { kept, per_block: Some(source) })
    }

    /// Slot `i` outside the blocks (any slot when the weights are kept whole).
    pub fn slot(&self, layout: &ParamLayout, i: usize) -> Result<Tensor> {
        let offset = layout.slots[i].offset;
        let part = self.kept.iter().rev().find(|p| p.base <= offset).expect("the kept parts start at 0 or hold slot i");
        part.slot(layout, i)
    }

    /// Block `l`'s weights: a view of the kept ones, or built now.
    pub fn block(&self, layout: &ParamLayout, l: usize) -> Result<WeightPart> {
        let s = &layout.blocks[l];
        match &self.per_block {
            Some(source) => source.build(layout, s.input_norm..s.down + 1),
            None => Ok(self.kept[0].clone()),
        }
    }
}

impl BlockSource {
    /// The step weights of the neighbouring slots `slots`, in a buffer that starts at the multiple of 4 at or
    /// below their first element (the kernels write 4 elements at a time, aligned as in the flat buffer).
    fn build(&self, layout: &ParamLayout, slots: Range<usize>) -> Result<WeightPart> {
        let range = layout.span(slots.start..=slots.end - 1);
        let base = range.start / 4 * 4;
        #[cfg(feature = "cuda")]
        if let Some(table) = &self.table {
            let (flat, int8) = crate::kernels::flat::step_weights_in(
                &self.latents,
                table,
                &self.sums,
                self.lambda,
                base..range.end,
                slots,
                int8_forward(&self.latents, self.lambda),
            )?;
            return Ok(WeightPart { flat, base, int8 });
        }
        let flat = range_step_weights(
            layout,
            &self.latents,
            range.clone(),
            base..range.end,
            &self.sums,
            self.lambda,
            self.dtype,
            false,
        )?
        .0;
        Ok(WeightPart { flat, base, int8: None })
    }
}

/// The elements of the blocks' slots, from the first block's input norm to the last one's down projection.
fn blocks_span(layout: &ParamLayout) -> Range<usize> {
    match (layout.blocks.first(), layout.blocks.last()) {
        (Some(first), Some(last)) => layout.span(first.slots()).start..layout.span(last.slots()).end,
        _ => layout.total..layout.total,
    }
}

/// Each slot's elements and, for a BitLinear matrix, its number of columns: the slots [`step_weights`] takes.
pub(crate) fn slot_kinds(layout: &ParamLayout) -> Vec<(Range<usize>, Option<usize>)> {
    layout.slots.iter().map(|s| (s.offset..s.offset + s.len, is_bitlinear(&s.name).then(|| s.shape[1]))).collect()
}

/// Whether the fused kernels build the step weights, as in [`step_weights`]: bf16 on CUDA.
#[cfg(feature = "cuda")]
fn fused(flat: &Tensor, dtype: DType) -> bool {
    crate::kernels::on_cuda(flat) && dtype == DType::BF16
}

/// The sums of `|W|` over the part inside `shard` of every BitLinear matrix (f64, 0 for the other slots; on
/// CUDA the kernels' partial sums, several per slot): ZeRO-1's step weights, first half, whose sums over the
/// ranks (their shards cover the buffer once) are the whole matrices' sums [`shard_step_weights`] takes; and
/// over the whole buffer, the sums per-block step weights are built with.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn shard_abs_sums(layout: &ParamLayout, flat: &Tensor, shard: Range<usize>, dtype: DType) -> Result<Tensor> {
    let slots = slot_kinds(layout);
    #[cfg(feature = "cuda")]
    if fused(flat, dtype) {
        let table = crate::kernels::flat::SlotTable::new(flat, &slots, shard, |_| false)?;
        return Ok(crate::kernels::flat::absmean_partials(flat, &table)?);
    }
    let mut sums = vec![Tensor::zeros((), DType::F64, flat.device())?; slots.len()];
    for (i, part) in layout.parts(shard) {
        if slots[i].1.is_some() {
            sums[i] = layout.part_sum(flat, i, part, Tensor::abs)?;
        }
    }
    Ok(Tensor::stack(&sums, 0)?)
}

/// ZeRO-1's step weights, second half: this step's weights of the elements in `shard`, in `dtype`, in a buffer
/// laid out as `flat` whose other elements are left for the ranks that own them (see [`range_step_weights`]);
/// where the shard is the whole buffer, with their codes as [`int8_forward`] says (a shard's would need
/// gathering too: the int8 forward runs on one GPU, or on each of several without ZeRO-1).
pub fn shard_step_weights(
    layout: &ParamLayout,
    flat: &Tensor,
    shard: Range<usize>,
    sums: &Tensor,
    lambda: f64,
    dtype: DType,
) -> Result<(Tensor, Option<TernaryCodes>)> {
    let codes = shard.len() == flat.elem_count() && int8_forward(flat, lambda);
    range_step_weights(layout, flat, shard, 0..flat.elem_count(), sums, lambda, dtype, codes)
}

/// This step's weights of the elements of `flat` in `range`, in `dtype`, written to a new buffer that holds
/// the elements `out` of the layout (`out` contains `range` and, on CUDA, starts at a multiple of 4); its
/// other elements are left unset. Each BitLinear matrix is [`effective_weight`] with the scale from its whole
/// matrix's sum in `sums` (whole-buffer or summed ZeRO-1 [`shard_abs_sums`]); the other slots are cast. With
/// `codes` (CUDA, lambda 1, whole matrices) the matrices' ternary codes too.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn range_step_weights(
    layout: &ParamLayout,
    flat: &Tensor,
    range: Range<usize>,
    out: Range<usize>,
    sums: &Tensor,
    lambda: f64,
    dtype: DType,
    codes: bool,
) -> Result<(Tensor, Option<TernaryCodes>)> {
    assert!(out.start <= range.start && range.end <= out.end, "{out:?} holds {range:?}");
    let slots = slot_kinds(layout);
    #[cfg(feature = "cuda")]
    if fused(flat, dtype) {
        let table = crate::kernels::flat::SlotTable::new(flat, &slots, range, |_| false)?;
        return Ok(crate::kernels::flat::step_weights_in(flat, &table, sums, lambda, out, 0..slots.len(), codes)?);
    }
    let buffer = Tensor::zeros(out.len(), dtype, flat.device())?;
    for (i, part) in layout.parts(range) {
        let x = flat.narrow(0, part.start, part.len())?;
        let w = match slots[i].1 {
            Some(_) => {
                let (ternary, scale) = quantize_weight_part(&x, &sums.get(i)?, layout.slots[i].len)?;
                blend(&x, &ternary.broadcast_mul(&scale)?, lambda)?
            }
            None => x,
        };
        buffer.slice_set(&w.to_dtype(dtype)?, 0, part.start - out.start)?;
    }
    Ok((buffer, None))
}

/// A micro-batch on the device: token ids, targets, loss mask, per-token rotary angles and each token's
/// attention window (see [`Windows`]), which keeps packed examples apart in O(seq) memory.
pub struct BatchTensors {
    pub batch: usize,
    pub seq: usize,
    ids: Tensor,
    targets: Tensor,
    loss_mask: Tensor,
    cos: Tensor,
    sin: Tensor,
    windows: Windows,
    token_rows: TokenRows,
    pub loss_tokens: usize,
}

/// RoPE angle tables for positions `0..positions`, f32 `[positions, head_dim / 2]`, with the model's
/// RoPE scaling. Angles are computed in f64 and rounded once to f32.
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTables {
    /// Tables for sequences of up to `positions` tokens (the run's `data.max_seq_len`; dynamic scaling
    /// depends on it). Fails, naming the limit, beyond what the model supports.
    pub fn new(cfg: &ModelConfig, positions: usize, device: &Device) -> anyhow::Result<Self> {
        cfg.check_positions(positions, "the training sequence length (data.max_seq_len)")?;
        let f = cfg.rope_frequencies(positions)?;
        let angles: Vec<f32> = (0..positions)
            .flat_map(|p| f.denominators.iter().map(move |den| (p as f64 / f.position_divisor / den) as f32))
            .collect();
        let angles = Tensor::from_vec(angles, (positions, f.denominators.len()), device)?;
        Ok(Self { cos: angles.cos()?, sin: angles.sin()? })
    }
}

/// Where each token's attention window starts (see [`Windows`]), `[batch * seq]`: the first token
/// of its example, or itself on padding (segment 0). Segments must be contiguous runs, as packing writes
/// them; a segment that comes back later in its row is an error.
pub fn window_starts(segments: &[u32], seq: usize) -> Result<Vec<f32>> {
    let mut start = vec![0f32; segments.len()];
    for (r, row) in segments.chunks(seq).enumerate() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..row.len() {
            let continues = i > 0 && row[i] != 0 && row[i] == row[i - 1];
            if !continues && row[i] != 0 && !seen.insert(row[i]) {
                anyhow::bail!("row {r}: segment {} is not one contiguous run of tokens", row[i]);
            }
            start[r * seq + i] = if continues { start[r * seq + i - 1] } else { i as f32 };
        }
    }
    Ok(start)
}

impl BatchTensors {
    pub fn new(b: &Batch, rope: &RopeTables, dtype: DType, device: &Device) -> Result<Self> {
        let (n, t) = (b.batch, b.seq);
        let positions = Tensor::new(b.positions.as_slice(), device)?;
        let angles = |table: &Tensor| -> Result<Tensor> {
            Ok(table.index_select(&positions, 0)?.reshape((n, t, ()))?.to_dtype(dtype)?)
        };
        Ok(Self {
            batch: n,
            seq: t,
            ids: Tensor::new(b.ids.as_slice(), device)?,
            targets: Tensor::new(b.targets.as_slice(), device)?,
            loss_mask: Tensor::new(b.loss_mask.as_slice(), device)?,
            cos: angles(&rope.cos)?,
            sin: angles(&rope.sin)?,
            windows: Windows::new(window_starts(&b.segments, t)?, n, t, device)?,
            token_rows: TokenRows::new(&b.ids, device)?,
            loss_tokens: b.loss_tokens,
        })
    }
}

/// How a step trades memory for compute: the `[train]` keys `recompute`, `attention_block`, `loss_chunk`,
/// `step_weights`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryPlan {
    pub recompute: Recompute,
    pub attention_block: usize,
    pub loss_chunk: usize,
    pub step_weights: StepWeightsPlan,
}

impl MemoryPlan {
    pub fn new(train: &TrainSection) -> Self {
        Self {
            recompute: train.recompute,
            attention_block: train.attention_block,
            loss_chunk: train.loss_chunk,
            step_weights: train.step_weights,
        }
    }
}

/// What one block's backward needs.
struct BlockSaved {
    input_norm: RmsNormSaved,
    a1: Tensor,
    /// a1's int8 form under `recompute = "attention"` where the forward ran the int8 GEMM, so that the
    /// recomputed q, k and v are the forward's.
    a1_int8: Option<Int8Operand>,
    /// None under `recompute = "attention"`: the backward rebuilds it from `a1`.
    attn: Option<FlashSaved>,
    /// What the attention sub-norm (or, without one, the quantization alone) keeps.
    attn_sub_norm: RmsNormSaved,
    o: Tensor,
    post_norm: RmsNormSaved,
    a2: Tensor,
    /// The fused gate and up projections, `[gate | up]`.
    gu: Tensor,
    /// down_proj's input and what the MLP sub-norm keeps; None unless `recompute = "none"`: the backward
    /// rebuilds them from `gu` ([`Pass::ffn_inner`]).
    ffn: Option<(Tensor, RmsNormSaved)>,
}

/// What the forward keeps of one block.
enum LayerSaved {
    All(BlockSaved),
    /// `recompute = "blocks"`: the block's input; the backward re-runs the block's forward.
    Input(Tensor),
}

/// What [`backward`] needs from [`forward`]. The loss's own backward (through the head) is done chunk by
/// chunk in the forward, so no logits are kept: `dhidden` is the gradient at the final norm's output (the
/// head weight's gradient is in the gradient buffer already).
pub struct Saved {
    /// The quantization warm-up's lambda the forward ran with (a recomputed block needs it too).
    lambda: f64,
    layers: Vec<LayerSaved>,
    final_norm: RmsNormSaved,
    dhidden: Tensor,
}

fn head_slot(cfg: &ModelConfig, layout: &ParamLayout) -> usize {
    layout.index(if cfg.tie_word_embeddings { arch::EMBEDDING } else { arch::LM_HEAD })
}

/// One micro-batch's pass: what every block function needs.
struct Pass<'a> {
    cfg: &'a ModelConfig,
    layout: &'a ParamLayout,
    w: &'a StepWeights,
    b: &'a BatchTensors,
    lambda: f64,
    plan: MemoryPlan,
    activation: Activation,
}

impl<'a> Pass<'a> {
    fn new(
        cfg: &'a ModelConfig,
        layout: &'a ParamLayout,
        w: &'a StepWeights,
        b: &'a BatchTensors,
        lambda: f64,
        plan: MemoryPlan,
    ) -> Result<Self> {
        Ok(Self { cfg, layout, w, b, lambda, plan, activation: cfg.activation()? })
    }

    fn head_shape(&self) -> HeadShape {
        let c = self.cfg;
        HeadShape {
            batch: self.b.batch,
            seq: self.b.seq,
            q_heads: c.num_attention_heads,
            kv_heads: c.num_kv_heads(),
            head_dim: c.head_dim(),
        }
    }

    /// The BitLinear forward of the neighbouring matrices `slots` (one, or several that read the same input)
    /// on the input `x`, by the int8 GEMM where `x8` (its int8 form) and the part's codes are there, added to
    /// the residual stream `residual` where given (o_proj and down).
    fn bitlinear(
        &self,
        bw: &WeightPart,
        slots: RangeInclusive<usize>,
        x: &Tensor,
        x8: Option<&Int8Operand>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (w, w8) = self.weights(bw, slots, x8.is_some())?;
        Ok(linear_forward(x, &w, x8.zip(w8.as_ref()), residual)?)
    }

    /// The stacked weight of `slots` and, with `int8` (the input has its int8 form), the part's codes where there.
    fn weights(
        &self,
        bw: &WeightPart,
        slots: RangeInclusive<usize>,
        int8: bool,
    ) -> Result<(Tensor, Option<Int8Operand>)> {
        let w8 = match int8 {
            true => bw.stacked_int8(self.layout, slots.clone())?,
            false => None,
        };
        Ok((bw.stacked(self.layout, slots)?, w8))
    }

    /// A block's attention from its normed, quantized input `a1` (and its int8 form, where there is one): the
    /// output heads `[b, h, t, d]` (before the sub-norm, which reads them as rows) and what attention's
    /// backward needs. q, k and v are one GEMM (on Hopper's int8 path writing the heads, turned by RoPE).
    fn attention(
        &self,
        s: &BlockSlots,
        bw: &WeightPart,
        a1: &Tensor,
        a1_int8: Option<&Int8Operand>,
    ) -> Result<(Tensor, FlashSaved)> {
        let (w, w8) = self.weights(bw, s.q..=s.v, a1_int8.is_some())?;
        let (q, k, v) = qkv_forward(a1, &w, a1_int8.zip(w8.as_ref()), self.head_shape(), &self.b.cos, &self.b.sin)?;
        Ok(flash_attention_forward(&q, &k, &v, &self.b.windows, self.plan.attention_block)?)
    }

    /// A sub-norm's weight where the family has it.
    fn sub_norm(&self, bw: &WeightPart, slot: Option<usize>) -> Result<Option<Tensor>> {
        slot.map(|i| bw.slot(self.layout, i)).transpose()
    }

    /// o_proj's input from attention's output heads: the sub-norm where the family has one, and the
    /// quantization.
    fn attention_out(&self, s: &BlockSlots, bw: &WeightPart, y: &Tensor) -> Result<NormedInput> {
        let w = self.sub_norm(bw, s.attn_sub_norm)?;
        Ok(sub_norm_quant_forward(y, None, w.as_ref(), self.cfg.rms_norm_eps, self.lambda, bw.int8.is_some())?)
    }

    /// Block `l` on its input `x` with its weights `bw`: the block's output and what its backward needs
    /// (attention's part and down_proj's input only when `keep_all`).
    fn block_forward(&self, l: usize, bw: &WeightPart, x: &Tensor, keep_all: bool) -> Result<(Tensor, BlockSaved)> {
        let (eps, lambda, int8) = (self.cfg.rms_norm_eps, self.lambda, bw.int8.is_some());
        let s = &self.layout.blocks[l];
        let p = |i: usize| bw.slot(self.layout, i);
        let (a1, input_norm, a1_int8) = rmsnorm_quant_forward(x, &p(s.input_norm)?, eps, lambda, int8)?;
        let (y, attn) = self.attention(s, bw, &a1, a1_int8.as_ref())?;
        let (o, attn_sub_norm, o_int8) = self.attention_out(s, bw, &y)?;
        let x = self.bitlinear(bw, s.o..=s.o, &o, o_int8.as_ref(), Some(x))?;

        let (a2, post_norm, a2_int8) = rmsnorm_quant_forward(&x, &p(s.post_norm)?, eps, lambda, int8)?;
        let gu = self.bitlinear(bw, s.gate..=s.up, &a2, a2_int8.as_ref(), None)?;
        let (h, ffn_norm, h_int8) = self.ffn_inner(s, bw, &gu, int8)?;
        let x = self.bitlinear(bw, s.down..=s.down, &h, h_int8.as_ref(), Some(&x))?;
        let (attn, ffn) = (keep_all.then_some(attn), keep_all.then_some((h, ffn_norm)));
        let a1_int8 = a1_int8.filter(|_| !keep_all);
        Ok((x, BlockSaved { input_norm, a1, a1_int8, attn, attn_sub_norm, o, post_norm, a2, gu, ffn }))
    }

    /// down_proj's input from gate and up (the gated activation, the MLP sub-norm where the family has one,
    /// quantization; with `int8`, its int8 form) and the norm's saved statistics: one elementwise pass over
    /// `gu`, which the backward redoes unless `recompute = "none"`.
    fn ffn_inner(&self, s: &BlockSlots, bw: &WeightPart, gu: &Tensor, int8: bool) -> Result<NormedInput> {
        let w = self.sub_norm(bw, s.ffn_sub_norm)?;
        Ok(sub_norm_quant_forward(gu, Some(self.activation), w.as_ref(), self.cfg.rms_norm_eps, self.lambda, int8)?)
    }

    /// Block `l`'s backward with its weights `bw`: adds its parameters' gradients with `add` (to a slot or to
    /// neighbouring slots that one GEMM computed) and returns the gradient at its input.
    fn block_backward(
        &self,
        l: usize,
        bw: &WeightPart,
        sv: &BlockSaved,
        dx: Tensor,
        add: &impl Fn(&[(RangeInclusive<usize>, &WeightGrad)]) -> candle_core::Result<()>,
    ) -> Result<Tensor> {
        let layout = self.layout;
        let s = &layout.blocks[l];
        let p = |i: usize| bw.slot(layout, i);
        // Each matrix's gradient is added as soon as it exists, so that what it holds (a GEMM's inputs) is freed;
        // the norms' (a few rows of partial sums each) at the block's end, in one launch.
        let mut norms = Vec::new();
        let recomputed_ffn;
        let (h, ffn_norm) = match &sv.ffn {
            Some((h, n)) => (h, n),
            None => {
                recomputed_ffn = self.ffn_inner(s, bw, &sv.gu, false)?;
                (&recomputed_ffn.0, &recomputed_ffn.1)
            }
        };
        let (dhq, ddown) = linear_backward(&dx, h, &p(s.down)?)?;
        add(&[(s.down..=s.down, &ddown)])?;
        // Through the MLP's sub-norm and the gate at once: the gate/up gradient.
        let (dgu, dffn) = sub_norm_backward(&dhq, self.sub_norm(bw, s.ffn_sub_norm)?.as_ref(), ffn_norm)?;
        if let (Some(slot), Some(g)) = (s.ffn_sub_norm, dffn) {
            norms.push((slot, g));
        }
        let (da2, dgu_w) = linear_backward(&dgu, &sv.a2, &bw.stacked(layout, s.gate..=s.up)?)?;
        add(&[(s.gate..=s.up, &dgu_w)])?;
        let (dx, dpost) = rmsnorm_backward(&da2, &p(s.post_norm)?, &sv.post_norm, Some(&dx))?;
        norms.push((s.post_norm, dpost));

        let (do_, do_w) = linear_backward(&dx, &sv.o, &p(s.o)?)?;
        add(&[(s.o..=s.o, &do_w)])?;
        // The attention output's gradient, in its heads.
        let w = self.sub_norm(bw, s.attn_sub_norm)?;
        let (dy, dsub, delta) = attention_sub_norm_backward(&do_, w.as_ref(), &sv.attn_sub_norm)?;
        if let (Some(slot), Some(g)) = (s.attn_sub_norm, dsub) {
            norms.push((slot, g));
        }
        let recomputed;
        let attn = match &sv.attn {
            Some(a) => a,
            None => {
                recomputed = self.attention(s, bw, &sv.a1, sv.a1_int8.as_ref())?.1;
                &recomputed
            }
        };
        let (windows, block, shape) = (&self.b.windows, self.plan.attention_block, self.head_shape());
        let dqkv =
            qkv_attention_backward(&dy, delta.as_ref(), attn, windows, block, shape, (&self.b.cos, &self.b.sin))?;
        let (da1, dqkv_w) = linear_backward(&dqkv, &sv.a1, &bw.stacked(layout, s.q..=s.v)?)?;
        add(&[(s.q..=s.v, &dqkv_w)])?;
        let (dx, dinput) = rmsnorm_backward(&da1, &p(s.input_norm)?, &sv.input_norm, Some(&dx))?;
        norms.push((s.input_norm, dinput));
        add(&norms.iter().map(|(slot, g)| (*slot..=*slot, g)).collect::<Vec<_>>())?;
        Ok(dx)
    }

    /// The embedding, every block and the final norm: the hidden rows the head reads, what was kept of each
    /// block (`keep`; nothing when `None`) and the final norm's saved statistics.
    fn trunk(&self, keep: Option<Recompute>) -> Result<(Tensor, Vec<LayerSaved>, RmsNormSaved)> {
        let mut x = embedding_forward(&self.w.slot(self.layout, self.layout.index(arch::EMBEDDING))?, &self.b.ids)?;
        let mut layers = Vec::new();
        for l in 0..self.cfg.num_hidden_layers {
            let bw = self.w.block(self.layout, l)?;
            let (next, saved) = self.block_forward(l, &bw, &x, keep == Some(Recompute::None))?;
            match keep {
                Some(Recompute::Blocks) => layers.push(LayerSaved::Input(x)),
                Some(_) => layers.push(LayerSaved::All(saved)),
                None => {}
            }
            x = next;
        }
        let norm = self.w.slot(self.layout, self.layout.index(arch::FINAL_NORM))?;
        let (hidden, final_norm) = rmsnorm_forward(&x, &norm, self.cfg.rms_norm_eps)?;
        Ok((hidden, layers, final_norm))
    }

    /// The summed loss of the final hidden rows (an f64 scalar on the device), `loss_chunk` rows at a time so
    /// that only one chunk's logits exist at once; with `grads` (the flat f32 gradient buffer), also the
    /// gradient at `hidden`, and the head weight's gradient added into `grads` chunk by chunk.
    fn head_loss(&self, hidden: &Tensor, grads: Option<&Gradients>) -> Result<(Tensor, Option<Tensor>)> {
        let slot = head_slot(self.cfg, self.layout);
        let head = &self.w.slot(self.layout, slot)?;
        let (vocab, channels) = head.dims2()?;
        let n = hidden.dim(0)?;
        let mut loss = Tensor::zeros((), DType::F64, hidden.device())?;
        // The gradient at the hidden rows, each chunk's rows written in place.
        let dhidden =
            grads.map(|_| crate::kernels::for_writing((n, channels), hidden.dtype(), hidden.device())).transpose()?;
        for r0 in (0..n).step_by(self.plan.loss_chunk) {
            let nr = self.plan.loss_chunk.min(n - r0);
            let h = hidden.narrow(0, r0, nr)?;
            let logits = head_logits(&h, head)?;
            let targets = self.b.targets.narrow(0, r0, nr)?;
            let mask = self.b.loss_mask.narrow(0, r0, nr)?;
            let (l, dlogits) = cross_entropy_forward_backward(&logits, vocab, &targets, &mask)?;
            loss = (loss + l)?;
            if let (Some(grads), Some(dhidden)) = (grads, &dhidden) {
                // The vocabulary's columns: the padding's gradient is dropped.
                let dlogits = dlogits.to_dtype(hidden.dtype())?.narrow(1, 0, vocab)?;
                head_input_grad(&dlogits, head, dhidden, r0)?;
                grads.add(self.layout, slot..=slot, &WeightGrad::Product { dy: dlogits, x: h })?;
            }
        }
        Ok((loss, dhidden))
    }
}

/// Runs the network on a micro-batch and returns the summed loss over its trained tokens (an f64 scalar left
/// on the device: reading it would make the host wait for the GPU before queueing the backward) and what the
/// backward needs (the loss gradient included), keeping activations as `plan.recompute` says. The head
/// weight's gradient is added into `grads` (the flat f32 gradient buffer) here, chunk by chunk.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    cfg: &ModelConfig,
    layout: &ParamLayout,
    w: &StepWeights,
    b: &BatchTensors,
    lambda: f64,
    plan: MemoryPlan,
    grads: &Gradients,
) -> Result<(Tensor, Saved)> {
    let pass = Pass::new(cfg, layout, w, b, lambda, plan)?;
    let (hidden, layers, final_norm) = pass.trunk(Some(plan.recompute))?;
    let (loss, dhidden) = pass.head_loss(&hidden, Some(grads))?;
    let dhidden = dhidden.expect("head_loss returns the gradient when given the buffer");
    Ok((loss, Saved { lambda, layers, final_norm, dhidden }))
}

/// The summed loss of a micro-batch alone (dev loss): keeps no activations.
pub fn loss(
    cfg: &ModelConfig,
    layout: &ParamLayout,
    w: &StepWeights,
    b: &BatchTensors,
    lambda: f64,
    plan: MemoryPlan,
) -> Result<f64> {
    let pass = Pass::new(cfg, layout, w, b, lambda, plan)?;
    let (hidden, _, _) = pass.trunk(None)?;
    Ok(pass.head_loss(&hidden, None)?.0.to_scalar::<f64>()?)
}

/// Adds the gradients of the summed loss to `grads`, the flat f32 gradient buffer, each parameter's as
/// soon as its layer's backward is done; each block's saved tensors are freed as soon as its backward ends.
/// Under `recompute = "blocks"` each block's forward is re-run from its input first. `done` hears each
/// range of `grads` that this backward will not touch again: what follows the blocks, each block from the
/// last, then the embedding; the data-parallel sum of a range starts there while earlier blocks still run
/// (after [`Gradients::settle`]).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    cfg: &ModelConfig,
    layout: &ParamLayout,
    w: &StepWeights,
    b: &BatchTensors,
    plan: MemoryPlan,
    saved: Saved,
    grads: &Gradients,
    done: &mut dyn FnMut(Range<usize>) -> Result<()>,
) -> Result<()> {
    let pass = Pass::new(cfg, layout, w, b, saved.lambda, plan)?;
    let add = |grads_of: &[(RangeInclusive<usize>, &WeightGrad)]| grads.add_all(layout, grads_of);
    let norm = layout.index(arch::FINAL_NORM);
    let (mut dx, dnorm) = rmsnorm_backward(&saved.dhidden, &w.slot(layout, norm)?, &saved.final_norm, None)?;
    add(&[(norm..=norm, &dnorm)])?;
    // What follows the blocks (the final norm, an untied head, whose gradient the forward added) is final
    // already: its sum can run under the whole backward instead of after it.
    let blocks = blocks_span(layout);
    done(blocks.end..layout.total)?;
    for (l, layer) in saved.layers.into_iter().enumerate().rev() {
        // Built once for the recomputed forward and the backward.
        let bw = w.block(layout, l)?;
        let sv = match layer {
            LayerSaved::All(sv) => sv,
            LayerSaved::Input(x) => pass.block_forward(l, &bw, &x, true)?.1,
        };
        dx = pass.block_backward(l, &bw, &sv, dx, &add)?;
        done(layout.span(layout.blocks[l].slots()))?;
    }
    // The embedding gathers rows; its gradient scatters them back (and adds the tied head's).
    let embed = layout.index(arch::EMBEDDING);
    add(&[(embed..=embed, &embedding_backward(&dx, &b.ids, &b.token_rows))])?;
    // The embedding, before the blocks (and a tied head with it).
    done(0..blocks.start)
}
