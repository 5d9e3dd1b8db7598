//! BitNet training forward and backward over the whole network (llm.c's `gpt2_forward` /
//! `gpt2_backward`): the forward keeps what each layer's backward needs, the backward walks the blocks in
//! reverse and returns one f32 gradient per parameter, in the order of [`ParamLayout`].

use std::ops::Range;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::layers::*;
use super::params::ParamLayout;
use crate::config::ModelConfig;
use crate::data::Batch;
use crate::model::bitnet::repeat_kv;

/// This step's weights in the compute dtype, one per parameter slot: BitLinear weights already quantized
/// (once per optimizer step, shared by every micro-batch), norms and the embedding cast.
pub struct StepWeights {
    pub tensors: Vec<Tensor>,
}

impl StepWeights {
    pub fn new(layout: &ParamLayout, flat: &Tensor, lambda: f64, dtype: DType) -> Result<Self> {
        let tensors = (0..layout.slots.len())
            .map(|i| {
                let w = layout.view(flat, i)?;
                if is_bitlinear(&layout.slots[i].name) {
                    effective_weight(&w, lambda, dtype)
                } else {
                    w.to_dtype(dtype)
                }
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { tensors })
    }
}

pub fn is_bitlinear(name: &str) -> bool {
    name.ends_with("_proj.weight")
}

/// A micro-batch on the device: token ids, targets, loss mask, per-token rotary angles and the
/// block-diagonal causal mask that keeps packed examples apart.
pub struct BatchTensors {
    pub batch: usize,
    pub seq: usize,
    ids: Tensor,
    targets: Tensor,
    loss_mask: Tensor,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    /// The example id of each token, `[batch, seq]`: the mask as the fused attention kernel reads it.
    segments: Tensor,
    pub loss_tokens: usize,
}

/// RoPE angle tables for every position, f32 `[max_positions, head_dim / 2]`.
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl RopeTables {
    pub fn new(cfg: &ModelConfig, device: &Device) -> Result<Self> {
        let d = cfg.head_dim();
        let angles: Vec<f32> = (0..cfg.max_position_embeddings)
            .flat_map(|p| (0..d / 2).map(move |i| (p as f64 / cfg.rope_theta.powf(2.0 * i as f64 / d as f64)) as f32))
            .collect();
        let angles = Tensor::from_vec(angles, (cfg.max_position_embeddings, d / 2), device)?;
        Ok(Self { cos: angles.cos()?, sin: angles.sin()? })
    }
}

impl BatchTensors {
    pub fn new(b: &Batch, rope: &RopeTables, dtype: DType, device: &Device) -> Result<Self> {
        let (n, t) = (b.batch, b.seq);
        let positions = Tensor::new(b.positions.as_slice(), device)?;
        let angles = |table: &Tensor| -> Result<Tensor> {
            Ok(table.index_select(&positions, 0)?.reshape((n, t, ()))?.to_dtype(dtype)?)
        };
        // Query i sees key j when j <= i within the same example; padding (segment 0) sees only itself,
        // which keeps its softmax finite; no real token attends to padding.
        let mut mask = vec![f32::NEG_INFINITY; n * t * t];
        for r in 0..n {
            let seg = &b.segments[r * t..(r + 1) * t];
            for i in 0..t {
                for j in 0..=i {
                    if i == j || (seg[i] != 0 && seg[i] == seg[j]) {
                        mask[(r * t + i) * t + j] = 0.0;
                    }
                }
            }
        }
        Ok(Self {
            batch: n,
            seq: t,
            ids: Tensor::new(b.ids.as_slice(), device)?,
            targets: Tensor::new(b.targets.as_slice(), device)?,
            loss_mask: Tensor::new(b.loss_mask.as_slice(), device)?,
            cos: angles(&rope.cos)?,
            sin: angles(&rope.sin)?,
            mask: Tensor::from_vec(mask, (n, 1, t, t), device)?,
            segments: Tensor::from_slice(&b.segments, (n, t), device)?,
            loss_tokens: b.loss_tokens,
        })
    }
}

struct BlockSaved {
    input_norm: RmsNormSaved,
    a1: Tensor,
    attn: AttentionSaved,
    inner_norm: RmsNormSaved,
    o: Tensor,
    post_norm: RmsNormSaved,
    a2: Tensor,
    gate: Tensor,
    up: Tensor,
    ffn_norm: RmsNormSaved,
    h: Tensor,
}

/// What [`backward`] needs from [`forward`].
pub struct Saved {
    blocks: Vec<BlockSaved>,
    final_norm: RmsNormSaved,
    hidden: Tensor,
    dlogits: Tensor,
}

/// Names of one block's parameters, resolved to slot indices once.
struct BlockSlots {
    input_ln: usize,
    q: usize,
    k: usize,
    v: usize,
    inner_ln: usize,
    o: usize,
    post_ln: usize,
    gate: usize,
    up: usize,
    ffn_ln: usize,
    down: usize,
}

impl BlockSlots {
    fn new(layout: &ParamLayout, l: usize) -> Self {
        let i = |s: &str| layout.index(&format!("model.layers.{l}.{s}.weight"));
        Self {
            input_ln: i("input_layernorm"),
            q: i("self_attn.q_proj"),
            k: i("self_attn.k_proj"),
            v: i("self_attn.v_proj"),
            inner_ln: i("self_attn.inner_attn_ln"),
            o: i("self_attn.o_proj"),
            post_ln: i("post_attention_layernorm"),
            gate: i("mlp.gate_proj"),
            up: i("mlp.up_proj"),
            ffn_ln: i("mlp.ffn_layernorm"),
            down: i("mlp.down_proj"),
        }
    }

