//! BitNet b1.58 inference: LLaMA blocks whose projections are BitLinear layers, with the family's two extra
//! RMSNorms where it has them (before `o_proj` and before `down_proj`; `model::arch`), grouped-query
//! attention and a SiLU or relu² gate. Reads like the paper: `h = x + attn(norm(x)); out = h + mlp(norm(h))`.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{RmsNorm, VarBuilder};

use super::arch::{Activation, Family, Role};
use super::bf16_head::Bf16Matrix;
use super::kv_cache::{attention_mask, KvCache, StepScratch};
use super::step_graph::{StepGraphs, StepOutput};
use super::ternary::PackedTernary;
use crate::config::model::{RopeScaling, RopeScalingType};
use crate::config::ModelConfig;
use crate::kernels::shapes::{BitLinearStep, DecodeAttention, FlashKernels, HeadShape, GEMV_ROWS};
use crate::ops::{activate, quantize_activations, quantize_weight, repeat_kv};

/// How a BitLinear layer holds its ternary weight.
#[derive(Debug, Clone)]
enum TernaryWeight {
    /// Ternary values in the compute dtype, `[out, in]` (exact in bf16), multiplied by candle's matmul.
    Dense(Tensor),
    /// 2-bit codes multiplied by the CPU integer kernel (packed checkpoints on the CPU).
    Packed(PackedTernary),
}

/// A BitLinear layer at inference: the ternary weight is computed (or read, from a packed checkpoint)
/// once at load time.
#[derive(Debug, Clone)]
pub struct BitLinear {
    weight: TernaryWeight,
    weight_scale: f64,
}

impl BitLinear {
    /// Loads the latent weight `<prefix>.weight` and quantizes it, or with `packed` reads the packed codes
    /// and scale (see `model::ternary`). On a GPU packed weights are unpacked to the dense ternary tensor.
    pub fn load(vb: &VarBuilder, out_dim: usize, in_dim: usize, packed: bool) -> Result<Self> {
        if packed {
            let (codes, scale) = PackedTernary::load(vb, out_dim, in_dim)?;
            let weight = match vb.device() {
                Device::Cpu => TernaryWeight::Packed(codes),
                device => TernaryWeight::Dense(codes.to_tensor(vb.dtype(), device)?),
            };
            return Ok(Self { weight, weight_scale: scale as f64 });
        }
        let latent = vb.get_with_hints_dtype((out_dim, in_dim), "weight", Default::default(), DType::F32)?;
        let (ternary, scale) = quantize_weight(&latent)?;
        let weight = TernaryWeight::Dense(ternary.to_dtype(vb.dtype())?);
        Ok(Self { weight, weight_scale: scale.to_scalar::<f32>()? as f64 })
    }

    /// Several BitLinear layers applied to the same input `x` (a block's q, k and v, or gate and up): on
    /// the CPU, packed ones quantize `x` once and share one parallel pass over their rows.
    fn forward_many<const N: usize>(layers: [&BitLinear; N], x: &Tensor) -> Result<[Tensor; N]> {
        let packed: Option<Vec<_>> = layers
            .iter()
            .map(|l| match &l.weight {
                TernaryWeight::Packed(codes) => Some((codes, l.weight_scale)),
                TernaryWeight::Dense(_) => None,
            })
            .collect();
        let ys = match packed {
            Some(packed) => super::ternary::bitlinear_forward(&packed, x)?,
            None => layers.iter().map(|l| l.forward(x)).collect::<Result<_>>()?,
        };
        Ok(ys.try_into().expect("one output per layer"))
    }
}

impl Module for BitLinear {
    /// `y = (xq @ Wq^T) * x_scale * w_scale`: the product of integers is exact, the scales are applied once.
    /// The packed kernel computes the same integers, and the scales the same way, so both weight forms
    /// agree bit for bit.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ternary = match &self.weight {
            TernaryWeight::Dense(ternary) => ternary,
            TernaryWeight::Packed(_) => {
                let [y] = Self::forward_many([self], x)?;
                return Ok(y);
            }
        };
        let dtype = x.dtype();
        let (q, x_scale) = quantize_activations(x)?;
        let mut dims = x.dims().to_vec();
        let in_dim = dims.pop().unwrap_or(1);
        let y = q.reshape(((), in_dim))?.to_dtype(dtype)?.matmul(&ternary.t()?)?.to_dtype(DType::F32)?;
        dims.push(ternary.dim(0)?);
        let y = y.reshape(dims)?.broadcast_mul(&(x_scale * self.weight_scale)?)?;
        y.to_dtype(dtype)
    }
}

/// A BitLinear input quantized per row: the int8 values and their scales (the candle-op reference), or the
/// values times their scales in bf16, as the fused norm kernel writes them (one launch for the norm, a
/// gated activation and the quantization instead of about ten ops); or, for a decoding step's few rows on a
/// GPU, the input as it is with its norm and activation, which the product's own kernel applies (one launch
/// for the whole BitLinear).
enum Quantized {
    Codes { q: Tensor, scale: Tensor },
    Scaled(Tensor),
    Deferred { x: Tensor, norm: Option<RmsNorm>, glu: Option<Activation> },
}