    /// The block's span of the flat buffer: its parameters are neighbours, from the input norm to the down
    /// projection (the order of `model::parameter_shapes`).
    fn range(&self, layout: &ParamLayout) -> Range<usize> {
        let last = &layout.slots[self.down];
        layout.slots[self.input_ln].offset..last.offset + last.len
    }
}

fn head_slot(cfg: &ModelConfig, layout: &ParamLayout) -> usize {
    layout.index(if cfg.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" })
}

/// Runs the network on a micro-batch and returns the summed loss over its trained tokens and what the
/// backward needs (the loss gradient included).
pub fn forward(
    cfg: &ModelConfig,
    layout: &ParamLayout,
    w: &StepWeights,
    b: &BatchTensors,
    lambda: f64,
) -> Result<(f64, Saved)> {
    let (n, t, h) = (b.batch, b.seq, cfg.hidden_size);
    let (nh, nkv, d, eps) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim(), cfg.rms_norm_eps);
    let p = &w.tensors;
    let heads = |x: Tensor, k: usize| x.reshape((n, t, k, d))?.transpose(1, 2)?.contiguous();
    let mut x = p[layout.index("model.embed_tokens.weight")].index_select(&b.ids, 0)?;
    let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
    for l in 0..cfg.num_hidden_layers {
        let s = BlockSlots::new(layout, l);
        let (a1, input_norm) = rmsnorm_quant_forward(&x, &p[s.input_ln], eps, lambda)?;
        let q = rope_forward(&heads(linear_forward(&a1, &p[s.q])?, nh)?, &b.cos, &b.sin)?;
        let k = rope_forward(&heads(linear_forward(&a1, &p[s.k])?, nkv)?, &b.cos, &b.sin)?;
        let v = heads(linear_forward(&a1, &p[s.v])?, nkv)?;
        let (k, v) = (repeat_kv(&k, nh / nkv)?, repeat_kv(&v, nh / nkv)?);
        let (y, attn) = attention_forward(&q, &k, &v, &b.mask, &b.segments)?;
        let y = y.transpose(1, 2)?.reshape((n * t, h))?;
        let (o, inner_norm) = rmsnorm_quant_forward(&y, &p[s.inner_ln], eps, lambda)?;
        x = (x + linear_forward(&o, &p[s.o])?)?;

        let (a2, post_norm) = rmsnorm_quant_forward(&x, &p[s.post_ln], eps, lambda)?;
        let gate = linear_forward(&a2, &p[s.gate])?;
        let up = linear_forward(&a2, &p[s.up])?;
        let (hq, ffn_norm) = rmsnorm_quant_forward(&swiglu_forward(&gate, &up)?, &p[s.ffn_ln], eps, lambda)?;
        x = (x + linear_forward(&hq, &p[s.down])?)?;
        blocks.push(BlockSaved { input_norm, a1, attn, inner_norm, o, post_norm, a2, gate, up, ffn_norm, h: hq });
    }
    let (hidden, final_norm) = rmsnorm_forward(&x, &p[layout.index("model.norm.weight")], eps)?;
    let logits = linear_forward(&hidden, &p[head_slot(cfg, layout)])?;
    let (loss, dlogits) = cross_entropy_forward_backward(&logits, &b.targets, &b.loss_mask)?;
    Ok((loss, Saved { blocks, final_norm, hidden, dlogits }))
}

/// Adds the gradients of the summed loss to `grads`, the flat f32 gradient buffer, each parameter's as
/// soon as its layer's backward is done (so a layer's activations and gradients are freed as it goes).
/// `done` hears each range of `grads` that this backward will not touch again, block by block from the
/// last, then the rest: the data-parallel sum of a range starts there while earlier blocks still run.
pub fn backward(
    cfg: &ModelConfig,
    layout: &ParamLayout,
    w: &StepWeights,
    b: &BatchTensors,
    saved: Saved,
    grads: &Tensor,
    done: &mut dyn FnMut(Range<usize>) -> Result<()>,
) -> Result<()> {
    let (n, t, h) = (b.batch, b.seq, cfg.hidden_size);
    let (nh, nkv, d) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
    let p = &w.tensors;
    let dtype = p[0].dtype();
    let add = |slot: usize, g: &Tensor| layout.accumulate(grads, slot, g);
    let heads = |x: &Tensor, k: usize| x.reshape((n, t, k, d))?.transpose(1, 2)?.contiguous();
    let rows = |x: Tensor| x.transpose(1, 2)?.reshape((n * t, ()));

    let head = head_slot(cfg, layout);
    let (dhidden, dhead) = linear_backward(&saved.dlogits.to_dtype(dtype)?, &saved.hidden, &p[head])?;
    add(head, &dhead)?;
    let norm = layout.index("model.norm.weight");
    let (mut dx, dnorm) = rmsnorm_backward(&dhidden, &p[norm], &saved.final_norm)?;
    add(norm, &dnorm)?;

    for (l, sv) in saved.blocks.iter().enumerate().rev() {
        let s = BlockSlots::new(layout, l);
        let (dhq, ddown) = linear_backward(&dx, &sv.h, &p[s.down])?;
        let (dh, dffn) = rmsnorm_backward(&dhq, &p[s.ffn_ln], &sv.ffn_norm)?;
        let (dgate, dup) = swiglu_backward(&dh, &sv.gate, &sv.up)?;
        let (da2_gate, dgate_w) = linear_backward(&dgate, &sv.a2, &p[s.gate])?;
        let (da2_up, dup_w) = linear_backward(&dup, &sv.a2, &p[s.up])?;
        let (dx2, dpost) = rmsnorm_backward(&(da2_gate + da2_up)?, &p[s.post_ln], &sv.post_norm)?;
        dx = (dx + dx2)?;

        let (do_, do_w) = linear_backward(&dx, &sv.o, &p[s.o])?;
        let (dy, dinner) = rmsnorm_backward(&do_, &p[s.inner_ln], &sv.inner_norm)?;
        let (dq, dk, dv) = attention_backward(&heads(&dy, nh)?, &sv.attn)?;
        let (dk, dv) = (sum_kv_groups(&dk, nh / nkv)?, sum_kv_groups(&dv, nh / nkv)?);
        let dq = rows(rope_backward(&dq, &b.cos, &b.sin)?)?;
        let dk = rows(rope_backward(&dk, &b.cos, &b.sin)?)?;
        let dv = rows(dv)?;
        let (da1_q, dq_w) = linear_backward(&dq, &sv.a1, &p[s.q])?;
        let (da1_k, dk_w) = linear_backward(&dk, &sv.a1, &p[s.k])?;
        let (da1_v, dv_w) = linear_backward(&dv, &sv.a1, &p[s.v])?;
        let (dx1, dinput) = rmsnorm_backward(&((da1_q + da1_k)? + da1_v)?, &p[s.input_ln], &sv.input_norm)?;
        dx = (dx + dx1)?;

        for (slot, g) in [
            (s.down, ddown),
            (s.ffn_ln, dffn),
            (s.gate, dgate_w),
            (s.up, dup_w),
            (s.post_ln, dpost),
            (s.o, do_w),
            (s.inner_ln, dinner),
            (s.q, dq_w),
            (s.k, dk_w),
            (s.v, dv_w),
            (s.input_ln, dinput),
        ] {
            add(slot, &g)?;
        }
        done(s.range(layout))?;
    }
    // The embedding gathers rows; its gradient scatters them back (and adds the tied head's).
    let embed = layout.index("model.embed_tokens.weight");
    let dembed =
        Tensor::zeros((cfg.vocab_size, h), DType::F32, dx.device())?.index_add(&b.ids, &dx.to_dtype(DType::F32)?, 0)?;
    add(embed, &dembed)?;
    // What lies outside the blocks: the embedding before them, the final norm (and an untied head) after.
    let blocks = match cfg.num_hidden_layers {
        0 => layout.total..layout.total,
        l => BlockSlots::new(layout, 0).range(layout).start..BlockSlots::new(layout, l - 1).range(layout).end,
    };
    done(0..blocks.start)?;
    done(blocks.end..layout.total)
}

/// The backward of [`repeat_kv`]: sum the gradients of the query heads that shared a key/value head.
fn sum_kv_groups(dx: &Tensor, groups: usize) -> candle_core::Result<Tensor> {
    if groups == 1 {
        return Ok(dx.clone());
    }
    let (b, n, t, d) = dx.dims4()?;
    dx.reshape((b, n / groups, groups, t, d))?.sum(2)
}