impl Quantized {
    /// `x: [.., c]` to be normed by `norm` (None: not normed), after the gated activation `glu` of its gate
    /// and up halves when given (then `x` is `[.., 2c]`), and quantized: deferred to the product where the
    /// step's kernel takes it, else now.
    fn of(x: &Tensor, norm: Option<&RmsNorm>, glu: Option<Activation>) -> Result<Self> {
        let width = x.dim(D::Minus1)?;
        let c = if glu.is_some() { width / 2 } else { width };
        let rows = x.elem_count() / width.max(1);
        if crate::kernels::decode::takes_step(x, rows, c) {
            return Ok(Self::Deferred { x: x.clone(), norm: norm.cloned(), glu });
        }
        if x.device().is_cuda() && rows <= GEMV_ROWS {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                eprintln!(
                    "note: the decoding step's BitLinear kernel does not take this model's rows of {c} inputs (a \
                     multiple of 16 that fits its shared memory), or BESSIE_UNFUSED is set; a step's products run \
                     as a norm kernel and a bf16 matrix-vector product, slower"
                )
            });
        }
        Self::now(x, norm, glu)
    }

    /// [`Quantized::of`] computed now: by the CUDA norm kernel where it applies, else by candle ops.
    fn now(x: &Tensor, norm: Option<&RmsNorm>, glu: Option<Activation>) -> Result<Self> {
        let mut dims = x.dims().to_vec();
        let width = dims.pop().unwrap_or(1);
        let c = if glu.is_some() { width / 2 } else { width };
        dims.push(c);
        let rows = x.reshape(((), width))?;
        let w = norm.map(|n| n.weight());
        let eps = norm.map_or(0.0, |n| n.eps());
        if let Some((y, _, _)) = crate::kernels::rmsnorm::try_rmsnorm_quant_forward(&rows, glu, w, eps, 1.0, false)? {
            return Ok(Self::Scaled(y.reshape(dims)?));
        }
        if x.device().is_cuda() {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                eprintln!(
                    "note: the fused GPU kernels do not take this model's rows of {c} channels (or BESSIE_UNFUSED \
                     is set, or this is not a CUDA build); its BitLinear inputs are quantized by candle ops, slower"
                )
            });
        }
        let x = match glu {
            Some(act) => (activate(&x.narrow(D::Minus1, 0, c)?, act)? * x.narrow(D::Minus1, c, c)?)?,
            None => x.clone(),
        };
        let x = match norm {
            Some(n) => n.forward(&x.contiguous()?)?,
            None => x,
        };
        let (q, scale) = quantize_activations(&x)?;
        Ok(Self::Codes { q, scale })
    }
}

/// BitLinear layers that read one input, multiplied as one on a GPU: their ternary weights stacked
/// `[sum of outputs, in]` in the compute dtype with each output's weight scale, so that one GEMM serves
/// q, k and v (or gate and up) and one quantization their input.
#[derive(Debug, Clone)]
struct Stacked {
    weight: Tensor,
    /// On a GPU the same ternary values packed 2 bits each, which a decoding step's few rows read instead
    /// (an eighth of the bytes).
    packed: Option<Tensor>,
    /// `[sum of outputs]`: each output's weight scale, in the compute dtype.
    scales: Tensor,
    outs: Vec<usize>,
}

impl Stacked {
    /// Stacks `layers` (dense ternary weights), or None when one is packed (the CPU kernel's form).
    fn of(layers: &[&BitLinear]) -> Result<Option<Self>> {
        let mut weights = Vec::new();
        let (mut scales, mut outs) = (Vec::new(), Vec::new());
        for l in layers {
            let TernaryWeight::Dense(w) = &l.weight else { return Ok(None) };
            let out = w.dim(0)?;
            weights.push(w.clone());
            scales.extend(std::iter::repeat_n(l.weight_scale as f32, out));
            outs.push(out);
        }
        let weight = Tensor::cat(&weights, 0)?;
        let scales = Tensor::new(scales, weight.device())?.to_dtype(weight.dtype())?;
        let packed = crate::kernels::decode::pack_ternary(&weight)?;
        Ok(Some(Self { weight, packed, scales, outs }))
    }

    /// On a GPU, `inputs` (the layers that read one input) stacked and `output` as a stack of one; None on
    /// the CPU, or when a layer is packed.
    fn on_gpu(device: &Device, inputs: &[&BitLinear], output: &BitLinear) -> Result<Option<(Self, Self)>> {
        match device.is_cuda() {
            true => Ok(Self::of(inputs)?.zip(Self::of(&[output])?)),
            false => Ok(None),
        }
    }

    /// The stacked outputs `[.., sum of outputs]` for the quantized input, plus `residual` where given. A
    /// decoding step's few rows (a deferred input) take the step's BitLinear kernel, which norms and quantizes
    /// them and adds the residual as it writes; where it declines, the norm kernel and the matrix-vector
    /// kernel.
    fn forward(&self, input: &Quantized, residual: Option<&Tensor>) -> Result<Tensor> {
        self.forward_into(input, residual, None)
    }

    /// [`Stacked::forward`], a decoding step's product writing `out` (the step's buffer; other paths allocate).
    fn forward_into(&self, input: &Quantized, residual: Option<&Tensor>, out: Option<&Tensor>) -> Result<Tensor> {
        let y = match input {
            Quantized::Deferred { x, norm, glu } => {
                if let Some(codes) = &self.packed {
                    let step = BitLinearStep {
                        x,
                        norm: norm.as_ref().map(|n| n.weight()),
                        eps: norm.as_ref().map_or(0.0, |n| n.eps()),
                        glu: *glu,
                        codes,
                        scales: &self.scales,
                        residual,
                        out,
                    };
                    if let Some(y) = crate::kernels::decode::try_bitlinear_step(&step)? {
                        return Ok(y);
                    }
                }
                return self.forward(&Quantized::now(x, norm.as_ref(), *glu)?, residual);
            }
            Quantized::Scaled(x) => {
                if let Some(y) = crate::kernels::decode::try_gemv(x, &self.weight, Some(&self.scales), residual)? {
                    return Ok(y);
                }
                let y = x.broadcast_matmul(&self.weight.t()?)?;
                if let Some(y) = crate::kernels::residual::try_scale_add(&y, Some(&self.scales), residual)? {
                    return Ok(y);
                }
                y.broadcast_mul(&self.scales)?
            }
            Quantized::Codes { q, scale } => {
                let dtype = self.weight.dtype();
                let y = q.to_dtype(dtype)?.broadcast_matmul(&self.weight.t()?)?.to_dtype(DType::F32)?;
                let y = y.broadcast_mul(scale)?.broadcast_mul(&self.scales.to_dtype(DType::F32)?)?;
                y.to_dtype(dtype)?
            }
        };
        match residual {
            Some(r) => r + y,
            None => Ok(y),
        }
    }

    /// The outputs of each stacked layer, split from [`Stacked::forward`].
    fn split(&self, y: &Tensor) -> Result<Vec<Tensor>> {
        let mut start = 0;
        self.outs
            .iter()
            .map(|&n| {
                start += n;
                y.narrow(D::Minus1, start - n, n)
            })
            .collect()
    }
}

fn rms_norm(vb: &VarBuilder, dim: usize, eps: f64, name: &str) -> Result<RmsNorm> {
    let weight = vb.get(dim, &format!("{name}.weight"))?;
    Ok(RmsNorm::new(weight, eps))
}

/// The family's sub-norm of this role (under the block's `vb`), or None where it has none.
fn sub_norm(vb: &VarBuilder, family: &Family, role: Role, dim: usize, eps: f64) -> Result<Option<RmsNorm>> {
    family.tensor_name(role).map(|name| rms_norm(vb, dim, eps, name)).transpose()
}

/// `x` through an optional norm.
fn maybe_norm(norm: &Option<RmsNorm>, x: &Tensor) -> Result<Tensor> {
    match norm {
        Some(n) => n.forward(x),
        None => Ok(x.clone()),
    }
}

/// Rotary position embeddings (rotate-half form, as in transformers' LLaMA), with the config's RoPE
/// scaling. Angles are `position x inv_freq` in f32, as transformers computes them.
#[derive(Debug, Clone)]
struct Rope {
    cfg: ModelConfig,
    /// Dynamic scaling recomputes the frequencies for sequences beyond `max_position_embeddings`.
    dynamic: bool,
    /// f32 `[1, head_dim / 2]`, for sequences up to `max_position_embeddings`.
    inv_freq: Tensor,
    dtype: DType,
}

impl Rope {
    fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let inv_freq = Self::inv_freq(cfg, cfg.max_position_embeddings, device)?;
        let dynamic = matches!(
            cfg.rope_scaling().map_err(candle_core::Error::msg)?,
            Some(RopeScaling { kind: RopeScalingType::Dynamic, .. })
        );
        Ok(Self { cfg: cfg.clone(), dynamic, inv_freq, dtype })
    }

    /// The inverse frequencies `[1, head_dim / 2]` of a sequence of `len` tokens: with dynamic scaling beyond
    /// `max_position_embeddings`, those of its length.
    fn inv_freq_for(&self, len: usize, device: &Device) -> Result<Tensor> {
        match self.dynamic && len > self.cfg.max_position_embeddings {
            true => Self::inv_freq(&self.cfg, len, device),
            false => Ok(self.inv_freq.clone()),
        }
    }

    /// transformers' `inv_freq` for a sequence of `len` tokens: `1 / base^(2i/d)`, divided by the factor
    /// under linear scaling.
    fn inv_freq(cfg: &ModelConfig, len: usize, device: &Device) -> Result<Tensor> {
        let f = cfg.rope_frequencies(len).map_err(candle_core::Error::msg)?;
        let inv: Vec<f32> = f.denominators.iter().map(|&den| 1.0 / den as f32 / f.position_divisor as f32).collect();
        Tensor::from_vec(inv, (1, f.denominators.len()), device)
    }

    /// The cos and sin tables `[batch, seq, head_dim / 2]` of `positions: [batch, seq]` (u32) in a sequence
    /// of `len` tokens, computed once per forward for all layers. With dynamic scaling, a sequence longer
    /// than `max_position_embeddings` rotates its new tokens with the frequencies of its current length,
    /// as transformers' `dynamic_rope_update` does (cached keys keep theirs).
    fn at(&self, positions: &Tensor, len: usize) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let inv_freq = self.inv_freq_for(len, positions.device())?;
        let freqs = positions.flatten_all()?.to_dtype(DType::F32)?.reshape((b * t, 1))?.matmul(&inv_freq)?;
        let table = |x: Tensor| x.to_dtype(self.dtype)?.reshape((b, t, ()));
        Ok((table(freqs.cos()?)?, table(freqs.sin()?)?))
    }
}

/// Where a forward's new tokens are, as its attention takes it: RoPE's tables and the mask (candle ops), or for
/// a decoding step on a GPU each row's span (`KvCache::step_meta`) with the step's first and new column
/// (`DecodeAttention::meta`) and RoPE's inverse frequencies, from which the decode kernel rotates and masks.
enum Positions {
    Tables {
        rope: (Tensor, Tensor),
        mask: Option<Tensor>,
    },
    /// A prompt into an empty cache whose rows skip no gap, on a GPU: RoPE's tables and each token's first
    /// visible column (f32 `[batch, seq]`, the training's windows), from which the flash kernel masks.
    Flash {
        rope: (Tensor, Tensor),
        start: Tensor,
    },
    Step {
        meta: Tensor,
        inv_freq: Tensor,
        /// The step's activation buffers (`KvCache::step_scratch`), or None: fresh tensors.
        scratch: Option<StepScratch>,
    },
}

/// `softmax(q k^T / sqrt(d) + mask) v` in candle ops for `q: [b, heads, t, d]` and the cache's `k`, `v`:
/// `[b, kv_heads, n, d]` (grouped query heads share a kv head), `mask` additive `[b, 1, t, n]` or None.
pub(super) fn attention_by_ops(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let groups = q.dim(1)? / k.dim(1)?;
    let (k, v) = (repeat_kv(k, groups)?, repeat_kv(v, groups)?);
    let scores = (q.matmul(&k.t()?)? / (q.dim(3)? as f64).sqrt())?.to_dtype(DType::F32)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    probs.matmul(&v)
}

/// Rotates `x: [batch, heads, seq, head_dim]` by the tables of `Rope::at`.
fn rotate(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Result<Tensor> {
    candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)
}

/// A block's projections: one BitLinear each (the CPU, where packed weights have their own kernel and
/// sharing one quantized input is what pays), or on a GPU stacked where they read one input.
#[derive(Debug, Clone)]
enum AttnWeights {
    Each { q: BitLinear, k: BitLinear, v: BitLinear, o: BitLinear },
    Stacked { qkv: Stacked, o: Stacked },
}

#[derive(Debug, Clone)]
struct Attention {
    weights: AttnWeights,
    /// 1bitLLM's `inner_attn_ln`, 2B4T's `attn_sub_norm`; None in the Llama layout.
    sub_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Loads the attention of the block under `vb` (`model.layers.N`).
    fn load(vb: &VarBuilder, cfg: &ModelConfig, family: &Family) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        let (q_width, kv) = (cfg.num_attention_heads * d, cfg.num_kv_heads() * d);
        let packed = cfg.is_packed_ternary();
        let a = vb.pp("self_attn");
        let q = BitLinear::load(&a.pp("q_proj"), q_width, h, packed)?;
        let k = BitLinear::load(&a.pp("k_proj"), kv, h, packed)?;
        let v = BitLinear::load(&a.pp("v_proj"), kv, h, packed)?;
        let o = BitLinear::load(&a.pp("o_proj"), h, q_width, packed)?;
        let weights = match Stacked::on_gpu(vb.device(), &[&q, &k, &v], &o)? {
            Some((qkv, o)) => AttnWeights::Stacked { qkv, o },
            None => AttnWeights::Each { q, k, v, o },
        };
        Ok(Self {
            weights,
            sub_norm: sub_norm(vb, family, Role::AttnSubNorm, q_width, cfg.rms_norm_eps)?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_kv_heads(),
            head_dim: d,
        })
    }

    /// `x` (the block's input) plus its attention, normed by `norm`.
    fn forward(
        &self,
        x: &Tensor,
        norm: &RmsNorm,
        at: &Positions,
        (cache, layer, first): (&mut KvCache, usize, usize),
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (rope, mask, flash) = match (at, &self.weights) {
            (Positions::Tables { rope, mask }, _) => (rope, mask.as_ref(), None),
            (Positions::Flash { rope, start }, _) => (rope, None, Some(start)),
            (Positions::Step { meta, inv_freq, scratch }, AttnWeights::Stacked { qkv, o }) => {
                let scratch = scratch.as_ref();
                let qkv = qkv.forward_into(&Quantized::of(x, Some(norm), None)?, None, scratch.map(|s| &s.qkv))?;
                let counts = crate::kernels::decode::join_counts(b, self.num_heads);
                let (k_cache, v_cache, done) =
                    cache.step_buffers(layer, b, self.num_kv_heads, self.head_dim, counts, x)?;
                let step = DecodeAttention {
                    qkv: &qkv,
                    k_cache: &k_cache,
                    v_cache: &v_cache,
                    done: &done,
                    meta,
                    inv_freq,
                    heads: self.num_heads,
                    kv_heads: self.num_kv_heads,
                    head_dim: self.head_dim,
                    width: k_cache.dim(2)?,
                    out: scratch.map(|s| &s.attention),
                    partial: scratch.map(|s| &s.partial),
                };
                let y = crate::kernels::decode::try_decode_attention(&step)?
                    .ok_or_else(|| candle_core::Error::msg("the decode kernel declined a step it was chosen for"))?;
                let y = y.reshape((b, t, self.num_heads * self.head_dim))?;
                let out = scratch.map(|s| &s.after_attention);
                return o.forward_into(&Quantized::of(&y, self.sub_norm.as_ref(), None)?, Some(x), out);
            }
            (Positions::Step { .. }, AttnWeights::Each { .. }) => {
                candle_core::bail!("a decode step for projections that are not stacked")
            }
        };
        // q, k and v as heads `[b, heads, t, d]`, q and k rotated.
        let heads = |[q, k, v]: [Tensor; 3]| -> Result<(Tensor, Tensor, Tensor)> {
            let split = |y: Tensor, n: usize| y.reshape((b, t, n, self.head_dim))?.transpose(1, 2);
            let q = rotate(&split(q, self.num_heads)?, rope)?;
            let k = rotate(&split(k, self.num_kv_heads)?, rope)?;
            Ok((q, k, split(v, self.num_kv_heads)?.contiguous()?))
        };
        let (q, k, v) = match &self.weights {
            AttnWeights::Each { q, k, v, .. } => heads(BitLinear::forward_many([q, k, v], &norm.forward(x)?)?)?,
            AttnWeights::Stacked { qkv, .. } => {
                let y = qkv.forward(&Quantized::of(x, Some(norm), None)?, None)?;
                // The training's kernel splits and rotates the stacked rows in one pass.
                let (q_heads, kv_heads, head_dim) = (self.num_heads, self.num_kv_heads, self.head_dim);
                let shape = HeadShape { batch: b, seq: t, q_heads, kv_heads, head_dim };
                match crate::kernels::rope::try_qkv_heads(&y, shape, &rope.0, &rope.1)? {
                    Some(qkv) => qkv,
                    None => heads(qkv.split(&y)?.try_into().expect("q, k and v"))?,
                }
            }
        };
        let (k, v) = cache.append(layer, first, &k, &v)?;
        let y = match flash {
            // The flash kernel reads grouped heads in place; `place` chose it only where it applies.
            Some(start) => {
                crate::kernels::flash_attention::try_forward(&q, &k, &v, start, FlashKernels::Fastest)?
                    .ok_or_else(|| candle_core::Error::msg("the flash kernel declined a prefill it was chosen for"))?
                    .0
            }
            // A decoding step on the CPU: each row's one query in plain loops.
            None => match super::cpu_attention::try_decode_attention(&q, &k, &v, mask)? {
                Some(y) => y,
                None => attention_by_ops(&q, &k, &v, mask)?,
            },
        };
        let y = y.transpose(1, 2)?.reshape((b, t, self.num_heads * self.head_dim))?;
        match &self.weights {
            AttnWeights::Each { o, .. } => x + o.forward(&maybe_norm(&self.sub_norm, &y)?)?,
            AttnWeights::Stacked { o, .. } => o.forward(&Quantized::of(&y, self.sub_norm.as_ref(), None)?, Some(x)),
        }
    }
}

/// The MLP's projections, as [`AttnWeights`]: on a GPU gate and up stacked, so their output rows are the
/// `[gate | up]` rows the fused kernel gates, norms and quantizes for `down_proj` in one launch.
#[derive(Debug, Clone)]
enum MlpWeights {
    Each { gate: BitLinear, up: BitLinear, down: BitLinear },
    Stacked { gate_up: Stacked, down: Stacked },
}

#[derive(Debug, Clone)]
struct Mlp {
    weights: MlpWeights,
    /// 1bitLLM's `ffn_layernorm`, 2B4T's `ffn_sub_norm`; None in the Llama layout.
    sub_norm: Option<RmsNorm>,
    activation: Activation,
}

impl Mlp {
    fn load(vb: &VarBuilder, cfg: &ModelConfig, family: &Family) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let packed = cfg.is_packed_ternary();
        let m = vb.pp("mlp");
        let gate = BitLinear::load(&m.pp("gate_proj"), i, h, packed)?;
        let up = BitLinear::load(&m.pp("up_proj"), i, h, packed)?;
        let down = BitLinear::load(&m.pp("down_proj"), h, i, packed)?;
        let weights = match Stacked::on_gpu(vb.device(), &[&gate, &up], &down)? {
            Some((gate_up, down)) => MlpWeights::Stacked { gate_up, down },
            None => MlpWeights::Each { gate, up, down },
        };
        Ok(Self {
            weights,
            sub_norm: sub_norm(vb, family, Role::FfnSubNorm, i, cfg.rms_norm_eps)?,
            activation: cfg.activation().map_err(candle_core::Error::msg)?,
        })
    }

    /// `x` (the residual stream) plus its MLP, normed by `norm`; a decoding step's products write `scratch`.
    fn forward(&self, x: &Tensor, norm: &RmsNorm, scratch: Option<&StepScratch>) -> Result<Tensor> {
        match &self.weights {
            MlpWeights::Each { gate, up, down } => {
                let [gate, up] = BitLinear::forward_many([gate, up], &norm.forward(x)?)?;
                let y = (activate(&gate, self.activation)? * up)?;
                x + down.forward(&maybe_norm(&self.sub_norm, &y)?)?
            }
            MlpWeights::Stacked { gate_up, down } => {
                let quantized = Quantized::of(x, Some(norm), None)?;
                let gate_up = gate_up.forward_into(&quantized, None, scratch.map(|s| &s.gate_up))?;
                let h = Quantized::of(&gate_up, self.sub_norm.as_ref(), Some(self.activation))?;
                down.forward_into(&h, Some(x), scratch.map(|s| &s.after_mlp))
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &ModelConfig, family: &Family) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: rms_norm(&vb, h, eps, "input_layernorm")?,
            self_attn: Attention::load(&vb, cfg, family)?,
            post_attention_layernorm: rms_norm(&vb, h, eps, "post_attention_layernorm")?,
            mlp: Mlp::load(&vb, cfg, family)?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct BitNet {
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Tensor,
    /// The head as bf16 where it holds only bf16 values on the CPU (see `bf16_head`).
    bf16_head: Option<Bf16Matrix>,
    rope: Rope,
    /// The decoding step's CUDA graph, captured for the cache it ran on.
    graphs: StepGraphs,
    pub cfg: ModelConfig,
}

impl BitNet {
    /// Builds the model from Hugging Face names; `vb`'s dtype is the compute dtype.
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let family = cfg.family().map_err(candle_core::Error::msg)?;
        let embed_tokens = vb.get((v, h), super::arch::EMBEDDING)?;
        let lm_head = match cfg.tie_word_embeddings {
            true => embed_tokens.clone(),
            false => vb.get((v, h), super::arch::LM_HEAD)?,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| Block::load(vb.pp(format!("model.layers.{l}")), cfg, family))
            .collect::<Result<_>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            norm: rms_norm(&vb, h, cfg.rms_norm_eps, "model.norm")?,
            bf16_head: Bf16Matrix::exact(&lm_head)?,
            lm_head,
            rope: Rope::new(cfg, vb.dtype(), vb.device())?,
            graphs: StepGraphs::default(),
            cfg: cfg.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// The longest sequence the model takes (see [`ModelConfig::max_positions`]); `usize::MAX` for no limit.
    pub fn max_positions(&self) -> usize {
        self.cfg.max_positions().ok().flatten().unwrap_or(usize::MAX)
    }

    /// Whether a prefill after `col` cached columns of rows `spans` runs the flash kernel: into an empty cache
    /// (its keys are its queries) whose rows skip no gap, on a GPU, with heads the kernel takes.
    fn flash_prefill(&self, col: usize, spans: &[super::kv_cache::Span]) -> bool {
        col == 0
            && spans.iter().all(|s| !s.has_gap())
            && crate::kernels::flash_attention::takes_heads(&self.embed_tokens, self.cfg.head_dim())
            && self.cfg.num_attention_heads.is_multiple_of(self.cfg.num_kv_heads())
    }

    /// Whether a decoding step (one new token per row) runs the decode kernels: on a GPU with stacked
    /// projections and heads they take; said once when it does not.
    fn decode_kernels(&self) -> bool {
        let stacked = self.layers.first().is_some_and(|b| matches!(b.self_attn.weights, AttnWeights::Stacked { .. }));
        let takes = stacked && crate::kernels::decode::takes(&self.embed_tokens, self.cfg.head_dim());
        if stacked && !takes {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                eprintln!(
                    "note: the GPU decode kernels do not take this model (head dim {}, or BESSIE_UNFUSED is set, or \
                     this is not a CUDA build); decoding by candle ops, slower",
                    self.cfg.head_dim()
                )
            });
        }
        takes
    }

    /// Runs `ids: [batch, seq]` (u32) after the columns already in `cache` and returns the final hidden
    /// states `[batch, seq, hidden]` after the last norm. The outputs at padding columns are meaningless.
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (at, first) = self.place(b, t, cache)?;
        let hidden = self.run(ids, &at, cache, first)?;
        cache.advance(t);
        Ok(hidden)
    }

    /// The logits `[rows, vocab]` (f32) of a decoding step: one new token per row, `ids: [rows, 1]`, after
    /// `cache`'s columns. With the decode kernels, the step is captured as a CUDA graph once per layout of
    /// the cache (`step_graph`) and replayed: one launch a token instead of one per kernel.
    pub fn step_logits(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.step(ids, cache, StepOutput::Logits)
    }

    /// The greedy picks `[rows, 1]` (u32, each row's argmax) of the step [`Self::step_logits`] runs, taken
    /// inside its graph. With a graph they are the graph's own ids buffer: passed back as the next step's
    /// `ids` they are read in place, and the next step overwrites them (read or copy them before it, in the
    /// stream's order as `kernels::readback` does).
    pub fn step_picks(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.step(ids, cache, StepOutput::Picks)
    }

    fn step(&self, ids: &Tensor, cache: &mut KvCache, output: StepOutput) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t != 1 {
            candle_core::bail!("a decoding step takes one token per row, not {t}");
        }
        let (at, first) = self.place(b, 1, cache)?;
        let out = match &at {
            Positions::Step { meta, inv_freq, .. } if !self.rope.dynamic => {
                // Every layer's buffers as the step will use them (grown first, if they must), and the step's
                // activations, which is what a graph captured now holds.
                let (heads, dim) = (self.cfg.num_kv_heads(), self.cfg.head_dim());
                cache.make_room_all(1, (b, heads, dim), &self.embed_tokens)?;
                let counts = crate::kernels::decode::join_counts(b, self.cfg.num_attention_heads);
                cache.join_counts(counts, &self.embed_tokens)?;
                let scratch = cache.step_scratch(b, |rows, width| self.step_scratch(rows, width))?;
                let key = cache.layout_key(b)?;
                let compute = |ids: &Tensor, meta: &Tensor| {
                    let scratch = scratch.clone();
                    let at = Positions::Step { meta: meta.clone(), inv_freq: inv_freq.clone(), scratch };
                    let hidden = self.run(ids, &at, &mut *cache, first)?;
                    self.logits(&hidden.squeeze(1)?)
                };
                self.graphs.run(key, ids, meta, output, compute)?
            }
            _ => output.of(self.logits(&self.run(ids, &at, cache, first)?.squeeze(1)?)?)?,
        };
        cache.advance(1);
        Ok(out)
    }

    /// A decoding step's activation buffers for `rows` rows over a cache `width` columns wide.
    fn step_scratch(&self, rows: usize, width: usize) -> Result<StepScratch> {
        let (cfg, dev) = (&self.cfg, self.device());
        let (heads, d) = (cfg.num_attention_heads, cfg.head_dim());
        let bf16 = |dims: &[usize]| Tensor::zeros(dims, self.embed_tokens.dtype(), dev);
        let partial = crate::kernels::decode::partial_len(rows, heads, d, width);
        Ok(StepScratch {
            qkv: bf16(&[rows, 1, (heads + 2 * cfg.num_kv_heads()) * d])?,
            attention: bf16(&[rows, heads * d])?,
            partial: Tensor::zeros(partial, DType::F32, dev)?,
            gate_up: bf16(&[rows, 1, 2 * cfg.intermediate_size])?,
            after_attention: bf16(&[rows, 1, cfg.hidden_size])?,
            after_mlp: bf16(&[rows, 1, cfg.hidden_size])?,
        })
    }

    /// On a GPU, runs a short prompt and a decoding step once, so that what a process pays at the first use of
    /// each kernel (the driver compiles the PTX of every module then; cuBLAS sets itself up) is paid at load
    /// time: the first answer's speed is then the model's. Its memory goes back to the pool (a few MiB).
    pub fn warm_up(&self) -> Result<()> {
        if self.device().is_cpu() {
            return Ok(());
        }
        const TOKENS: usize = 64;
        let t = TOKENS.min(self.max_positions().saturating_sub(1)).max(1);
        let ids = Tensor::zeros((1, t), DType::U32, self.device())?;
        let mut cache = KvCache::new(&self.cfg).with_capacity(t + 1);
        self.logits(&self.forward_last(&ids, &mut cache, t)?)?;
        if t < self.max_positions() {
            // A decoding step, without a graph (its capture belongs to the first real step's cache).
            let step = self.forward(&ids.narrow(1, 0, 1)?, &mut cache)?;
            self.logits(&step.squeeze(1)?)?.to_vec2::<f32>()?;
        }
        Ok(())
    }

    /// How many decoding steps were replayed from a CUDA graph so far ([`BitNet::step_logits`]).
    pub fn decode_graph_replays(&self) -> usize {
        self.graphs.replays()
    }

    /// Where `t` new columns of `b` rows go in `cache` (made room for), as their attention takes it, and the
    /// first column any row attends to: the host's part of a forward, before its kernels.
    fn place(&self, b: usize, t: usize, cache: &mut KvCache) -> Result<(Positions, usize)> {
        let (first, col) = cache.reserve(t)?;
        let spans = cache.spans(b)?;
        // The longest row: its own tokens, the new ones included (padding and gaps are not positions).
        let last = col + t - 1;
        let longest = spans.iter().filter(|s| !s.is_retired()).map(|s| s.position(last) + 1).max().unwrap_or(t);
        self.cfg
            .check_positions(longest, "the sequence (prompt and generated tokens)")
            .map_err(candle_core::Error::msg)?;
        let at = match t == 1 && self.decode_kernels() {
            true => {
                let meta: Vec<u32> =
                    spans.iter().flat_map(|s| s.step_meta(col)).chain([first as u32, col as u32]).collect();
                let meta = Tensor::from_vec(meta, 4 * b + 2, self.device())?;
                Positions::Step { meta, inv_freq: self.rope.inv_freq_for(longest, self.device())?, scratch: None }
            }
            false => {
                let positions: Vec<u32> =
                    spans.iter().flat_map(|s| (col..col + t).map(move |c| s.position(c) as u32)).collect();
                let rope = self.rope.at(&Tensor::from_vec(positions, (b, t), self.device())?, longest)?;
                match self.flash_prefill(col, &spans) {
                    true => {
                        // Each token's first visible column: its row's start, or itself where the row hides it.
                        let start: Vec<f32> = spans
                            .iter()
                            .flat_map(|s| (0..t).map(move |c| if s.hides(c) { c as f32 } else { s.start() as f32 }))
                            .collect();
                        Positions::Flash { rope, start: Tensor::from_vec(start, (b, t), self.device())? }
                    }
                    false => Positions::Tables { rope, mask: attention_mask(t, (first, col), &spans, self.device())? },
                }
            }
        };
        Ok((at, first))
    }

    /// The embedding, every block and the final norm of `ids` placed at `at` (device work only: what a
    /// decoding step's graph captures). The new columns count once the caller advances the cache.
    fn run(&self, ids: &Tensor, at: &Positions, cache: &mut KvCache, first: usize) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let mut x = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, ()))?;
        let scratch = match at {
            Positions::Step { scratch, .. } => scratch.as_ref(),
            _ => None,
        };
        for (layer, block) in self.layers.iter().enumerate() {
            let kv = (&mut *cache, layer, first);
            x = block.self_attn.forward(&x, &block.input_layernorm, at, kv)?;
            x = block.mlp.forward(&x, &block.post_attention_layernorm, scratch)?;
        }
        self.norm.forward(&x)
    }

    /// Runs `ids: [batch, seq]` after the columns already in `cache` as [`BitNet::forward`] does, but `chunk`
    /// columns at a time, and returns the final hidden states of the last column, `[batch, hidden]`:
    /// attention's scores (`[batch, heads, chunk, columns]`) stay a chunk's, not the whole prompt's. Under
    /// dynamic RoPE scaling, whose frequencies follow the length a forward sees, in one forward, as
    /// transformers prefills; and in one where the flash kernel takes it (an empty cache on a GPU), which
    /// keeps no scores.
    pub fn forward_last(&self, ids: &Tensor, cache: &mut KvCache, chunk: usize) -> Result<Tensor> {
        let t = ids.dim(1)?;
        // The flash kernel keeps no scores: a prompt into an empty cache goes whole.
        let whole = self.rope.dynamic || (cache.is_empty() && self.flash_prefill(0, &[]));
        let chunk = if whole { t } else { chunk.max(1) };
        let mut hidden = None;
        for c0 in (0..t).step_by(chunk) {
            hidden = Some(self.forward(&ids.narrow(1, c0, chunk.min(t - c0))?, cache)?);
        }
        let hidden = hidden.ok_or_else(|| candle_core::Error::msg("no columns to run"))?;
        hidden.narrow(1, hidden.dim(1)? - 1, 1)?.squeeze(1)
    }

    /// Logits in f32 for hidden states `[.., hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let mut dims = hidden.dims().to_vec();
        let h = dims.pop().unwrap_or(1);
        let hidden = hidden.reshape(((), h))?;
        // A decoding step's few rows on a GPU: the matrix-vector kernel (no cuBLAS in the step's graph).
        let y = match (&self.bf16_head, crate::kernels::decode::try_gemv(&hidden, &self.lm_head, None, None)?) {
            (_, Some(y)) => y,
            (Some(head), None) => head.matmul_t(&hidden)?,
            (None, None) => hidden.matmul(&self.lm_head.t()?)?,
        };
        dims.push(self.cfg.vocab_size);
        y.reshape(dims)?.to_dtype(DType::F32)
    }
}
